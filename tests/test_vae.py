"""The VAE backend: conditioning, loss, sampling, one optimisation step, and a run through text2img.train."""

import math
from functools import partial

import pytest
import torch
from conftest import compose_train, smoke_overrides
from diffusers import AutoencoderKL

from text2img.conditioning import TextConditioner
from text2img.encoders import TinyEncoder
from text2img.errors import ConfigError
from text2img.fusion import TokenProjection
from text2img.generators import VAEGenerator, check_compatible
from text2img.generators.vae import EffNetPerceptualLoss
from text2img.lightning import Text2ImgModule
from text2img.train import train
from text2img.types import TextEmbedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT_DIM, COND_DIM, SIZE = 24, 32, 16


def tiny_vae(**kwargs) -> VAEGenerator:
    torch.manual_seed(0)
    autoencoder = partial(
        AutoencoderKL,
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        mid_block_add_attention=False,
    )
    defaults = {"autoencoder": autoencoder, "image_size": SIZE, "cond_dim": COND_DIM, "cond_channels": 8}
    return VAEGenerator(**(defaults | kwargs))


def text(batch: int = 4, seed: int = 1) -> TextEmbedding:
    torch.manual_seed(seed)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    return TextEmbedding(torch.randn(batch, 5, TEXT_DIM), mask, torch.randn(batch, TEXT_DIM))


def squares(batch: int = 8) -> torch.Tensor:
    """Coloured squares on white at different places, in [-1, 1]."""
    images = torch.ones(batch, 3, SIZE, SIZE)
    for i in range(batch):
        x, y = 2 + (i * 3) % 8, 2 + (i * 5) % 8
        images[i, :, y : y + 6, x : x + 6] = torch.tensor([1.0, -1.0, -1.0]).roll(i)[:, None, None]
    return images


def head() -> TokenProjection:
    torch.manual_seed(2)
    return TokenProjection(TEXT_DIM, COND_DIM)


def sample(generator: VAEGenerator, prompts: TextEmbedding, seeds, fusion=None, **kwargs) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return generator.sample(prompts, prompts, fusion or head(), generators, **kwargs)


def test_unconditional_variant_is_exactly_an_autoencoder_kl(tmp_path):
    generator = tiny_vae(conditional=False).eval()
    assert type(generator.autoencoder) is AutoencoderKL
    assert not hasattr(generator, "text_to_map")
    generator.autoencoder.save_pretrained(tmp_path)
    reloaded = AutoencoderKL.from_pretrained(tmp_path)
    images = squares(2)
    expected = reloaded.decode(reloaded.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    torch.testing.assert_close(generator.reconstruct(images, text(2), head()), expected)


def test_conditional_variant_starts_from_the_standard_prior_and_feeds_the_text_to_the_decoder():
    generator, fusion = tiny_vae(), head()
    assert generator.autoencoder.decoder.conv_in.in_channels == 4 + 8  # latent + text map
    prior = generator.prior(fusion(text(3)).vector)
    assert prior.mean.shape == (3, 4, SIZE // 2, SIZE // 2)
    assert torch.equal(prior.mean, torch.zeros_like(prior.mean))
    assert torch.equal(prior.std, torch.ones_like(prior.std))


def test_compatibility_with_heads():
    class TokensOnly(TokenProjection):
        produces = frozenset({"tokens"})

    check_compatible(head(), tiny_vae(), "token_projection", "vae")
    check_compatible(TokensOnly(TEXT_DIM, COND_DIM), tiny_vae(conditional=False), "tokens_only", "vae")
    with pytest.raises(ConfigError, match=r"produces \['tokens'\] but the generator consumes \['vector'\]"):
        check_compatible(TokensOnly(TEXT_DIM, COND_DIM), tiny_vae(), "tokens_only", "vae")


@pytest.mark.parametrize("conditional", [True, False])
def test_samples_shape_range_dtype_and_seeds(conditional):
    generator = tiny_vae(conditional=conditional).eval()
    prompts = text(4)
    images = sample(generator, prompts, range(4))
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0
    assert torch.equal(images, sample(generator, prompts, range(4)))
    assert not torch.equal(images, sample(generator, prompts, range(1, 5)))
    # image 2 depends only on its seed and text, not on the batch it is drawn in
    torch.testing.assert_close(sample(generator, prompts[2:3], [2])[0], images[2], atol=1e-5, rtol=0)
    # the conditional decoder follows the text; the unconditional one ignores it
    other = sample(generator, text(4, seed=9), range(4))
    assert (not torch.allclose(other, images, atol=1e-3)) if conditional else torch.equal(other, images)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"guidance_scale": 3.0}, "guidance_scale=3.0 does not apply to generator=vae"),
     ({"steps": 20}, "steps=20 does not apply to generator=vae")],
)
def test_sampling_arguments_that_do_not_apply_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        sample(tiny_vae(), text(2), range(2), **kwargs)
    sample(tiny_vae(), text(2), range(2), guidance_scale=1.0)  # no guidance is fine


@pytest.mark.parametrize(
    "kwargs, message",
    [({"kl_weight": -1.0}, "kl_weight=-1.0 is negative"),
     ({"image_size": 13}, "downsampling 2x.*image_size=13"),
     ({"reconstruction": "l2"}, "reconstruction='l2' is unknown; use one of l1, mse")],
)
def test_bad_settings_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        tiny_vae(**kwargs)


def module(conditional: bool) -> Text2ImgModule:
    return Text2ImgModule(
        fusion=head(),
        generator=tiny_vae(conditional=conditional),
        conditioner=TextConditioner(TinyEncoder(hidden_size=TEXT_DIM), "unused", caption_dropout=0.0),
        optimizer=partial(torch.optim.Adam, lr=1e-3),
        lr_scheduler=None,
    )


