"""experiment=adapt_pretrained: a pretrained diffusers pipeline's UNet, VAE and schedule, frozen; only the fusion
head (and LoRA) trains. The pipeline is a tiny one that each test saves with save_pretrained."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_train, smoke_overrides, write_imagefolder, write_tiny_autoencoder
from diffusers import PNDMScheduler, UNet2DConditionModel
from safetensors.torch import load_file

from text2img.run.compose import build_model, load_model
from text2img.train import train
from text2img.utils.checkpoints import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_tiny_pipeline(folder: Path, cross_attention_dim: int = 32) -> Path:
    """unet/ (cross-attending to `cross_attention_dim` features, on 4 x 8 x 8 latents), vae/ (32 px -> 4 x 8 x 8) and
    scheduler/ (Stable Diffusion 1.5's PNDM with scaled-linear betas, epsilon), as a Stable Diffusion folder lays out."""
    write_tiny_autoencoder(folder / "vae")
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    ).save_pretrained(folder / "unet")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
                  skip_prk_steps=True).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return folder


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_pipeline(tmp_path_factory.mktemp("pipeline") / "tiny-sd")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("adapt") / "data")


def test_the_preset_takes_its_sizes_schedule_and_objective_from_the_folder(tmp_path: Path) -> None:
    folder = write_tiny_pipeline(tmp_path / "sd", cross_attention_dim=48)
    cfg = compose_train(tmp_path, ["experiment=adapt_pretrained", f"pretrained={folder}"])
    assert cfg.generator.cond_dim == cfg.fusion.out_dim == 48
    assert cfg.generator.latent_scale == pytest.approx(0.18215) and cfg.generator.objective == "epsilon"
    _, model = build_model(cfg)
    schedule = model.generator.noise_scheduler.config
    assert schedule.beta_schedule == "scaled_linear" and schedule.prediction_type == "epsilon"
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    assert all(torch.equal(p, unet.state_dict()[name]) for name, p in model.generator.denoiser.unet.state_dict().items())
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fusion", "conditioner"}  # the head and the null embedding; the UNet and VAE are frozen


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_only_the_head_and_lora_train_and_checkpoints_leave_the_frozen_unet_out(
    peft: str, pipeline: Path, data: Path, tmp_path: Path
) -> None:
    overrides = smoke_overrides(
        data, "experiment=adapt_pretrained", f"pretrained={pipeline}", f"generator_peft={peft}", "logger=csv",
        "test=false", "callbacks.sample_grid=null", "fusion.num_latents=4",
    )
    train(compose_train(tmp_path, overrides))
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    state = load_checkpoint(str(checkpoint))["state_dict"]
    denoiser = [key for key in state if key.startswith("generator.denoiser.")]
    # without LoRA no denoiser weight is saved; with it, only the adapters
    assert all("lora_" in key for key in denoiser) and bool(denoiser) == (peft == "lora")
    assert any(key.startswith("fusion.") for key in state)
    # the frozen weights came back from the folder, unchanged by training; the checkpoint resumes and samples
    _, _, model = load_model(str(checkpoint))
    base = load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    loaded = {name.replace("base_layer.", ""): p for name, p in model.generator.denoiser.unet.state_dict().items()}
    assert all(torch.equal(loaded[name], value) for name, value in base.items())
    images = model.eval().generate(model.conditioner.sampling(["a red square"]).text, [0])
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "generator.denoiser.source: '{root}/unet' is not a folder"),
        ("no-unet", "generator.denoiser.source: '{root}/unet' holds no diffusers config.json"),
        ("vae-as-unet", "generator.denoiser.source: '{root}/unet' holds a AutoencoderKL, not a UNet2DConditionModel"),
    ],
)
def test_bad_folders_are_one_line(layout: str, message: str, tmp_path: Path, data: Path) -> None:
    root = tmp_path / "sd"
    write_tiny_pipeline(root)
    if layout == "missing":
        shutil.rmtree(root / "unet")
    elif layout == "no-unet":
        (root / "unet" / "config.json").unlink()
    else:
        (root / "unet" / "config.json").write_text((root / "vae" / "config.json").read_text())
    overrides = smoke_overrides(data, "experiment=adapt_pretrained", f"pretrained={root}", "logger=csv")
    with pytest.raises(SystemExit) as error:
        train(compose_train(tmp_path / "run", overrides))
    line = str(error.value.code)
    assert line.startswith("text2img: error: " + message.format(root=root)) and "\n" not in line, line


def test_a_head_width_that_differs_from_the_unet_s_is_one_line(pipeline: Path, data: Path, tmp_path: Path) -> None:
    overrides = smoke_overrides(data, "experiment=adapt_pretrained", f"pretrained={pipeline}", "generator.cond_dim=64")
    with pytest.raises(SystemExit) as error:
        train(compose_train(tmp_path, overrides))
    assert str(error.value.code) == (
        f"text2img: error: generator.denoiser.source={pipeline} (subfolder unet) cross-attends to 32 features but "
        "generator.cond_dim=64; set generator.cond_dim=32 (experiment=adapt_pretrained reads it from the folder)"
    )


def test_a_hub_name_that_cannot_be_fetched_is_one_line() -> None:
    from text2img.errors import ConfigError
    from text2img.generators.pretrained import pretrained_config

    with pytest.raises(ConfigError) as error:
        pretrained_config("nobody/no-such-pipeline", "unet")  # no hub from the test machines, and no such repository
    assert str(error.value).startswith(
        "generator.denoiser.source: 'nobody/no-such-pipeline/unet' is no local folder and its config cannot be fetched"
    )


def test_a_pretrained_dit_loads_frozen_with_its_own_sizes(tmp_path: Path) -> None:
    """generator/denoiser=dit with subfolder=transformer: a PixArt-class folder; its depth, not the config's, is
    what deep fusion would route into."""
    from diffusers import PixArtTransformer2DModel

    folder = write_tiny_pipeline(tmp_path / "pixart")
    torch.manual_seed(0)
    PixArtTransformer2DModel(
        num_layers=3, num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, sample_size=8,
        patch_size=2, cross_attention_dim=16, use_additional_conditions=False, norm_num_groups=4,
    ).save_pretrained(folder / "transformer")
    cfg = compose_train(tmp_path, [
        "experiment=adapt_pretrained", f"pretrained={folder}", "generator/denoiser=dit",
        "generator.denoiser.subfolder=transformer", "fusion=token_projection",
    ])
    assert cfg.generator.cond_dim == cfg.fusion.out_dim == 16
    _, model = build_model(cfg)
    denoiser = model.generator.denoiser
    assert denoiser.text_blocks == 3 and not any(p.requires_grad for p in denoiser.transformer.parameters())
    latents = torch.randn(2, 4, 8, 8)
    tokens, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    assert denoiser(latents, torch.tensor([10, 500]), tokens, mask, None).shape == (2, 4, 8, 8)
