"""`python -m text2img.export`: the folder loads with diffusers, and its standalone loader gives the checkpoint's
images without text2img, Hydra or Lightning."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, compose_train, run_entry_point, smoke_overrides, write_imagefolder
from diffusers import (
    AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler, UNet2DConditionModel,
)
from hydra.utils import get_class
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from text2img.run.compose import load_model
from text2img.conditioning import TextConditioner
from text2img.encoders import HFTextEncoder, TinyEncoder
from text2img.errors import ConfigError
from text2img.export import export, export_fusion, loader_files, write_export
from text2img.fusion import FusionHead, TokenProjection
from text2img.generators.first_stage import FirstStage
from text2img.generators.flow import RectifiedFlow
from text2img.generators.latent_diffusion import LatentDiffusionGenerator
from text2img.lightning import Text2ImgModule
from text2img.pipeline import FUSION_FILE, LOADER_PACKAGE, SETTINGS_FILE, Text2ImgPipeline
from text2img.run.compose import build_model
from text2img.sample import load_edit
from text2img.sampling.runtime import ImageEdit
from text2img.train import train
from text2img.types import Conditioning, TextEmbedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Prompts of different lengths (the tiny encoder has one token per byte), so padding and batching are exercised.
PROMPTS = ["a red square", "a blue circle number 7", "", "a yellow triangle number 12 with a long tail"]
SEEDS = [3, 1, 4, 1]
# float32 on one machine, both sides encoding the prompts afresh: measured identical (0.0). The bound leaves room
# for kernels whose last bits differ; a wrong scale, schedule or guidance branch moves pixels by 1e-4 or more.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step smoke run's last checkpoint (tiny encoder and UNet on a 48-image folder)."""
    root = tmp_path_factory.mktemp("export")
    data = write_imagefolder(root / "data")
    train(compose_train(root / "run", smoke_overrides(data, "logger=csv", "test=false", "callbacks.sample_grid=null")))
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint exported from the command line."""
    out = tmp_path_factory.mktemp("exported") / "model"
    result = run_entry_point("export", f"ckpt={checkpoint}", f"out={out}", f"hydra.run.dir={out.parent}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"-> {out}" in result.stdout
    return out


@pytest.fixture(scope="module")
def checkpoint_model(checkpoint: Path) -> tuple[Text2ImgModule, TinyEncoder]:
    _, _, model = load_model(str(checkpoint))
    return model.eval(), model.conditioner.text_encoder


def test_export_gives_the_checkpoints_images(exported: Path, checkpoint_model) -> None:
    model, encoder = checkpoint_model
    pipe = Text2ImgPipeline.from_folder(exported)
    for sampling in ({}, {"guidance_scale": 1.0, "steps": 3}):
        expected = model.generate(encoder.encode(PROMPTS), SEEDS, **sampling)
        images = pipe(PROMPTS, seed=SEEDS, output_type="pt", **sampling)
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
        assert (images - expected).abs().max() <= TOLERANCE
        assert (images[0] - images[1]).abs().max() > 0.01  # different prompts and seeds: different images
    # image i depends on its prompt and seed only, not on the batch it is generated in
    alone = pipe(PROMPTS[1:2], seed=SEEDS[1:2], output_type="pt")
    assert (alone[0] - pipe(PROMPTS, seed=SEEDS, output_type="pt")[1]).abs().max() <= TOLERANCE
    pil = pipe(PROMPTS[:2], seed=5)
    assert [image.size for image in pil] == [(32, 32), (32, 32)]
    first = torch.tensor(list(pil[1].getdata()), dtype=torch.float32).T.reshape(3, 32, 32) / 255
    assert (first - pipe(PROMPTS[1:2], seed=6, output_type="pt")[0]).abs().max() <= 0.5 / 255 + TOLERANCE


def test_folder_loads_with_diffusers_own_classes(exported: Path, checkpoint_model) -> None:
    model, _ = checkpoint_model
    unet = UNet2DConditionModel.from_pretrained(exported / "unet")
    trained = model.generator.denoiser.unet.state_dict()
    assert unet.state_dict().keys() == trained.keys()
    assert all(torch.equal(value, trained[name]) for name, value in unet.state_dict().items())
    scheduler = DPMSolverMultistepScheduler.from_pretrained(exported / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
    settings = json.loads((exported / SETTINGS_FILE).read_text())
    assert settings["generator"] | {"patch_size": 2, "model_channels": 3, "sample_steps": 2} == settings["generator"]
    assert settings["text_encoder"]["weights"] == "text_encoder" and settings["text_encoder"]["reference"] is None
    # the loader: copies of the pipeline and the standalone modules it imports, each from its one source
    sources = {"__init__.py": "pipeline.py", "encoders/text_model.py": "encoders/text_model.py",
               "sampling/runtime.py": "sampling/runtime.py",
               "generators/patch_autoencoder.py": "generators/patch_autoencoder.py"}
    assert {name: path.relative_to(REPO_ROOT / "text2img").as_posix() for name, path in loader_files().items()} == sources
    for name, source in sources.items():
        assert (exported / LOADER_PACKAGE / name).read_text() == (REPO_ROOT / "text2img" / source).read_text()
    assert "from text2img_pipeline import Text2ImgPipeline" in (exported / "README.md").read_text()
    null = load_file(exported / "fusion" / "null_text.safetensors")
    null_tokens, null_pooled = model.conditioner.null_tokens, model.conditioner.null_pooled
    assert torch.equal(null["tokens"], null_tokens) and torch.equal(null["pooled"], null_pooled)


def test_fusion_program_takes_any_batch_and_length_and_holds_no_pickle(exported: Path, checkpoint_model) -> None:
    model, _ = checkpoint_model
    fusion = torch.export.load(exported / FUSION_FILE).module()
    for batch, length in [(1, 1), (3, 9), (5, 64)]:
        mask = torch.arange(length).expand(batch, length) < torch.randint(1, length + 1, (batch, 1))
        tokens = torch.randn(batch, length, 64) * mask[..., None]
        expected = model.fusion(TextEmbedding(tokens, mask, tokens[:, 0]))
        got_tokens, got_mask = fusion(tokens, mask, tokens[:, 0], torch.zeros(batch, dtype=torch.int64))
        assert torch.equal(got_tokens, expected.tokens) and torch.equal(got_mask, mask)
    with zipfile.ZipFile(exported / FUSION_FILE) as archive:
        pickled = [info.filename for info in archive.infolist() if info.filename.endswith(".pt") and info.file_size]
    assert pickled == []  # the graph is JSON, the weights raw bytes
    suffixes = {path.suffix for path in exported.rglob("*") if path.is_file()}
    assert not suffixes & {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


class TimestepGate(FusionHead):
    """A timestep-aware head (like those of a later issue): tokens scaled by a function of the timestep."""

    produces = frozenset({"tokens"})
    timestep_aware = True

    def __init__(self, in_dim: int = 8, out_dim: int = 4) -> None:
        super().__init__(in_dim, out_dim)
        self.proj = torch.nn.Linear(in_dim, out_dim)
        self.gate = torch.nn.Embedding(1000, out_dim)

    def forward(self, text: TextEmbedding, timestep: torch.Tensor | None = None) -> Conditioning:
        assert timestep is not None
        tokens = self.proj(text.tokens) * self.gate(timestep)[:, None] * text.mask[..., None]
        return Conditioning(tokens=tokens, mask=text.mask)


def test_a_timestep_aware_head_exports_with_its_timestep(tmp_path: Path) -> None:
    head = TimestepGate().eval()
    export_fusion(head, torch.int64, tmp_path / "head.pt2")
    program = torch.export.load(tmp_path / "head.pt2").module()
    tokens, mask = torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
    early, late = torch.tensor([999, 999, 999]), torch.tensor([10, 500, 999])
    for timestep in (early, late):
        got, _ = program(tokens, mask, tokens[:, 0], timestep)
        assert torch.equal(got, head(TextEmbedding(tokens, mask, tokens[:, 0]), timestep).tokens)
    assert not torch.equal(program(tokens, mask, tokens[:, 0], early)[0], program(tokens, mask, tokens[:, 0], late)[0])


BLOCKED_IMPORTS = """
import importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"text2img", "hydra", "omegaconf", "lightning", "lightning_fabric", "pytorch_lightning"}:
            raise ImportError(f"the standalone loader imported {name}")
        return None

