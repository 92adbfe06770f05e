"""Fusion head, diffusion generator, the shared LightningModule's text side, and EMA."""

import pytest
import torch
from hydra.utils import get_class
from diffusers import DDPMScheduler, UNet2DConditionModel
from functools import partial

from text2img.callbacks.ema import warmup_ema_
from text2img.conditioning import TextConditioner
from text2img.encoders.tiny import TinyEncoder
from text2img.errors import ConfigError
from text2img.fusion import TokenProjection
from text2img.generators import check_compatible
from text2img.generators import DiffusionGenerator
from text2img.generators.flow import RectifiedFlow
from text2img.lightning import Text2ImgModule
from text2img.types import TextEmbedding

TEXT_DIM, COND_DIM = 24, 32


def tiny_generator(**kwargs) -> DiffusionGenerator:
    torch.manual_seed(0)
    unet = partial(
        UNet2DConditionModel,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )
    defaults = dict(
        unet=unet,
        noise_scheduler=DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction"),
        sampler=get_class("diffusers.DPMSolverMultistepScheduler"),
        image_size=16,
        cond_dim=COND_DIM,
        patch_size=2,
        sample_steps=3,
    )
    return DiffusionGenerator(**(defaults | kwargs))


def text(batch: int = 4, length: int = 6, real: int = 4) -> TextEmbedding:
    torch.manual_seed(1)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, :real] = True
    tokens = torch.randn(batch, length, TEXT_DIM) * mask[..., None]
    return TextEmbedding(tokens, mask, torch.randn(batch, TEXT_DIM))


def test_token_projection_shapes_and_padding():
    head = TokenProjection(TEXT_DIM, COND_DIM, hidden_dim=16)
    cond = head(text())
    assert cond.tokens.shape == (4, 6, COND_DIM) and cond.vector.shape == (4, COND_DIM)
    assert torch.equal(cond.mask, text().mask)
    assert cond.tokens[:, 4:].abs().max() == 0  # padding stays zero
    assert cond.tokens[:, :4].abs().min() > 0
    # the vector is the mean over real tokens only
    torch.testing.assert_close(cond.vector, cond.tokens[:, :4].mean(1))


def test_token_projection_rejects_unknown_norm():
    with pytest.raises(ValueError, match="fusion.norm='batch'"):
        TokenProjection(TEXT_DIM, COND_DIM, norm="batch")


def test_compatibility_check_names_both_options():
    with pytest.raises(ConfigError, match="fusion=token_projection with generator=diffusion: .* 48 .* 32"):
        check_compatible(TokenProjection(TEXT_DIM, 48), tiny_generator(), "token_projection", "diffusion")

    class VectorOnly(TokenProjection):
        produces = frozenset({"vector"})

    with pytest.raises(ConfigError, match="produces \\['vector'\\] but the generator consumes \\['tokens'\\]"):
        check_compatible(VectorOnly(TEXT_DIM, COND_DIM), tiny_generator(), "vector_only", "diffusion")


def test_training_loss_reaches_unet_and_fusion():
    generator, head = tiny_generator(), TokenProjection(TEXT_DIM, COND_DIM)
    loss = generator.training_loss(torch.rand(4, 3, 16, 16) * 2 - 1, text(), head)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert head.proj[-1].weight.grad.abs().sum() > 0
    assert generator.denoiser.unet.conv_in.weight.grad.abs().sum() > 0


# the two mixed combinations (~3 s each) only with SLOW=1: each of their parts falls in the fast pair; flow
# (rectified flow) measured 2.20 -> 0.79 in 60 steps
@pytest.mark.parametrize(("prediction", "weighting"), [
    ("epsilon", "none"), ("v_prediction", "min_snr"), ("flow", "none"),
    pytest.param("v_prediction", "none", marks=pytest.mark.slow), pytest.param("epsilon", "min_snr", marks=pytest.mark.slow),
])
def test_loss_falls_on_a_fixed_batch(prediction, weighting):
    generator = tiny_generator(
        noise_scheduler=DDPMScheduler(num_train_timesteps=100, prediction_type=prediction), loss_weighting=weighting,
        objective=prediction, flow=RectifiedFlow(),
    )
    head = TokenProjection(TEXT_DIM, COND_DIM)
    optimizer = torch.optim.Adam([*generator.parameters(), *head.parameters()], lr=3e-3)
    images = torch.zeros(8, 3, 16, 16)
    images[:, 0, 4:12, 4:12] = 1.0  # a red square on black
    batch = text(8)

    def mean_loss(n: int = 8) -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return sum(float(generator.training_loss(images, batch, head)) for _ in range(n)) / n

    before = mean_loss()
    for _ in range(80):
        loss = generator.training_loss(images, batch, head)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert mean_loss() < 0.6 * before


