"""generator=gan: the DF-GAN-style networks and losses, and their training by AdversarialModule (manual
optimisation, alternating discriminator and generator steps, resume); non-finite losses: test_nonfinite.py."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import compose_train, smoke_overrides
from text2img.errors import ConfigError
from text2img.fusion import TokenProjection
from text2img.generators import GANGenerator
from text2img.lightning.adversarial import LiTAlignmentLoss
from text2img.networks import EfficientNetLite0Features, LiTConfig, LiTEvaluator
from text2img.run.compose import build
from text2img.train import train
from text2img.types import TextEmbedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT_DIM, COND_DIM, SIZE = 24, 16, 16


def tiny_gan(**kwargs) -> GANGenerator:
    torch.manual_seed(0)
    defaults = dict(
        image_size=SIZE, cond_dim=COND_DIM, text_dim=TEXT_DIM, width=8, max_width_multiplier=2, noise_dim=8,
        discriminator_width=8, discriminator_text_features=8,
    )
    return GANGenerator(**(defaults | kwargs))


def text(batch: int = 4, length: int = 5, seed: int = 1) -> TextEmbedding:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, 3:] = False
    tokens = torch.randn(batch, length, TEXT_DIM, generator=generator) * mask[..., None]
    return TextEmbedding(tokens, mask, torch.randn(batch, TEXT_DIM, generator=generator))


def images(batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1


def seeded(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


# --- networks and losses ---------------------------------------------------------------------------------


def test_samples_have_shape_range_dtype_and_do_not_depend_on_their_batch():
    gan, head = tiny_gan(), TokenProjection(TEXT_DIM, COND_DIM)
    prompts = text()
    samples = gan.sample(prompts, prompts, head, seeded(range(4)))
    assert samples.shape == (4, 3, SIZE, SIZE) and samples.dtype == torch.float32
    assert samples.min() >= -1 and samples.max() <= 1 and samples.std() > 0
    alone = gan.sample(prompts[2:3], prompts[2:3], head, seeded([2]))
    torch.testing.assert_close(alone[0], samples[2], atol=1e-5, rtol=0)
    assert not torch.allclose(samples, gan.sample(prompts, prompts, head, seeded(range(10, 14))))


@pytest.mark.parametrize("kwargs", [{"guidance_scale": 3.0}, {"steps": 20}])
def test_sampling_options_of_diffusion_are_refused(kwargs):
    gan, head = tiny_gan(), TokenProjection(TEXT_DIM, COND_DIM)
    with pytest.raises(ConfigError, match="does not apply to generator=gan.*leave it unset"):
        gan.sample(text(), text(), head, seeded(range(4)), **kwargs)
    assert gan.sample(text(), text(), head, seeded(range(4)), guidance_scale=1.0).shape == (4, 3, SIZE, SIZE)


def test_discriminator_loss_is_the_sum_of_hinges_and_the_matching_aware_penalty():
    gan, head = tiny_gan(gp_weight=2.0, gp_power=6.0), TokenProjection(TEXT_DIM, COND_DIM)
    # make the discriminator's logits and gradients non-trivial (its residual gates start at zero)
    for block in gan.discriminator.blocks:
        block.gate.data.fill_(1.0)
    real, prompts = images(), text()
    fake = gan.fake(prompts, head, torch.randn(4, 8))
    loss = gan.discriminator_loss(real, fake, prompts)
    disc = gan.discriminator
    with torch.no_grad():
        own = disc(real, prompts)
        rolled = disc.logits(disc.image_features(real), disc.text_features(prompts).roll(1, 0))
        faked = disc(fake, prompts)
    torch.testing.assert_close(loss.real, F.relu(1 - own).mean())
    torch.testing.assert_close(loss.mismatch, F.relu(1 + rolled).mean())
    torch.testing.assert_close(loss.fake, F.relu(1 + faked).mean())
    # MA-GP from scratch: gradient of D(real, text) w.r.t. the image and the discriminator's text features
    x = real.clone().requires_grad_(True)
    t = disc.text_features(prompts)
    grads = torch.autograd.grad(disc.logits(disc.image_features(x), t).sum(), (x, t))
    norm = torch.cat([g.flatten(1) for g in grads], 1).norm(dim=1)
    assert loss.gradient_penalty > 0
    torch.testing.assert_close(loss.gradient_penalty, 2.0 * norm.pow(6).mean())
    torch.testing.assert_close(loss.total, loss.real + (loss.fake + loss.mismatch) / 2 + loss.gradient_penalty)
    # the penalty is trained: it alone gives the discriminator gradients
    loss.gradient_penalty.backward()
    assert disc.stem.weight.grad.abs().sum() > 0


def test_mismatched_pairs_skip_rows_whose_rolled_caption_is_their_own():
    gan = tiny_gan()
    for block in gan.discriminator.blocks:
        block.gate.data.fill_(1.0)
    real = images()
    distinct = text()
    same = distinct[[0, 0, 0, 0]]
    fake = torch.zeros_like(real)
    assert gan.discriminator_loss(real, fake, same).mismatch == 0  # every row's rolled caption is its own
    assert gan.discriminator_loss(real, fake, distinct).mismatch > 0
    # two captions, each twice: rows 0 and 2 (rolled onto an equal caption) are left out
    pairs = distinct[[0, 0, 1, 1]]
    disc = gan.discriminator
    with torch.no_grad():
        rolled = disc.logits(disc.image_features(real), disc.text_features(pairs).roll(1, 0))
    torch.testing.assert_close(gan.discriminator_loss(real, fake, pairs).mismatch, F.relu(1 + rolled[[0, 2]]).mean())


def test_the_discriminator_judges_the_pair_so_shuffled_captions_change_its_loss():
    gan = tiny_gan()
    for block in gan.discriminator.blocks:
        block.gate.data.fill_(1.0)
    real, prompts = images(), text()
    fake = torch.zeros_like(real)
    before = gan.discriminator_loss(real, fake, prompts)
    after = gan.discriminator_loss(real, fake, prompts[[2, 0, 3, 1]])
    assert not torch.allclose(before.real, after.real)
    assert not torch.allclose(before.mismatch, after.mismatch)


def test_generator_loss_reaches_the_generator_and_the_fusion_head():
    gan, head = tiny_gan(), TokenProjection(TEXT_DIM, COND_DIM)
    prompts = text()
    # FiLM starts as the identity (zero last layer), so the text's gradient opens after the first step: open it
    for module in gan.net.modules():
        if hasattr(module, "mlp"):
            torch.nn.init.normal_(module.mlp[-1].weight, std=0.1)
    loss = gan.generator_loss(gan.fake(prompts, head, torch.randn(4, 8)), prompts)
    loss.backward()
    assert torch.isfinite(loss)
    assert gan.net.stem.weight.grad.abs().sum() > 0
    assert head.proj[-1].weight.grad.abs().sum() > 0
    assert gan.net.blocks[0].fuse_in.first.mlp[-1].weight.grad.abs().sum() > 0  # FiLM learns from the text


def test_film_starts_as_the_identity():
    block = tiny_gan().net.blocks[0].fuse_in.first
    x = torch.randn(2, block.mlp[-1].out_features // 2, 4, 4)
    torch.testing.assert_close(block(x, torch.randn(2, block.mlp[0].in_features)), x)


def test_cross_attention_on_tokens_is_optional():
    gan, head = tiny_gan(attention=True, attention_resolution=8, attention_heads=2), TokenProjection(TEXT_DIM, COND_DIM)
    assert gan.requires == {"vector", "tokens"} and tiny_gan().requires == {"vector"}
    gan.net.attention.gate.data.fill_(1.0)
    prompts = text()
    loss = gan.generator_loss(gan.fake(prompts, head, torch.randn(4, 8)), prompts)
    loss.backward()
    assert gan.net.attention.attention.in_proj_weight.grad.abs().sum() > 0
    # padding tokens are masked out: changing them changes nothing
    padded = TextEmbedding(prompts.tokens.clone(), prompts.mask, prompts.pooled)
    padded.tokens[:, 3:] = 5.0
    with torch.no_grad():
        cond, cond_padded = head(prompts), head(padded)
        torch.testing.assert_close(gan.net(torch.zeros(4, 8), cond), gan.net(torch.zeros(4, 8), cond_padded))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 24}, "image_size=24 cannot be reached by doubling"),
        ({"attention": True, "attention_resolution": 32}, "attention_resolution=32 is not a resolution"),
    ],
)
def test_bad_sizes_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        tiny_gan(**kwargs)


def test_alignment_term_is_finite_and_trains_the_generator():
    gan, head = tiny_gan(), TokenProjection(TEXT_DIM, COND_DIM)
    torch.manual_seed(0)
    evaluator = LiTEvaluator(LiTConfig(whiten_dim=0, width=16, mlp_hidden=32), 1280, TEXT_DIM).requires_grad_(False)
    alignment = LiTAlignmentLoss(evaluator, EfficientNetLite0Features())
    prompts = text(2)
    loss = alignment(gan.fake(prompts, head, torch.randn(2, 8)), prompts)
    assert torch.isfinite(loss) and 0 <= loss <= 2
    loss.backward()
    assert gan.net.to_rgb.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in evaluator.parameters())


# --- training with AdversarialModule ------------------------------------------------------------------------


class StepRecorder(L.Callback):
    """Records which optimiser stepped, in order, the parameters each step changed, and the batch's losses."""

    def __init__(self):
        self.order: list[str] = []
        self.changed: list[set[str]] = []
        self.losses: list[dict[str, float]] = []
        self._snapshot: dict[str, torch.Tensor] | None = None

    def _close_step(self, module):
        if self._snapshot is not None:
            self.changed.append(
                {name for name, p in module.named_parameters() if not torch.equal(p.detach(), self._snapshot[name])}
            )

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self._close_step(module)
        self.order.append("generator" if optimizer is trainer.optimizers[0] else "discriminator")
        self._snapshot = {name: p.detach().clone() for name, p in module.named_parameters()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._close_step(module)
        self._snapshot = None
        self.losses.append({name: float(value) for name, value in outputs.items()})


def test_steps_alternate_and_each_changes_only_its_own_side(tmp_path, imagefolder):
    cfg = compose_train(tmp_path, smoke_overrides(imagefolder, "generator=gan", "trainer.max_steps=6", "test=false"))
    run = build(cfg)
    recorder = StepRecorder()
    run.trainer.callbacks.append(recorder)
    run.trainer.fit(run.model, datamodule=run.datamodule)

    assert run.trainer.global_step == 6  # 3 batches, 2 optimiser steps each
    assert recorder.order == ["discriminator", "generator"] * 3
    assert len(recorder.losses) == 3
    assert all(math.isfinite(v) for losses in recorder.losses for v in losses.values())
    names = [name for name, _ in run.model.named_parameters()]
    discriminator = {n for n in names if n.startswith("generator.discriminator.")}
    generator_side = {n for n in names if n.startswith(("generator.net.", "fusion."))}
    # each step changes only its own side; over the run, all of it (zero-initialised FiLM layers and residual
    # gates leave some weights without a gradient at the very first step)
    for kind in ("discriminator", "generator"):
        side = discriminator if kind == "discriminator" else generator_side
        changes = [changed for k, changed in zip(recorder.order, recorder.changed) if k == kind]
        assert all(changed and changed <= side for changed in changes), kind
        assert set().union(*changes) == side, kind
    # with no caption dropout the null embedding is never used, so never changed
    assert not any(n.startswith("null_") for changed in recorder.changed for n in changed)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fast_dev_run_through_train(tmp_path, imagefolder, precision):
    cfg = compose_train(tmp_path, smoke_overrides(imagefolder, "generator=gan", "trainer.fast_dev_run=true",
                                                  f"trainer.precision={precision}"))
    assert cfg.model._target_ == "text2img.lightning.AdversarialModule"
    value = train(cfg)
    assert value is not None and math.isfinite(value)


class FirstBatch(L.Callback):
    """The global step and both optimisers' Adam step counts when training (re)starts."""

    def __init__(self):
        self.state = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.state is None:
            counts = [int(next(iter(opt.state.values()))["step"]) if opt.state else 0 for opt in trainer.optimizers]
            self.state = (trainer.global_step, counts)


def test_checkpoint_resumes_at_its_step_with_both_optimisers(tmp_path, imagefolder):
    first = compose_train(tmp_path / "a", smoke_overrides(imagefolder, "generator=gan", "trainer.max_steps=6",
                                                          "test=false"))
    run = build(first)
    # Lightning refuses a clip value with manual optimisation: the module clips with it instead
    assert run.trainer.gradient_clip_val is None and run.model.gradient_clip_val == first.trainer.gradient_clip_val == 1.0
    run.trainer.fit(run.model, datamodule=run.datamodule)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert saved["global_step"] == 6
    generator_state, discriminator_state = saved["optimizer_states"]
    assert [g["lr"] for g in generator_state["param_groups"] + discriminator_state["param_groups"]] == [1e-4, 4e-4]
    assert all(int(s["step"]) == 3 for opt in saved["optimizer_states"] for s in opt["state"].values())
    # the checkpoint's weights are the EMA of the generator side; the raw ones are kept for resuming
    name = "generator.net.to_rgb.weight"
    assert not torch.equal(saved["state_dict"][name], saved["current_model_state"][name])

    resumed = compose_train(tmp_path / "b", smoke_overrides(imagefolder, "generator=gan", "trainer.max_steps=10",
                                                            "test=false"))
    run = build(resumed)
    probe = FirstBatch()
    run.trainer.callbacks.append(probe)
    run.trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=str(ckpt))
    assert probe.state == (6, [3, 3])
    assert run.trainer.global_step == 10


def test_adversarial_module_needs_a_gan(tmp_path, imagefolder):
    with pytest.raises(SystemExit, match="model=gan trains adversarial generators but got DiffusionGenerator"):
        train(compose_train(tmp_path, smoke_overrides(imagefolder, "model=gan")))