sys.meta_path.insert(0, Blocker())
sys.path.insert(0, sys.argv[1])
import torch
from safetensors.torch import save_file
from text2img_pipeline import Text2ImgPipeline

pipe = Text2ImgPipeline.from_folder(sys.argv[1])
images = pipe(sys.argv[3].split("|"), seed=[int(s) for s in sys.argv[4].split(",")], output_type="pt")
save_file({"images": images.contiguous()}, sys.argv[2])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"text2img", "hydra", "lightning", "omegaconf"})
assert not loaded, loaded
"""


def test_the_loader_needs_no_text2img_hydra_or_lightning(exported: Path, checkpoint_model, tmp_path: Path) -> None:
    model, encoder = checkpoint_model
    script = tmp_path / "generate.py"
    script.write_text(BLOCKED_IMPORTS)
    prompts = PROMPTS[:2]
    result = subprocess.run(
        [sys.executable, str(script), str(exported), str(tmp_path / "images.safetensors"), "|".join(prompts), "3,1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    images = load_file(tmp_path / "images.safetensors")["images"]
    assert (images - model.generate(encoder.encode(prompts), [3, 1])).abs().max() <= TOLERANCE


def tiny_autoencoder(image_size: int) -> AutoencoderKL:
    """A random AutoencoderKL with 4-channel latents at half the image size."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, sample_size=image_size,
    )


