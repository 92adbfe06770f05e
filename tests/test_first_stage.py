"""Loading a latent-diffusion first stage: from a text2img VAE run, a diffusers folder or a hub name."""

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_train, smoke_overrides, write_imagefolder
from diffusers import AutoencoderKL, UNet2DModel

from text2img.run.compose import load_model
from text2img.errors import ConfigError
from text2img.generators.first_stage import FirstStage, load_first_stage
from text2img.train import train
from text2img.types import TextEmbedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_autoencoder() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=16,
    )


def images(n: int = 2, size: int = 16) -> torch.Tensor:
    torch.manual_seed(5)
    return torch.rand(n, 3, size, size) * 2 - 1


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory) -> Path:
    """The last checkpoint of a debug=smoke run of the unconditional VAE."""
    root = tmp_path_factory.mktemp("vae_run")
    data = write_imagefolder(root / "data")
    cfg = compose_train(root / "run", smoke_overrides(data, "generator=vae", "generator.conditional=false",
                                                      "trainer.max_steps=3", "test=false"))
    train(cfg)
    return root / "run" / "checkpoints" / "last.ckpt"


def test_from_a_save_pretrained_folder(tmp_path):
    autoencoder = tiny_autoencoder().eval()
    autoencoder.save_pretrained(tmp_path / "vae")
    first_stage = load_first_stage(str(tmp_path / "vae"))
    assert isinstance(first_stage, FirstStage)
    assert (first_stage.latent_channels, first_stage.downsample) == (4, 2)
    assert not any(p.requires_grad for p in first_stage.parameters())
    expected = autoencoder.encode(images()).latent_dist.parameters
    torch.testing.assert_close(first_stage.moments(images()), expected)
    # a pipeline's layout: the autoencoder in its `vae` subfolder
    (tmp_path / "model_index.json").write_text("{}")
    assert load_first_stage(str(tmp_path), subfolder="vae").latent_channels == 4
    with pytest.raises(ConfigError, match="no config.json \\(a pipeline folder: add subfolder=vae\\)"):
        load_first_stage(str(tmp_path))


def test_from_a_vae_checkpoint_equals_the_trained_model(vae_run):
    first_stage = load_first_stage(str(vae_run))
    assert first_stage.source == str(vae_run) and first_stage.latent_channels == 4
    _, _, model = load_model(str(vae_run))
    batch = images(3, size=32)
    mean, _ = first_stage.moments(batch).chunk(2, dim=1)
    assert mean.shape == (3, 4, 32 // first_stage.downsample, 32 // first_stage.downsample)
    # the first stage holds the run's (EMA) autoencoder weights: the same reconstructions
    unused_text = TextEmbedding(torch.zeros(3, 1, 64), torch.ones(3, 1, dtype=torch.bool), torch.zeros(3, 64))
    expected = model.generator.reconstruct(batch, unused_text, model.fusion)
    torch.testing.assert_close(first_stage.decode(mean).clamp(-1, 1), expected)


@pytest.mark.parametrize("source", ["folder", "vae_run"])
def test_checkpoints_leave_out_a_first_stage_that_reloads_from_its_source(source, vae_run, tmp_path):
    """A diffusers folder's weights (e.g. Stable Diffusion's VAE) reload when the model is built; a VAE run's
    checkpoint may be deleted after the latent model trains, so its weights stay in the latent model's."""
    if source == "folder":
        tiny_autoencoder().save_pretrained(tmp_path / "vae")
    location = tmp_path / "vae" if source == "folder" else vae_run
    overrides = ["generator=ldm", f"generator.first_stage.source={location}", "logger=csv", "test=false",
                 "callbacks.sample_grid=null", "trainer.max_steps=2"]
    train(compose_train(tmp_path / "run", smoke_overrides(write_imagefolder(tmp_path / "data"), *overrides)))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    kept = [key for key in saved["state_dict"] if key.startswith("generator.first_stage.")]
    assert (len(kept) == 0) == (source == "folder") and "generator.latent_scale" in saved["state_dict"]
    _, _, model = load_model(str(checkpoint))
    expected = load_first_stage(str(location)).state_dict()
    for key, value in model.generator.first_stage.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def altered_checkpoint(vae_run: Path, tmp_path: Path, edit) -> str:
    checkpoint = torch.load(vae_run, weights_only=True)
    edit(checkpoint)
    path = tmp_path / "altered.ckpt"
    torch.save(checkpoint, path)
    return str(path)


def as_diffusion(checkpoint):
    checkpoint["text2img_config"]["generator"]["_target_"] = "text2img.generators.DiffusionGenerator"


def as_conditional(checkpoint):
    checkpoint["text2img_config"]["generator"]["conditional"] = True


def with_wider_latents(checkpoint):
    checkpoint["state_dict"]["generator.autoencoder.quant_conv.weight"] = torch.zeros(16, 16, 1, 1)


@pytest.mark.parametrize(
    "edit, message",
    [
        (as_diffusion, ("is a generator=diffusion checkpoint; the first stage must be a generator=vae run "
                        "with generator.conditional=false")),
        (as_conditional, "is a conditional generator=vae run"),
        (with_wider_latents, (r"generator.autoencoder.quant_conv.weight is of shape \[16, 16, 1, 1\], "
                              r"the config builds \[8, 8, 1, 1\]")),
    ],
)
def test_wrong_checkpoints_are_one_line(vae_run, tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message) as exc:
        load_first_stage(altered_checkpoint(vae_run, tmp_path, edit))
    assert "\n" not in str(exc.value)


def test_bad_folders_and_names_are_one_line(tmp_path):
    def message(source: str) -> str:
        with pytest.raises(ConfigError) as exc:
            load_first_stage(source)
        assert "\n" not in str(exc.value)
        return str(exc.value)

    assert "does not exist" in message(str(tmp_path / "nowhere"))
    assert "does not exist" in message(str(tmp_path / "nowhere.ckpt"))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    assert message(str(tmp_path / "weights.safetensors")).startswith(
        f"first stage '{tmp_path / 'weights.safetensors'}' is not a folder; pass a generator=vae run's .ckpt"
    )
    (tmp_path / "empty").mkdir()
    assert "holds no AutoencoderKL: it has no config.json" in message(str(tmp_path / "empty"))
    UNet2DModel(block_out_channels=(32, 32), down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2, sample_size=8).save_pretrained(tmp_path / "unet")
    assert "holds a UNet2DModel, not an AutoencoderKL" in message(str(tmp_path / "unet"))
    # weights that do not fit the folder's config
    tiny_autoencoder().save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config | {"latent_channels": 8}))
    assert "weights that do not match its config.json (size mismatch for" in message(str(tmp_path / "vae"))
    # hub names fail fast offline (the tests run with HF_HUB_OFFLINE=1)
    assert "'someone/some-vae' (subfolder=vae) could not be loaded" in str(
        pytest.raises(ConfigError, load_first_stage, "someone/some-vae", subfolder="vae").value
    )