def test_sample_shape_range_and_seed():
    generator, head = tiny_generator(), TokenProjection(TEXT_DIM, COND_DIM)
    null = TextEmbedding(torch.zeros(4, 1, TEXT_DIM), torch.ones(4, 1, dtype=torch.bool), torch.zeros(4, TEXT_DIM))

    def sample(seed: int, **kwargs) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(4)]
        return generator.sample(text(), null, head, generators, **kwargs)

    images = sample(0)
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, sample(0))
    assert not torch.equal(images, sample(1))
    assert not torch.equal(images, sample(0, guidance_scale=1.0))


def test_a_sample_does_not_depend_on_its_batch():
    generator, head = tiny_generator(), TokenProjection(TEXT_DIM, COND_DIM)
    prompts = text()
    null = TextEmbedding(torch.zeros(4, 1, TEXT_DIM), torch.ones(4, 1, dtype=torch.bool), torch.zeros(4, TEXT_DIM))
    together = generator.sample(prompts, null, head, [torch.Generator().manual_seed(s) for s in range(4)])
    alone = generator.sample(prompts[2:3], null[2:3], head, [torch.Generator().manual_seed(2)])
    # what DDP equality of the metrics rests on: sample 2 is the same image in a batch of 4 or of 1
    torch.testing.assert_close(alone[0], together[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"guidance_scale": 0.5}, "guidance_scale=0.5 is below 1"), ({"steps": 0}, "steps=0 is out of range; use 1..100")],
)
def test_sampling_arguments_are_checked(kwargs, message):
    generator, head = tiny_generator(), TokenProjection(TEXT_DIM, COND_DIM)
    with pytest.raises(ConfigError, match=message):
        generator.sample(text(), text(), head, [torch.Generator()] * 4, **kwargs)


def test_patch_size_must_divide_image_size():
    with pytest.raises(ConfigError, match="patch_size=3 does not divide .* size 16; use one of 1, 2, 4, 8, 16"):
        tiny_generator(patch_size=3)


def make_module(caption_dropout: float) -> Text2ImgModule:
    fusion, generator = TokenProjection(TEXT_DIM, COND_DIM), tiny_generator()
    return Text2ImgModule(
        fusion=fusion,
        generator=generator,
        conditioner=TextConditioner(TinyEncoder(TEXT_DIM), "unused", caption_dropout=caption_dropout),
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
    )


def test_generate_is_reproducible_and_in_unit_range():
    module = make_module(0.1).eval()
    images = module.generate(text(2), seeds=[7, 8])
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, module.generate(text(2), seeds=[7, 8]))
    with pytest.raises(ValueError, match="got 1 seeds for 2 prompts"):
        module.generate(text(2), seeds=[7])


def test_warmup_ema_follows_early_weights_then_caps_the_decay():
    averaged, current = [torch.zeros(3), torch.zeros(2)], [torch.ones(3), torch.ones(2)]
    warmup_ema_(averaged, current, torch.tensor(1), decay=0.999)
    assert torch.allclose(averaged[0], torch.full((3,), 1 - 2 / 11))  # decay (1+1)/(10+1)
    assert torch.allclose(averaged[1], torch.full((2,), 1 - 2 / 11))
    late = [torch.zeros(3)]
    warmup_ema_(late, [torch.ones(3)], torch.tensor(100_000), decay=0.999)
    assert torch.allclose(late[0], torch.full((3,), 0.001))


def test_ema_passes_over_frozen_weights():
    """A frozen weight (a LoRA base) is never averaged: its copy from the first step is its average; integer
    tensors are copied."""
    from text2img.callbacks import EMA

    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    module[0].requires_grad_(False)
    ema = EMA()
    ema.on_train_start(None, module)
    frozen_copy, trainable_copy = torch.zeros(2, 2), torch.zeros(2, 2)
    current = [module[0].weight.detach(), module[1].weight.detach()]
    ema._average([frozen_copy, trainable_copy], current, torch.tensor(1))
    assert torch.equal(frozen_copy, torch.zeros(2, 2))
    assert torch.allclose(trainable_copy, module[1].weight.detach() * (1 - 2 / 11))  # decay (1+1)/(10+1)
    # integer buffers (BERT's position ids) are copied: lerp is not defined for them
    ids_copy = torch.zeros(4, dtype=torch.long)
    ema._average([ids_copy], [torch.arange(4)], torch.tensor(1))
    assert torch.equal(ids_copy, torch.arange(4))


def test_ema_callback_averages_during_training(tmp_path, imagefolder):
    """The checkpoint's state_dict holds the average; the raw weights are kept for resuming."""
    from conftest import compose_train, smoke_overrides
    from text2img.train import train

    train(compose_train(tmp_path, smoke_overrides(imagefolder, "test=false")))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == raw.keys()
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged)
