"""Latent diffusion (generator=ldm): training on (cached) latents, the latent scale, sampling, the latent
cache, bad input, and the nested run that trains a first stage."""

import logging
import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from conftest import compose_train, smoke_overrides, write_tiny_autoencoder
from text2img.run.first_stage_run import config_digest, ensure_first_stage
from text2img.generators import LatentDiffusionGenerator
from text2img.generators.first_stage import load_first_stage
from text2img.generators.latent_cache import LatentCache
from text2img.run.compose import build, build_model
from text2img.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ldm_overrides(data_dir, first_stage, *extra: str) -> list[str]:
    """A smoke run of generator=ldm on a tiny local first stage (32 px -> 4x8x8 latents), caches in tmp."""
    cache = data_dir.parent / "cache"
    return smoke_overrides(
        data_dir, "generator=ldm", f"generator.first_stage.source={first_stage}", f"paths.cache_dir={cache}", *extra
    )


def one_line_error(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value.code)
    assert message.startswith("text2img: error: ") and "\n" not in message, message
    return message


class EncoderCalls:
    """Counts forward passes of a first stage's encoder."""

    def __init__(self, generator: LatentDiffusionGenerator):
        self.count = 0
        generator.first_stage.autoencoder.encoder.register_forward_hook(self.hook)

    def hook(self, *args) -> None:
        self.count += 1


class DuringTraining(L.Callback):
    """Encoder calls made between the first and the last training batch, and the latent scale in use."""

    def __init__(self, calls: EncoderCalls):
        self.calls = calls
        self.at_start = self.at_end = None
        self.scale = None

    def on_train_batch_start(self, trainer, pl_module, *args):
        if self.at_start is None:
            self.at_start = self.calls.count
            self.scale = float(pl_module.generator.latent_scale)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.at_end = self.calls.count


def test_fast_dev_run(tmp_path, imagefolder, tiny_first_stage):
    cfg = compose_train(tmp_path, ldm_overrides(imagefolder, tiny_first_stage, "trainer.fast_dev_run=true"))
    run = build(cfg)
    assert isinstance(run.model.generator, LatentDiffusionGenerator)
    assert run.model.generator.model_size == 8 and run.model.generator.model_channels == 4
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step == 1
    assert math.isfinite(float(run.trainer.callback_metrics["train/loss"]))
    assert run.model.generator.latent_scale > 0


def test_cached_latents_train_without_the_encoder_and_the_scale_is_stored_and_resumed(
    tmp_path, imagefolder, tiny_first_stage
):
    cfg = compose_train(tmp_path / "a", ldm_overrides(imagefolder, tiny_first_stage, "generator.cache_latents=true",
                                                      "trainer.max_steps=3", "test=false"))
    run = build(cfg)
    calls = EncoderCalls(run.model.generator)
    probe = DuringTraining(calls)
    run.trainer.callbacks.append(probe)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert probe.at_start > 0  # the cache was filled and the scale calibrated before training...
    assert probe.at_end == probe.at_start  # ...and no training step ran the encoder
    assert run.trainer.global_step == 3

    # the scale is 1/std of the calibration images' latents, computed once and stored in the checkpoint
    fresh = build_model(cfg)[1].generator
    fresh.calibrate(run.datamodule.calibration_images())
    scale = float(fresh.latent_scale)
    assert scale > 0 and probe.scale == pytest.approx(scale)
    path = tmp_path / "a" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert float(ckpt["state_dict"]["generator.latent_scale"]) == pytest.approx(scale)

    # a resumed run keeps the stored scale, even one calibration would not give
    for state in ("state_dict", "current_model_state"):
        ckpt[state]["generator.latent_scale"] = torch.tensor(0.5)
    torch.save(ckpt, path)
    resumed = compose_train(tmp_path / "b", ldm_overrides(imagefolder, tiny_first_stage, "generator.cache_latents=true",
                                                          "trainer.max_steps=4", "test=false"))
    run = build(resumed)
    probe = DuringTraining(EncoderCalls(run.model.generator))
    run.trainer.callbacks.append(probe)
    run.trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=str(path))
    assert run.trainer.global_step == 4 and probe.scale == 0.5


