"""`generator.objective=flow`: rectified flow's loss and target, its timestep sampling, sampling and configs
(a flow model overfitting a batch: tests/test_model.py; editing and export with flow: tests/test_editing.py,
tests/test_export.py)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from conftest import compose_train
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UNet2DConditionModel,
)
from hydra.utils import instantiate

from text2img.errors import ConfigError, root_cause
from text2img.fusion import TokenProjection
from text2img.generators import DiffusionGenerator
from text2img.generators.flow import RectifiedFlow
from text2img.run.config_checks import check_config
from text2img.types import TextEmbedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT_DIM, COND_DIM = 24, 32


def flow_generator(flow: RectifiedFlow | None = None, **kwargs) -> DiffusionGenerator:
    """A tiny UNet (two levels) on 16-px images folded into 2x2 patches, trained with rectified flow."""
    torch.manual_seed(0)
    unet = partial(
        UNet2DConditionModel, block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    defaults = dict(
        unet=unet, noise_scheduler=DDPMScheduler(), sampler=DPMSolverMultistepScheduler, image_size=16,
        cond_dim=COND_DIM, patch_size=2, sample_steps=4, objective="flow", flow=flow or RectifiedFlow(),
    )
    return DiffusionGenerator(**(defaults | kwargs))


def text(batch: int = 4) -> TextEmbedding:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(batch, 5, TEXT_DIM, generator=generator)
    return TextEmbedding(tokens, torch.ones(batch, 5, dtype=torch.bool), torch.randn(batch, TEXT_DIM, generator=generator))


def null(batch: int = 4) -> TextEmbedding:
    return TextEmbedding(torch.zeros(batch, 1, TEXT_DIM), torch.ones(batch, 1, dtype=torch.bool),
                         torch.zeros(batch, TEXT_DIM))


def test_the_flow_loss_is_the_velocity_error_on_the_straight_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """By hand, for a fixed seed: t uniform then shifted, x_t = (1 - t) x0 + t noise, target noise - x0, the UNet
    called at t * 1000, the loss the mean squared error."""
    shift = 2.0
    generator = flow_generator(RectifiedFlow(timesteps="uniform", shift=shift))
    calls = []

    def denoise(x, t, text, fusion):  # a stand-in network whose prediction is known: half its input
        calls.append((x, t))
        return 0.5 * x

    monkeypatch.setattr(generator, "_denoise", denoise)
    x0, head = torch.rand(4, 3, 16, 16) * 2 - 1, TokenProjection(TEXT_DIM, COND_DIM)
    torch.manual_seed(7)
    loss = generator.training_loss(x0, text(), head)

    torch.manual_seed(7)  # the same draws in the same order: the noise, then t
    noise, u = torch.randn_like(x0), torch.rand(4)
    t = shift * u / (1 + (shift - 1) * u)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    expected = ((0.5 * x_t - (noise - x0)) ** 2).mean()
    (x, timesteps), = calls
    assert x.shape == x0.shape and timesteps.shape == (4,) and timesteps.dtype == torch.float32
    torch.testing.assert_close(timesteps, t * 1000)
    torch.testing.assert_close(x, x_t)
    assert loss.ndim == 0
    torch.testing.assert_close(loss, expected)


def test_the_flow_loss_reaches_unet_and_fusion() -> None:
    generator, head = flow_generator(), TokenProjection(TEXT_DIM, COND_DIM)
    loss = generator.training_loss(torch.rand(4, 3, 16, 16) * 2 - 1, text(), head)
    loss.backward()
    assert torch.isfinite(loss)
    network = [p.grad.abs().sum() for p in generator.lora_module().parameters() if p.grad is not None]
    assert head.proj[-1].weight.grad.abs().sum() > 0 and sum(network) > 0


def test_logit_normal_timesteps_have_their_mean_and_quantiles() -> None:
    torch.manual_seed(0)
    mean, std = 0.5, 0.8
    t = RectifiedFlow(logit_mean=mean, logit_std=std).sample_t(200_000, torch.device("cpu"))
    assert 0 < t.min() and t.max() < 1
    logit = torch.logit(t.double())
    assert logit.mean().item() == pytest.approx(mean, abs=0.01) and logit.std().item() == pytest.approx(std, abs=0.01)
    normal = torch.distributions.Normal(0.0, 1.0)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):  # t's quantile q is sigmoid(mean + std * z_q)
        expected = torch.sigmoid(torch.tensor(mean + std * normal.icdf(torch.tensor(q)).item()))
        assert torch.quantile(t, q).item() == pytest.approx(expected.item(), abs=0.005)


def test_uniform_timesteps_are_uniform_and_the_shift_moves_mass_to_noise() -> None:
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    uniform = RectifiedFlow(timesteps="uniform").sample_t(100_000, cpu)
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    assert torch.quantile(uniform, 0.9).item() == pytest.approx(0.9, abs=0.01)
    shift = 3.0
    shifted = RectifiedFlow(timesteps="uniform", shift=shift).sample_t(100_000, cpu)
    # t' = 3t / (1 + 2t) is increasing: t's quantile q maps to 3q / (1 + 2q), so P(t' > 0.5) = P(t > 1/4) = 3/4
    assert torch.quantile(shifted, 0.5).item() == pytest.approx(1.5 / 2, abs=0.01)
    assert (shifted > 0.5).float().mean().item() == pytest.approx(0.75, abs=0.01)
    logit_normal = RectifiedFlow(shift=shift).sample_t(100_000, cpu)
    assert (logit_normal > 0.5).float().mean().item() == pytest.approx(
        1 - torch.distributions.Normal(0.0, 1.0).cdf(torch.tensor(math.log(1 / 3))).item(), abs=0.01
    )  # t' > 1/2 where t > 1/4, where the logit > log(1/3)


@pytest.mark.parametrize("sampler", [FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler])
def test_flow_samples_are_images_decided_by_their_seed_alone(sampler) -> None:
    generator, head = flow_generator(RectifiedFlow(shift=3.0, sampler=sampler)), TokenProjection(TEXT_DIM, COND_DIM)
    assert isinstance(generator.make_sampler(), sampler) and generator.make_sampler().config.shift == 3.0

    def sample(seeds, rows=slice(None), **kwargs):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        return generator.sample(text()[rows], null()[rows], head, generators, **kwargs)

    images = sample(range(4))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert -1 <= images.min() and images.max() <= 1
    assert torch.equal(images, sample(range(4)))
    assert not torch.equal(images, sample(range(1, 5)))
    assert not torch.equal(images, sample(range(4), guidance_scale=1.0))
    torch.testing.assert_close(sample([2], slice(2, 3))[0], images[2], atol=1e-5, rtol=0)


def test_heun_and_euler_sample_differently_from_one_model() -> None:
    head = TokenProjection(TEXT_DIM, COND_DIM)
    euler, heun = (flow_generator(RectifiedFlow(sampler=s)) for s in (FlowMatchEulerDiscreteScheduler,
                                                                       FlowMatchHeunDiscreteScheduler))
    seeds = [torch.Generator().manual_seed(0) for _ in range(4)]
    heun.load_state_dict(euler.state_dict())
    assert not torch.equal(euler.sample(text(), null(), head, seeds), heun.sample(text(), null(), head, seeds))


def test_objective_flow_composes_for_pixel_and_latent_diffusion(tmp_path) -> None:
    cfg = compose_train(tmp_path, ["debug=smoke", "generator.objective=flow"])
    check_config(cfg)
    generator = instantiate(cfg.generator)
    assert generator.objective == "flow" and isinstance(generator.make_sampler(), FlowMatchEulerDiscreteScheduler)
    assert generator.flow.timesteps == "logit_normal" and generator.flow.shift == 1.0

    cfg = compose_train(tmp_path, [
        "debug=smoke", "generator=ldm", "generator.objective=flow", "generator.flow.shift=3",
        "generator.flow.timesteps=uniform", "generator.flow.sampler.path=diffusers.FlowMatchHeunDiscreteScheduler",
    ])
    check_config(cfg)
    assert cfg.generator._target_.endswith("LatentDiffusionGenerator") and cfg.generator.objective == "flow"
    flow = instantiate(cfg.generator.flow)
    assert flow.sampler is FlowMatchHeunDiscreteScheduler and flow.shift == 3 and flow.timesteps == "uniform"


@pytest.mark.parametrize("objective", ["epsilon", "v_prediction"])
def test_ddpm_objectives_set_the_noise_schedulers_prediction(tmp_path, objective: str) -> None:
    generator = instantiate(compose_train(tmp_path, ["debug=smoke", f"generator.objective={objective}"]).generator)
    assert generator.objective == objective
    assert generator.make_sampler().config.prediction_type == objective


@pytest.mark.parametrize(("overrides", "message"), [
    (["generator.objective=sample"],
     "generator.objective='sample' is invalid; set generator.objective to one of epsilon, v_prediction, flow"),
    (["generator.flow.timesteps=gaussian"],
     "generator.flow.timesteps='gaussian' is invalid; set generator.flow.timesteps to one of uniform, logit_normal"),
    (["generator.flow.shift=0"], "generator.flow.shift=0 is invalid; set generator.flow.shift to a number > 0"),
    (["generator.flow.logit_std=-1"],
     "generator.flow.logit_std=-1 is invalid; set generator.flow.logit_std to a number > 0"),
])
def test_bad_flow_values_are_one_line_before_anything_is_built(tmp_path, overrides, message) -> None:
    with pytest.raises(ConfigError) as error:
        check_config(compose_train(tmp_path, ["debug=smoke", *overrides]))
    assert str(error.value) == message


@pytest.mark.parametrize(("overrides", "message"), [
    (["generator.objective=flow", "generator.loss_weighting=min_snr"],
     "generator.loss_weighting=min_snr weights DDPM noise levels by their SNR and does not apply to "
     "generator.objective=flow; use generator.loss_weighting=none (flow weights t by its sampling)"),
    (["generator.noise_scheduler.prediction_type=epsilon"],  # the key that named the objective before
     "generator.noise_scheduler.prediction_type=epsilon disagrees with generator.objective=v_prediction; the "
     "objective names the prediction: set generator.objective=epsilon and not the scheduler's prediction_type"),
])
def test_settings_that_contradict_the_objective_are_one_line(tmp_path, overrides, message) -> None:
    cfg = compose_train(tmp_path, ["debug=smoke", *overrides])
    check_config(cfg)
    with pytest.raises(Exception) as error:
        instantiate(cfg.generator)
    cause = root_cause(error.value)  # Hydra wraps constructor errors; the command line prints the cause
    assert isinstance(cause, ConfigError) and str(cause) == message


def test_a_generator_without_objective_takes_its_schedulers_prediction() -> None:
    """Checkpoints written before `objective` existed carry their prediction type in the noise scheduler."""
    generator = flow_generator(noise_scheduler=DDPMScheduler(prediction_type="epsilon"), objective=None)
    assert generator.objective == "epsilon" and generator.flow is None


def test_the_diffusion_transformer_trains_and_samples_with_flow(tmp_path) -> None:
    """`generator=dit generator.objective=flow`: the objective is the generator's, whichever denoiser it calls."""
    cfg = compose_train(tmp_path, ["debug=smoke", "generator=dit", "generator.objective=flow"])
    check_config(cfg)
    torch.manual_seed(0)
    generator = instantiate(cfg.generator, image_size=16)
    head = TokenProjection(TEXT_DIM, cfg.generator.cond_dim)
    loss = generator.training_loss(torch.rand(4, 3, 16, 16) * 2 - 1, text(), head)
    loss.backward()
    assert torch.isfinite(loss) and head.proj[-1].weight.grad.abs().sum() > 0
    images = generator.sample(text(), null(), head, [torch.Generator().manual_seed(s) for s in range(4)], steps=2)
    assert images.shape == (4, 3, 16, 16) and isinstance(generator.make_sampler(), FlowMatchEulerDiscreteScheduler)