def tiny_latent_module(flow: RectifiedFlow | None = None) -> tuple[Text2ImgModule, TinyEncoder]:
    """Latent diffusion on a tiny AutoencoderKL first stage (4x8x8 latents of 16-px images), untrained but
    with randomised weights so that every part matters; with `flow`, trained with rectified flow."""
    autoencoder = tiny_autoencoder(16)
    unet = partial(
        UNet2DConditionModel, block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    generator = LatentDiffusionGenerator(
        first_stage=FirstStage(autoencoder, source="test"), image_size=16, latent_scale=0.7, unet=unet,
        noise_scheduler=DDPMScheduler(num_train_timesteps=100, prediction_type="epsilon"),
        sampler=get_class("diffusers.DDIMScheduler"), cond_dim=32, sample_steps=3, guidance_scale=2.0,
        objective="flow" if flow else None, flow=flow,
    )
    encoder = TinyEncoder(hidden_size=64, max_length=24, layer=-2)
    model = Text2ImgModule(
        TokenProjection(64, 32, hidden_dim=48), generator, TextConditioner(encoder, "unused"), optimizer=torch.optim.AdamW
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval(), encoder


def test_latent_diffusion_export_gives_the_same_images(tmp_path: Path) -> None:
    model, encoder = tiny_latent_module()
    out = write_export(model, encoder, tmp_path / "ldm")
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.scaling_factor == pytest.approx(0.7) and vae.config.latent_channels == 4
    pipe = Text2ImgPipeline.from_folder(out)
    text = encoder.encode(PROMPTS)
    expected = model.generate(text, SEEDS)
    images = pipe(PROMPTS, seed=SEEDS, output_type="pt")
    assert images.shape == expected.shape == (4, 3, 16, 16)
    assert (images - expected).abs().max() <= TOLERANCE
    # the encoder reads its second-to-last layer; the copy keeps that layer by its resolved index
    assert json.loads((out / SETTINGS_FILE).read_text())["text_encoder"]["hidden_indices"] == [1]
    tokens, mask, pooled = pipe.encode(PROMPTS)
    assert torch.equal(tokens, text.tokens) and torch.equal(mask, text.mask) and torch.equal(pooled, text.pooled)


def test_an_ldm_checkpoint_exports_with_its_first_stage(tmp_path: Path) -> None:
    """generator=ldm trained (smoke) on a diffusers AutoencoderKL folder, its latent scale computed from data."""
    tiny_autoencoder(32).save_pretrained(tmp_path / "vae")
    data = write_imagefolder(tmp_path / "data")
    overrides = ["generator=ldm", f"generator.first_stage.source={tmp_path / 'vae'}", "logger=csv", "test=false"]
    train(compose_train(tmp_path / "run", smoke_overrides(data, *overrides, "callbacks.sample_grid=null")))
    _, _, model = load_model(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    out = write_export(model, model.conditioner.text_encoder, tmp_path / "out")
    scale = model.generator.latent_scale.item()
    assert scale > 0 and AutoencoderKL.from_pretrained(out / "vae").config.scaling_factor == scale
    images = Text2ImgPipeline.from_folder(out)(PROMPTS, seed=SEEDS, output_type="pt")
    expected = model.eval().generate(model.conditioner.text_encoder.encode(PROMPTS), SEEDS)
    assert images.shape == (4, 3, 32, 32) and (images - expected).abs().max() <= TOLERANCE


def test_a_referenced_encoder_is_loaded_from_its_reference(tmp_path: Path, checkpoint_model) -> None:
    """copy_encoder=false writes where the weights are instead of the weights (here a local folder)."""
    model, tiny = checkpoint_model
    tiny.load()
    tiny.model.save_pretrained(tmp_path / "encoder")
    tiny.tokenizer.save_pretrained(tmp_path / "encoder")
    encoder = HFTextEncoder(model=str(tmp_path / "encoder"), hidden_size=64, max_length=64)
    out = write_export(model, encoder, tmp_path / "out", copy_encoder=False)
    assert not (out / "text_encoder").exists() and encoder.model is None  # its config resolves the layers
    assert json.loads((out / SETTINGS_FILE).read_text())["text_encoder"]["reference"]["model"] == str(tmp_path / "encoder")
    images = Text2ImgPipeline.from_folder(out)(PROMPTS[:2], seed=0, output_type="pt")
    assert (images - model.generate(encoder.encode(PROMPTS[:2]), [0, 1])).abs().max() <= TOLERANCE


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_non_diffusion_checkpoint_is_refused(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, smoke_overrides(write_imagefolder(tmp_path / "data", n=8), "generator=vae"))
    _, model = build_model(cfg)
    with pytest.raises(ConfigError) as error:
        write_export(model, model.conditioner.text_encoder, tmp_path / "out", source={"checkpoint": "vae.ckpt"})
    assert one_line(error) == (
        "export writes diffusion models (generator=diffusion or generator=ldm); ckpt='vae.ckpt' holds a VAEGenerator"
    )
    assert not (tmp_path / "out").exists()


def test_an_encoder_built_in_code_must_be_copied(tmp_path: Path, checkpoint_model) -> None:
    model, encoder = checkpoint_model
    with pytest.raises(ConfigError) as error:
        write_export(model, encoder, tmp_path / "out", copy_encoder=False)
    assert "copy_encoder=false, but the text encoder tiny-gpt2-64d-seed0 (TinyEncoder) is built in code" in one_line(error)
    assert one_line(error).endswith("use copy_encoder=true")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written is left


def test_a_non_empty_out_is_one_line_unless_overwrite(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as error:
        export(compose_train(tmp_path, [f"ckpt={checkpoint}", f"out={out}"], "export"))
    assert error.value.code == (
        f"text2img: error: out='{out}' exists and is not empty; choose a new folder or pass overwrite=true"
    )
    export(compose_train(tmp_path, [f"ckpt={checkpoint}", f"out={out}", "overwrite=true"], "export"))
    assert not (out / "notes.txt").exists() and (out / SETTINGS_FILE).is_file()


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ({"guidance_scale": 0.5}, "guidance_scale=0.5 is below 1; use 1 (no guidance) or more"),
        ({"steps": 0}, "steps=0 is out of range; use 1..1000"),
        ({"steps": 1001}, "steps=1001 is out of range; use 1..1000"),
    ],
)
def test_loader_sampling_arguments_are_checked(exported: Path, sampling: dict, message: str) -> None:
    pipe = Text2ImgPipeline.from_folder(exported)
    with pytest.raises(ValueError) as error:
        pipe(["a red square"], **sampling)
    assert one_line(error) == message


def test_a_folder_that_is_not_an_export_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        Text2ImgPipeline.from_folder(tmp_path)
    assert one_line(error) == f"{tmp_path} holds no text2img.json; pass a folder written by text2img.export"


def tiny_pixel_module(
    fusion: FusionHead, time_vector: bool = False, flow: RectifiedFlow | None = None, **encoder_options
) -> tuple[Text2ImgModule, TinyEncoder]:
    """Pixel diffusion on 16-px images with a tiny UNet and the given head (in 64 x layers read, out 32), weights
    randomised; with `flow`, trained with rectified flow. `encoder_options` go to the tiny encoder."""
    from text2img.generators import DiffusionGenerator

    torch.manual_seed(0)
    unet = partial(
        UNet2DConditionModel, block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    generator = DiffusionGenerator(
        unet=unet, noise_scheduler=DDPMScheduler(num_train_timesteps=100, prediction_type="epsilon"),
        sampler=DPMSolverMultistepScheduler, image_size=16, cond_dim=32, patch_size=2, sample_steps=3,
        guidance_scale=2.0, time_vector=time_vector, objective="flow" if flow else None, flow=flow,
    )
    encoder = TinyEncoder(hidden_size=64, max_length=48, **encoder_options)
    model = Text2ImgModule(fusion, generator, TextConditioner(encoder, "unused"), optimizer=torch.optim.AdamW)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval(), encoder


@pytest.mark.parametrize("time_vector", [False, True], ids=["timestep_aware", "time_vector"])
def test_timestep_aware_and_time_vector_models_export_with_the_same_images(tmp_path: Path, time_vector: bool) -> None:
    from text2img.fusion import TimestepAwarePerceiver

    head = TimestepAwarePerceiver(64, 32, num_latents=4, heads=4, time_channels=16)
    model, encoder = tiny_pixel_module(head, time_vector)
    out = write_export(model, encoder, tmp_path / "model")
    pipe = Text2ImgPipeline.from_folder(out)
    assert pipe.unet.config.class_embed_type == ("projection" if time_vector else None)
    images = pipe(PROMPTS, seed=SEEDS, output_type="pt")
    expected = model.generate(encoder.encode(PROMPTS), SEEDS)
    assert images.shape == expected.shape == (4, 3, 16, 16)
    assert (images - expected).abs().max() <= TOLERANCE


def test_a_refiner_on_concatenated_layers_and_caption_tokens_exports_with_the_same_images(tmp_path: Path) -> None:
    from text2img.fusion import TokenRefiner

    head = TokenRefiner(2 * 64, 32, depth=2, heads=4, norm="rms_scaled", timestep_conditioned=True, time_channels=16)
    options = {"layers": [1, 2], "combine": "concat", "keep_tokens": "caption", "template": "an icon of {caption}"}
    model, encoder = tiny_pixel_module(head, **options)
    pipe = Text2ImgPipeline.from_folder(write_export(model, encoder, tmp_path / "model"))
    images = pipe(PROMPTS, seed=SEEDS, output_type="pt")
    expected = model.generate(encoder.encode(PROMPTS), SEEDS)
    assert images.shape == expected.shape == (4, 3, 16, 16)
    assert (images - expected).abs().max() <= TOLERANCE


def edit_files(folder: Path, size: tuple[int, int]) -> tuple[Path, Path]:
    """A photo (random RGB pixels, not square: both sides crop it) and an inpainting mask (its lower half white)
    as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(pixels.numpy()).save(folder / "photo.png")
    mask = torch.zeros(size[1], size[0], dtype=torch.uint8)
    mask[size[1] // 2 :] = 255
    Image.fromarray(mask.numpy()).save(folder / "mask.png")
    return folder / "photo.png", folder / "mask.png"


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_the_export_edits_images_as_the_checkpoint_does(space: str, exported: Path, checkpoint_model, tmp_path: Path) -> None:
    """`image=`, `mask_image=`, `strength=`: image-to-image and inpainting through the sampling runtime text2img
    edits with, from image files read as `text2img.sample` reads `init_image=` and `mask=`."""
    if space == "pixel":
        (model, encoder), folder = checkpoint_model, exported
    else:
        model, encoder = tiny_latent_module()
        folder = write_export(model, encoder, tmp_path / "ldm")
    pipe = Text2ImgPipeline.from_folder(folder)
    size = model.generator.image_size
    photo, mask = edit_files(tmp_path / "inputs", (size + 8, size - 4))
    text, count = encoder.encode(PROMPTS), len(PROMPTS)
    for mask_file, strength in [(None, 0.6), (None, None), (mask, None), (mask, 0.5)]:
        options = {"init_image": str(photo), "mask": mask_file and str(mask_file), "strength": strength}
        edit = load_edit(OmegaConf.create(options), size)
        rows = replace(edit, images=edit.images.expand(count, -1, -1, -1),
                       mask=None if edit.mask is None else edit.mask.expand(count, -1, -1, -1))
        expected = model.generate(text, SEEDS, edit=rows)
        with Image.open(photo) as image, Image.open(mask) as mask_image:
            images = pipe(PROMPTS, seed=SEEDS, output_type="pt", image=image, strength=strength,
                          mask_image=mask_image if mask_file else None)
        assert images.shape == expected.shape == (count, 3, size, size)
        assert (images - expected).abs().max() <= TOLERANCE, (mask_file, strength)
        if mask_file is not None:  # inpainting: the kept half comes back as it went in
            assert torch.equal(images[..., : size // 2, :], ((rows.images + 1) / 2)[..., : size // 2, :])
    # tensors in [0, 1] (what output_type="pt" gives) and 0/1 masks are taken too, one for every prompt
    pixels, keep_top = (edit.images + 1) / 2, edit.mask
    expected = model.generate(text, SEEDS, edit=ImageEdit(
        (pixels * 2 - 1).expand(count, -1, -1, -1), 0.5, keep_top.expand(count, -1, -1, -1)))
    images = pipe(PROMPTS, seed=SEEDS, output_type="pt", image=pixels, mask_image=keep_top, strength=0.5)
    assert (images - expected).abs().max() <= TOLERANCE


def test_loader_edit_arguments_are_checked(exported: Path) -> None:
    pipe = Text2ImgPipeline.from_folder(exported)
    image = Image.new("RGB", (32, 32), "red")
    cases = [
        ({"mask_image": image}, "mask_image= needs image=, the image to edit"),
        ({"strength": 0.5}, "strength= needs image=, the image to edit"),
        ({"image": image, "strength": 1.5}, "strength=1.5 is out of range; use 0 < strength <= 1"),
        ({"image": [image] * 2}, "got 2 images for 3 prompts; give one, or one per prompt"),
        ({"image": image, "mask_image": torch.full((1, 1, 32, 32), 0.5)},
         "the edit mask must hold 0 (keep) and 1 (regenerate) only; threshold it first"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError) as error:
            pipe(PROMPTS[:3], **options)
        assert one_line(error) == message


@pytest.mark.parametrize(("space", "sampler"), [
    ("pixel", FlowMatchEulerDiscreteScheduler), ("latent", FlowMatchHeunDiscreteScheduler),
])
def test_a_flow_model_exports_with_its_flow_scheduler_and_the_same_images(
    tmp_path: Path, space: str, sampler: type
) -> None:
    """`generator.objective=flow`: the folder's scheduler is the flow-matching sampler, with the training shift,
    and the loader draws and edits the model's images (flow schedulers noise with `scale_noise`)."""
    flow = RectifiedFlow(shift=3.0, sampler=sampler)
    if space == "pixel":
        model, encoder = tiny_pixel_module(TokenProjection(64, 32, hidden_dim=48), flow=flow)
    else:
        model, encoder = tiny_latent_module(flow)
    out = write_export(model, encoder, tmp_path / "model")
    assert sampler.from_pretrained(out / "scheduler").config.shift == 3.0
    assert "objective flow" in (out / "README.md").read_text()
    pipe = Text2ImgPipeline.from_folder(out)
    assert type(pipe.scheduler) is sampler
    text = encoder.encode(PROMPTS)
    assert torch.equal(pipe(PROMPTS, seed=SEEDS, output_type="pt"), model.generate(text, SEEDS))
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:, :] = 1
    count = len(PROMPTS)
    expected = model.generate(text, SEEDS, edit=ImageEdit(
        (pixels * 2 - 1).expand(count, -1, -1, -1), 0.5, mask.expand(count, -1, -1, -1)))
    images = pipe(PROMPTS, seed=SEEDS, output_type="pt", image=pixels, mask_image=mask, strength=0.5)
    assert torch.equal(images, expected)