def test_one_step_changes_unet_fusion_and_null_embedding_never_the_first_stage(tmp_path, imagefolder, tiny_first_stage):
    cfg = compose_train(tmp_path, ldm_overrides(imagefolder, tiny_first_stage, "generator.cache_latents=true"))
    datamodule, model = build_model(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model.generator.calibrate(datamodule.calibration_images())
    model.conditioner.caption_dropout = 0.5  # some rows use the null embedding
    model.lr_scheduler_factory = None
    optimizer = model.configure_optimizers()["optimizer"]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    torch.manual_seed(0)
    model.training_step(next(iter(datamodule.train_dataloader())), 0).backward()
    optimizer.step()

    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert "conditioner.null_tokens" in changed  # (null_pooled feeds vector-conditioned backends only)
    for part in ("generator.denoiser.unet.", "fusion."):
        names = {name for name in before if name.startswith(part)}
        assert names and names <= changed, sorted(names - changed)[:5]
    first_stage = {name for name in before if name.startswith("generator.first_stage.")}
    assert first_stage and not first_stage & changed
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())  # latent scale included


def test_samples_are_images_and_do_not_depend_on_their_batch(tmp_path, imagefolder, tiny_first_stage):
    cfg = compose_train(tmp_path, ldm_overrides(imagefolder, tiny_first_stage))
    datamodule, model = build_model(cfg)
    datamodule.setup("fit")
    text = model.conditioner.reference(datamodule.captions("train")[:4]).text
    model.eval()
    with pytest.raises(RuntimeError, match="latent scale of generator=ldm is not set"):
        model.generate(text, seeds=[0, 1, 2, 3])
    model.generator.calibrate(datamodule.calibration_images())
    images = model.generator.sample(
        text, model.conditioner.unconditional(4), model.fusion, [torch.Generator().manual_seed(s) for s in range(4)]
    )
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0
    alone = model.generator.sample(text[2:3], model.conditioner.unconditional(1), model.fusion, [torch.Generator().manual_seed(2)])
    # float noise of batched convolutions, amplified by the decoder: far below a grey level (1/127.5)
    torch.testing.assert_close(alone[0], images[2], atol=1e-4, rtol=0)
    assert not torch.allclose(images[0], images[1])


def test_images_encode_to_posterior_samples_in_training_and_to_the_mean_otherwise(tmp_path, tiny_first_stage):
    cfg = compose_train(tmp_path, ["generator=ldm", "debug=smoke", f"generator.first_stage.source={tiny_first_stage}",
                                   "generator.latent_scale=2.0"])
    generator = instantiate(cfg.generator)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mean = generator.first_stage.moments(images).chunk(2, dim=1)[0]
    assert not torch.equal(generator.to_model_space(images), generator.to_model_space(images))
    generator.eval()  # deterministic encodings, e.g. of an image to edit
    torch.testing.assert_close(generator.to_model_space(images), mean * 2.0)
    decoded = generator.from_model_space(mean * 2.0)
    torch.testing.assert_close(decoded, generator.first_stage.decode(mean))


def test_the_latent_cache_is_reused_keyed_and_aligned_with_the_items(tmp_path, imagefolder, tiny_first_stage):
    cfg = compose_train(tmp_path, ldm_overrides(imagefolder, tiny_first_stage, "generator.cache_latents=true"))
    datamodule, model = build_model(cfg)
    first_stage = model.generator.first_stage
    calls = EncoderCalls(model.generator)
    datamodule.prepare_data()
    encoded = calls.count
    assert encoded > 0
    datamodule.setup("fit")
    assert calls.count == encoded

    # a second run's data module reads the file: no encoding
    again, again_model = build_model(cfg)
    again_calls = EncoderCalls(again_model.generator)
    again.prepare_data()
    again.setup("fit")
    assert again_calls.count == 0
    # each training item carries the moments of its own image (the loader shuffles)
    batch = next(iter(again.train_dataloader()))
    torch.testing.assert_close(batch.latents, first_stage.moments(batch.images), atol=1e-5, rtol=1e-4)

    # keyed by the first stage: another architecture, or the same one with other weights, gets a new file
    root, source = tmp_path / "keyed", datamodule.source
    cache = LatentCache(root, first_stage)
    assert cache.prepare(source) and not cache.prepare(source)
    other = load_first_stage(str(write_tiny_autoencoder(tmp_path / "ae8", latent_channels=8)))
    assert LatentCache(root, other).prepare(source)
    with torch.no_grad():
        first_stage.autoencoder.encoder.conv_in.bias.add_(0.1)
    assert cache.prepare(source)
    assert len(list(root.glob("*.safetensors"))) == 3


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["generator.latent_scale=0"], "generator.latent_scale=0 is invalid; set generator.latent_scale to a number > 0"),
        (["data.source.image_size=30"], "downsamples by 4, which does not divide data.source.image_size=30"),
        (["generator.patch_size=3"], "patch_size=3 does not divide the diffusion space's size 8"),
        (
            ["generator.cache_latents=true", "data.source.augment={_target_: text2img.data.ImageAugment, hflip: 0.5}"],
            "generator.cache_latents=true cannot be combined with data.source.augment",
        ),
        (["generator.first_stage.source=null"], "generator.first_stage.source is not set"),
    ],
)
def test_bad_input_is_one_line(tmp_path, imagefolder, tiny_first_stage, extra, expected):
    cfg = compose_train(tmp_path, ldm_overrides(imagefolder, tiny_first_stage, *extra))
    with pytest.raises(SystemExit) as exc:
        train(cfg)
    assert expected in one_line_error(exc)