@pytest.mark.parametrize("objective", ["flow", "epsilon"])
def test_every_listed_sampler_samples_through_the_runtime(objective: str) -> None:
    generator = flow_generator(objective=objective, flow=RectifiedFlow() if objective == "flow" else None)
    head, seeds = TokenProjection(TEXT_DIM, COND_DIM), [torch.Generator().manual_seed(0) for _ in range(2)]
    names = generator.sampler_names()
    own = "FlowMatchEulerDiscreteScheduler" if objective == "flow" else "DPMSolverMultistepScheduler"
    assert names[0] == own and len(names) == len(set(names))
    assert ("FlowMatchHeunDiscreteScheduler" in names) == (objective == "flow") and len(names) >= 2
    for name in names:
        assert type(generator.make_sampler(name)).__name__ == name
        images = generator.sample(text(2), null(2), head, seeds, steps=4, sampler=name)  # PNDM needs 4
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all(), name
    with pytest.raises(ConfigError, match=f"^sampler=DDIM is not a sampler of this model's .* use one of {own}, "):
        generator.make_sampler("DDIM")


def test_a_sampler_that_cannot_take_so_few_steps_says_so() -> None:
    generator = flow_generator(objective="epsilon", flow=None)
    head, seeds = TokenProjection(TEXT_DIM, COND_DIM), [torch.Generator().manual_seed(0) for _ in range(2)]
    with pytest.raises(ConfigError, match=r"^PNDMScheduler cannot sample in 3 steps \(.*\); give more steps or another"):
        generator.sample(text(2), null(2), head, seeds, steps=3, sampler="PNDMScheduler")
