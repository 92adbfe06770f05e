"""The patch-PCA first stage: a linear code of image patches fitted to the training images, in latent diffusion,
its checkpoints and its export."""

from pathlib import Path

import pytest
import torch
from conftest import compose_train, smoke_overrides, write_imagefolder

from text2img.data.imagefolder import ImageFolderSource
from text2img.errors import ConfigError
from text2img.generators.first_stage import FirstStage, load_first_stage, patch_pca_first_stage
from text2img.generators.latent_diffusion import LatentDiffusionGenerator
from text2img.generators.patch_autoencoder import PatchAutoencoder
from text2img.run.compose import build_model, load_model
from text2img.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A refiner small and short enough for a smoke run, so that checkpoints and exports are tested with its weights.
SMALL_REFINER = ("generator.first_stage.refiner_width=8", "generator.first_stage.refiner_steps=5")


def correlated_images(n: int = 64, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] whose patches have structure: smooth colour fields plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=generator) * 2 - 1
    smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return (smooth + 0.05 * torch.randn(n, 3, size, size, generator=generator)).clamp(-1, 1)


def test_the_code_is_orthonormal_whitened_and_a_projection():
    images = correlated_images()
    autoencoder = PatchAutoencoder(latent_channels=8, patch_size=4).fit([images])
    components = autoencoder.components.detach()
    torch.testing.assert_close(components @ components.T, torch.eye(8), atol=1e-5, rtol=0)
    latents = autoencoder.encode(images).latent_dist.mean
    assert latents.shape == (64, 8, 4, 4)
    # whitened: every channel has zero mean and unit variance over the fitted patches
    torch.testing.assert_close(latents.mean(dim=(0, 2, 3)), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(latents.var(dim=(0, 2, 3), unbiased=False), torch.ones(8), atol=1e-3, rtol=0)
    # the components come in order of the variance they explain
    assert (autoencoder.scales[:-1] >= autoencoder.scales[1:]).all()
    # decode(encode(x)) is x's projection on the components' span: projecting it again changes nothing
    rebuilt = autoencoder.decode(latents).sample
    again = autoencoder.decode(autoencoder.encode(rebuilt).latent_dist.mean).sample
    torch.testing.assert_close(again, rebuilt, atol=1e-5, rtol=0)
    # and the more components, the closer to the image; all 48 of a 4x4 RGB patch give it back
    def reconstruction_error(channels: int) -> float:
        code = PatchAutoencoder(latent_channels=channels).fit([images])
        return (code.decode(code.encode(images).latent_dist.mean).sample - images).abs().mean().item()

    error = {channels: reconstruction_error(channels) for channels in (4, 16, 48)}
    assert error[4] > error[16] > error[48] and error[48] < 1e-5


def test_whitening_sets_the_channels_variances_and_not_the_reconstruction():
    images = correlated_images()
    codes = {w: PatchAutoencoder(latent_channels=8, whitening=w).fit([images]) for w in (0.0, 0.5, 1.0)}
    latents = {w: code.encode(images).latent_dist.mean for w, code in codes.items()}
    variances = {w: z.var(dim=(0, 2, 3), unbiased=False) for w, z in latents.items()}
    # whitening 0 keeps the PCA's variances (descending), 0.5 their square roots, 1 ones
    torch.testing.assert_close(variances[0.0], codes[1.0].scales.detach() ** 2, rtol=1e-3, atol=0)
    torch.testing.assert_close(variances[0.5], codes[1.0].scales.detach(), rtol=1e-3, atol=0)
    assert variances[0.0][0] > 10 * variances[0.0][-1]
    rebuilt = {w: code.decode(latents[w]).sample for w, code in codes.items()}
    torch.testing.assert_close(rebuilt[0.0], rebuilt[1.0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rebuilt[0.5], rebuilt[1.0], atol=1e-5, rtol=0)


def test_the_posterior_is_a_point_and_the_fit_does_not_depend_on_batching():
    images = correlated_images()
    whole = PatchAutoencoder(latent_channels=16).fit([images])
    batched = PatchAutoencoder(latent_channels=16).fit(images.split(10))
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(batched.state_dict()[name], value, atol=1e-6, rtol=0)
    posterior = whole.encode(images).latent_dist
    assert posterior.std.max() < 1e-6
    torch.testing.assert_close(posterior.sample(), posterior.mean, atol=1e-5, rtol=0)
    # the signs are fixed: a refit gives the same code, not a sign-flipped one
    assert torch.equal(PatchAutoencoder(latent_channels=16).fit([images]).components, whole.components)


def test_bad_sizes_and_degenerate_images_are_one_line():
    with pytest.raises(ValueError, match="at most 48 latent channels, got latent_channels=49"):
        PatchAutoencoder(latent_channels=49, patch_size=4)
    with pytest.raises(ValueError, match="whose sides are multiples of patch_size=4"):
        PatchAutoencoder().fit([torch.zeros(2, 3, 10, 10)])
    flat = torch.zeros(8, 3, 16, 16)
    flat[:, 0] = torch.linspace(-1, 1, 8)[:, None, None]  # patches vary along one direction only
    with pytest.raises(ValueError, match="vary along only 1 directions.*at most 1$"):
        PatchAutoencoder(latent_channels=4).fit([flat])
    with pytest.raises(ConfigError, match="generator/first_stage=patch_pca: .*latent_channels=64"):
        patch_pca_first_stage(latent_channels=64, patch_size=4)


def noisy(latents: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    return latents + std * torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))


def test_the_refiner_decodes_noisy_latents_closer_to_the_image_than_the_linear_code():
    images, held_out = correlated_images(256), correlated_images(64, seed=1)
    linear = PatchAutoencoder(latent_channels=8).fit([images])
    state = torch.random.get_rng_state()
    refined = PatchAutoencoder(latent_channels=8, refiner_width=32, refiner_steps=150, refiner_noise=1.0)
    # building it draws nothing from the global stream: the denoiser built after it is initialised as without it
    assert torch.equal(torch.random.get_rng_state(), state)
    refined.load_state_dict(linear.state_dict(), strict=False)
    latents = linear.encode(held_out).latent_dist.mean
    # untrained, it adds nothing: its output layer starts at zero
    torch.testing.assert_close(refined.decode(latents).sample, linear.decode(latents).sample)

    def fitted(seed: int) -> PatchAutoencoder:
        code = PatchAutoencoder.from_config(refined.config)
        code.load_state_dict(refined.state_dict())
        generator = torch.Generator().manual_seed(seed)
        batches = (images[torch.randint(len(images), (32,), generator=generator)] for _ in range(150))
        return code.fit_refiner(batches, generator)

    code = fitted(0)
    torch.testing.assert_close(code.encode(held_out).latent_dist.mean, latents)  # the encoder is not touched

    def error(autoencoder: PatchAutoencoder, std: float) -> float:
        return (autoencoder.decode(noisy(latents, std, seed=2)).sample - held_out).abs().mean().item()

    # on held-out images whose latents carry noise, the refined decode is closer to the clean image
    assert error(code, 0.5) < 0.8 * error(linear, 0.5)
    assert error(code, 0.0) < 1.1 * error(linear, 0.0)  # and it does not spoil clean latents
    # the fit is repeatable from a seed
    again = fitted(0)
    assert all(torch.equal(again.state_dict()[name], value) for name, value in code.state_dict().items())


def test_the_refiner_needs_a_fitted_code_and_sane_options():
    with pytest.raises(RuntimeError, match="fit the patch code before its refiner"):
        PatchAutoencoder(latent_channels=4, refiner_width=8).fit_refiner([correlated_images(4)])
    code = PatchAutoencoder(latent_channels=4, refiner_width=8, refiner_steps=2).fit([correlated_images()])
    with pytest.raises(ValueError, match="takes refiner_steps=2 batches, its schedule's length; got more"):
        code.fit_refiner([correlated_images(4)] * 3)
    with pytest.raises(ConfigError, match="generator/first_stage=patch_pca: .*refiner_noise=-1.0 must not be negative"):
        patch_pca_first_stage(latent_channels=8, patch_size=4, refiner_width=8, refiner_noise=-1.0)


def test_a_saved_code_loads_as_a_first_stage_with_the_same_latents_and_images(tmp_path):
    autoencoder = PatchAutoencoder(latent_channels=8, patch_size=2, refiner_width=8, refiner_steps=3)
    autoencoder.fit([correlated_images()]).fit_refiner([correlated_images()] * 3)
    autoencoder.save_pretrained(tmp_path / "vae")
    first_stage = load_first_stage(str(tmp_path / "vae"))
    assert isinstance(first_stage.autoencoder, PatchAutoencoder) and first_stage.autoencoder.fitted
    assert (first_stage.latent_channels, first_stage.downsample) == (8, 2)
    assert first_stage.identity()["class"] == "PatchAutoencoder"
    images = correlated_images(4, seed=1)
    torch.testing.assert_close(first_stage.moments(images), autoencoder.encode(images).latent_dist.parameters)
    latents = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(first_stage.decode(latents), autoencoder.decode(latents).sample)
    assert not any(p.requires_grad for p in first_stage.parameters())


def test_it_is_fitted_on_the_training_images_once(tmp_path):
    source = ImageFolderSource(str(write_imagefolder(tmp_path / "data", size=16)), image_size=16)
    first_stage = patch_pca_first_stage(latent_channels=8, patch_size=4)
    assert not first_stage.autoencoder.fitted and first_stage.source == "fitted"
    first_stage.fit_to(source)
    train_images = torch.stack([image for image, _ in source.split("train", augmented=False)])
    expected = PatchAutoencoder(latent_channels=8).fit([train_images])
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(first_stage.autoencoder.state_dict()[name], value, atol=1e-6, rtol=0)
    # a loaded code with a refiner that is not trained yet keeps the code and trains the refiner
    refined = patch_pca_first_stage(latent_channels=8, patch_size=4, refiner_width=4, refiner_steps=2)
    refined.load_state_dict(first_stage.state_dict(), strict=False)
    refined.fit_to(source)
    assert refined.autoencoder.refiner_trained
    assert torch.equal(refined.autoencoder.components, first_stage.autoencoder.components)
    # a fitted (or loaded) code is kept: fitting again to other data changes nothing
    fitted = {name: value.clone() for name, value in first_stage.state_dict().items()}
    first_stage.fit_to(ImageFolderSource(str(write_imagefolder(tmp_path / "other", n=20, size=16)), image_size=16))
    assert all(torch.equal(first_stage.state_dict()[name], value) for name, value in fitted.items())
    with pytest.raises(ConfigError, match="streams its images; fit it on another run's data"):
        patch_pca_first_stage(latent_channels=8, patch_size=4).fit_to(object())


def test_an_ldm_run_on_it_trains_and_its_checkpoint_restores_the_fit(tmp_path, monkeypatch):
    data = write_imagefolder(tmp_path / "data")
    overrides = ["generator=ldm", "generator/first_stage=patch_pca", "generator.cache_latents=true", "logger=csv",
                 "test=false", "callbacks.sample_grid=null", *SMALL_REFINER]
    cfg = compose_train(tmp_path / "run", smoke_overrides(data, *overrides))
    _, built = build_model(cfg)
    assert isinstance(built.generator, LatentDiffusionGenerator) and built.generator.first_stage.autoencoder.fitted
    assert built.generator.model_channels == 16 and built.generator.model_size == 8  # 32-px images, 4x4 patches
    train(cfg)

    def refit(*_):
        raise AssertionError("loading a checkpoint fitted its patch code again: the checkpoint holds the fit")

    monkeypatch.setattr(FirstStage, "fit_to", refit)
    _, _, model = load_model(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    first_stage: FirstStage = model.generator.first_stage
    assert built.generator.first_stage.autoencoder.refiner.layers[-1].weight.abs().sum() > 0  # trained when built
    assert not any(p.requires_grad for p in built.generator.first_stage.parameters())  # and frozen again
    for name, value in built.generator.first_stage.state_dict().items():
        assert torch.equal(first_stage.state_dict()[name], value), name
    assert model.generator.latent_scale.item() == pytest.approx(1.0, rel=0.05)  # whitened latents


def test_the_export_carries_the_code_and_gives_the_same_images(tmp_path: Path):
    from test_export import PROMPTS, SEEDS, TOLERANCE

    from text2img.export import write_export
    from text2img.pipeline import Text2ImgPipeline

    data = write_imagefolder(tmp_path / "data")
    overrides = ["generator=ldm", "generator/first_stage=patch_pca", "logger=csv", "test=false",
                 "callbacks.sample_grid=null", *SMALL_REFINER]
    train(compose_train(tmp_path / "run", smoke_overrides(data, *overrides)))
    _, _, model = load_model(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    out = write_export(model, model.conditioner.text_encoder, tmp_path / "out")
    vae = PatchAutoencoder.from_pretrained(out / "vae")
    assert vae.config.scaling_factor == model.generator.latent_scale.item() and vae.refiner is not None
    images = Text2ImgPipeline.from_folder(out)(PROMPTS, seed=SEEDS, output_type="pt")
    expected = model.eval().generate(model.conditioner.text_encoder.encode(PROMPTS), SEEDS)
    assert images.shape == (4, 3, 32, 32) and (images - expected).abs().max() <= TOLERANCE
    assert (out / "text2img_pipeline" / "generators" / "patch_autoencoder.py").is_file()