def test_a_first_stage_too_small_for_the_unet(tmp_path, imagefolder):
    # six levels: 32-px images -> 1x1 latents, which the two-level smoke UNet cannot halve
    deep = write_tiny_autoencoder(tmp_path / "deep", levels=6)
    cfg = compose_train(tmp_path, ldm_overrides(imagefolder, deep))
    with pytest.raises(SystemExit) as exc:
        train(cfg)
    message = one_line_error(exc)
    assert "2-level UNet" in message and "(4x1x1: the images, or a first stage's latents)" in message


def test_a_first_stage_checkpoint_of_the_wrong_kind(tmp_path, imagefolder):
    # what text2img.train writes for a latent diffusion run, reduced to what the loader reads
    wrong = tmp_path / "ldm.ckpt"
    torch.save({"text2img_config": {"generator": {"_target_": "text2img.generators.LatentDiffusionGenerator"}},
                "state_dict": {}}, wrong)
    cfg = compose_train(tmp_path, ldm_overrides(imagefolder, wrong))
    with pytest.raises(SystemExit) as exc:
        train(cfg)
    assert "is a generator=ldm checkpoint; the first stage must be a generator=vae run" in one_line_error(exc)


def nested_overrides(data_dir) -> list[str]:
    """A seconds-long unconditional VAE run: the first stage the outer ldm run trains first."""
    return smoke_overrides(data_dir, "generator=vae", "generator.conditional=false", "trainer.max_steps=2",
                           "trainer.val_check_interval=2", "test=false", "logger=csv")


def with_first_stage_run(cfg, data_dir, cache_dir):
    with open_dict(cfg):
        cfg.first_stage_run = {"overrides": nested_overrides(data_dir), "cache_dir": str(cache_dir)}
    return cfg


def test_the_first_stage_digest_follows_the_config_not_the_paths():
    base = ["generator=vae", "generator.conditional=false", "debug=smoke"]
    assert config_digest(base) == config_digest([*base, "logger=csv", "paths.cache_dir=/elsewhere"])
    assert config_digest(base) != config_digest([*base, "trainer.max_steps=7"])


@pytest.mark.slow
def test_an_ldm_run_trains_its_first_stage_once(tmp_path, imagefolder, caplog):
    overrides = ldm_overrides(imagefolder, "null", "generator.cache_latents=true", "trainer.max_steps=2", "test=false")
    caplog.set_level(logging.INFO, logger="text2img.run.first_stage_run")
    train(with_first_stage_run(compose_train(tmp_path / "a", overrides), imagefolder, tmp_path / "first_stages"))
    (checkpoint,) = (tmp_path / "first_stages").glob("*/checkpoints/last.ckpt")
    stamp = checkpoint.stat().st_mtime_ns
    assert "first stage: training it" in caplog.text and "reusing" not in caplog.text
    stored = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)["text2img_config"]
    assert stored["generator"]["first_stage"]["source"] == str(checkpoint)

    caplog.clear()
    second = with_first_stage_run(compose_train(tmp_path / "b", overrides), imagefolder, tmp_path / "first_stages")
    ensure_first_stage(second)
    assert "first stage: reusing" in caplog.text and "training it" not in caplog.text
    assert second.generator.first_stage.source == str(checkpoint)
    assert checkpoint.stat().st_mtime_ns == stamp