@pytest.mark.parametrize("conditional", [True, False])
def test_optimisation_changes_the_vae_and_head_and_nothing_else(conditional):
    from text2img.types import Batch

    model = module(conditional)
    optimizer = model.configure_optimizers()["optimizer"]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # two steps: the prior's output layer starts at zero, so its first layer gets gradients from the second on
    for _ in range(2):
        loss = model.training_step(Batch(squares(4), ["a red square"] * 4), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    generator = {name for name in before if name.startswith("generator.")}
    fusion = {name for name in before if name.startswith("fusion.")}
    # without caption dropout nothing reaches the null embedding; the unconditional VAE never reads the text
    assert changed == (generator | fusion if conditional else generator)
    assert any(".text_to_prior." in name for name in changed) == conditional


def test_reconstruction_error_falls_on_a_fixed_batch():
    generator, fusion = tiny_vae(kl_weight=1e-4), head()
    images, prompts = squares(8), text(8)

    def error() -> float:
        return float((generator.reconstruct(images, prompts, fusion) - images).abs().mean())

    before = error()
    optimizer = torch.optim.Adam([*generator.parameters(), *fusion.parameters()], lr=2e-3)
    for _ in range(40):
        loss = generator.training_loss(images, prompts, fusion)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert error() < 0.5 * before
    # the text-conditional prior has moved towards the posteriors of its captions' images
    with torch.no_grad():
        posterior = generator.autoencoder.encode(images).latent_dist
        learned = posterior.kl(generator.prior(fusion(prompts).vector)).mean()
        assert learned < 0.9 * posterior.kl().mean()


@torch.no_grad()
def test_kl_term_is_added_with_its_weight():
    images, prompts, fusion = squares(4), text(4), head()
    # tiny_vae seeds the weights and the posterior noise that follows: the losses differ by the KL term only
    plain, weighted, doubled = (
        float(tiny_vae(kl_weight=w).training_loss(images, prompts, fusion)) for w in (0, 5, 10)
    )
    assert weighted > plain
    assert doubled - plain == pytest.approx(2 * (weighted - plain), rel=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("conditional", [True, False])
def test_reconstruction_error_is_the_chosen_one(conditional):
    images, prompts, fusion = squares(4), text(4), head()
    losses = {}
    for error in ("l1", "mse"):
        generator = tiny_vae(kl_weight=0.0, reconstruction=error, conditional=conditional)
        torch.manual_seed(1)  # the same posterior noise for both
        losses[error] = float(generator.training_loss(images, prompts, fusion))
    # the same weights and noise give the same reconstruction: recompute it and take both errors of it
    torch.manual_seed(1)
    posterior = generator.autoencoder.encode(images).latent_dist
    vector = generator.text_vector(prompts, fusion)
    difference = generator.decode(posterior.sample(), vector) - images
    assert losses["l1"] == pytest.approx(float(difference.abs().mean()), rel=1e-5)
    assert losses["mse"] == pytest.approx(float(difference.square().mean()), rel=1e-5)


def test_perceptual_loss_is_differentiable_and_frozen():
    perceptual = EffNetPerceptualLoss(weight=1.0, input_size=32)
    images = squares(2)
    assert float(perceptual(images, images)) == 0.0
    blurred = torch.nn.functional.avg_pool2d(images, 3, 1, 1).requires_grad_(True)
    distance = perceptual(blurred, images)
    distance.backward()
    assert distance > 0 and blurred.grad.abs().sum() > 0
    network = perceptual.extractor
    assert all(p.grad is None and not p.requires_grad for p in network.parameters())
    assert not network.training  # BatchNorm keeps its pretrained statistics
    with pytest.raises(ConfigError, match="stages=\\[0\\] are out of range"):
        EffNetPerceptualLoss(stages=(0,))


@torch.no_grad()
def test_perceptual_term_adds_to_the_loss():
    images, prompts, fusion = squares(4), text(4), head()
    plain = float(tiny_vae().training_loss(images, prompts, fusion))
    generator = tiny_vae(perceptual=EffNetPerceptualLoss(weight=1.0, input_size=32))
    assert float(generator.training_loss(images, prompts, fusion)) > plain
    # the network is an instrument: not in the generator's weights, checkpoint or EMA
    assert generator.state_dict().keys() == tiny_vae().state_dict().keys()


def test_fast_dev_run(tmp_path, imagefolder):
    cfg = compose_train(tmp_path, smoke_overrides(imagefolder, "generator=vae", "trainer.fast_dev_run=true"))
    fid = train(cfg)  # one training, one validation and one test batch
    assert fid is not None and math.isfinite(fid)


def test_smoke_run_with_perceptual_loss_logs_reconstruction_quality(tmp_path, imagefolder):
    perceptual = "{_target_: text2img.generators.vae.EffNetPerceptualLoss, weight: 0.1, input_size: 32}"
    overrides = ["generator=vae", "logger=csv", "metrics=[image,reconstruction]", f"generator.perceptual={perceptual}"]
    cfg = compose_train(tmp_path, smoke_overrides(imagefolder, *overrides))
    train(cfg)
    log = (tmp_path / "csv" / "metrics.csv").read_text()
    header, *rows = log.splitlines()
    assert {"val/psnr", "val/ssim", "test/psnr", "test/ssim", "train/loss"} <= set(header.split(","))
    column = header.split(",").index("test/psnr")
    (psnr,) = [float(row.split(",")[column]) for row in rows if row.split(",")[column]]
    assert math.isfinite(psnr) and psnr > 5
