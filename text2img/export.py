"""Export entry point: `python -m text2img.export ckpt=PATH out=DIR [copy_encoder=true] [overwrite=false]`.

Writes a trained diffusion model (pixel or latent) as a diffusers-format folder that generates from a prompt
without Hydra or the training code:

    unet/ or transformer/ the denoiser's diffusers model, save_pretrained (the checkpoint's EMA weights): a
                          UNet2DConditionModel, or a diffusion transformer (PixArtTransformer2DModel) with, for
                          generator.time_vector, its vector embedding in transformer/vector_embedding.safetensors
    scheduler/            the sampler the checkpoint samples with (noise schedule config + sampler kwargs)
    vae/                  the first stage of latent diffusion (AutoencoderKL or PatchAutoencoder), its latent scale
                          as `scaling_factor`
    fusion/fusion.pt2     the fusion head as a torch.export program (tokens, mask, pooled, timestep)
    fusion/null_text.safetensors   the learned null embedding of classifier-free guidance
    text_encoder/         the text encoder's weights and tokenizer (copy_encoder=true)
    text2img.json         sampling settings, the text encoder's settings and reference, provenance
    text2img_pipeline/    the loader, a package of copies of text2img's standalone modules (`loader_files`):
                          __init__.py (text2img/pipeline.py), encoders/text_model.py, sampling/runtime.py
    README.md             how to use it
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.export import Dim

from text2img import pipeline
from text2img.utils.checkpoints import load_checkpoint
from text2img.run.compose import load_model
from text2img.run.command_line import run_checked
from text2img.utils.paths import CONF_DIR
from text2img.run.config_checks import FLAG, check_rules
from text2img.encoders.hf import HFTextEncoder
from text2img.errors import ConfigError
from text2img.utils.files import atomic_path
from text2img.fusion.base import FusionHead
from text2img.generators.denoisers import Denoiser
from text2img.generators.diffusion import DiffusionGenerator
from text2img.generators.latent_diffusion import LatentDiffusionGenerator
from text2img.lightning import Text2ImgModule
from text2img.utils.lora import merged_copy
from text2img.run.compose import one_line_errors
from text2img.types import TextEmbedding

# The options' types (whether the output folder may be written is checked before the model is loaded)
RULES = (("copy_encoder", FLAG), ("overwrite", FLAG))


class FusionProgram(nn.Module):
    """A fusion head on plain tensors, for `torch.export`: (tokens, mask, pooled, timestep) -> (tokens, mask), and
    the vector too with `vector` (for a denoiser that adds it to its timestep embedding, `generator.time_vector`)."""

    def __init__(self, fusion: FusionHead, vector: bool = False) -> None:
        super().__init__()
        self.fusion = fusion
        self.vector = vector

    def forward(self, tokens: Tensor, mask: Tensor, pooled: Tensor, timestep: Tensor) -> tuple[Tensor, ...]:
        text = TextEmbedding(tokens, mask, pooled)
        cond = self.fusion(text, timestep if self.fusion.timestep_aware else None)
        return (cond.tokens, cond.mask, cond.vector) if self.vector else (cond.tokens, cond.mask)


def export_fusion(fusion: FusionHead, timestep_dtype: torch.dtype, path: Path, vector: bool = False) -> None:
    """Trace the head (eval mode) with a dynamic batch and sequence length; save it without pickles.

    Every head takes the timestep (timestep-aware ones use it), so the loader runs any head the same way;
    it has the dtype of the sampler's timesteps, which is what the head receives in text2img. `vector` adds the
    head's vector to the outputs (see `FusionProgram`); without it the program is the one of earlier exports.
    """
    batch, length = Dim("batch", min=1), Dim("length", min=1)
    example = (
        torch.zeros(2, 3, fusion.in_dim),
        torch.ones(2, 3, dtype=torch.bool),
        torch.zeros(2, fusion.in_dim),
        torch.zeros(2, dtype=timestep_dtype),
    )
    dynamic = {
        "tokens": {0: batch, 1: length}, "mask": {0: batch, 1: length}, "pooled": {0: batch}, "timestep": {0: batch},
    }
    program = torch.export.export(FusionProgram(fusion, vector).eval(), example, dynamic_shapes=dynamic, strict=False)
    program.example_inputs = None  # stored with torch.save (a pickle) otherwise; the weights are raw bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)


def text_encoder_settings(encoder: HFTextEncoder, copy: bool, folder: Path, tuned: bool = False) -> dict[str, Any]:
    """The encoder's settings for the loader; with `copy`, its weights and tokenizer are saved to `folder`.

    A `tuned` encoder (trained with the model) is always copied, its LoRA merged: its reference names the base
    weights, which would silently drop the tuning; `"tuned": true` in text2img.json says so.
    """
    copy = copy or tuned
    reference = encoder.reference()
    if not copy and reference is None:
        raise ConfigError(
            f"copy_encoder=false, but the text encoder {encoder.model_id} ({type(encoder).__name__}) is built in "
            "code and cannot be loaded by reference; use copy_encoder=true"
        )
    # Resolved indices stay valid in a copy that keeps only the blocks up to the last one read.
    hidden_indices = encoder.layer_indices()
    if copy:
        encoder.load()
        assert encoder.model is not None and encoder.tokenizer is not None
        merged_copy(encoder.model).save_pretrained(folder)
        encoder.tokenizer.save_pretrained(folder)
    return {
        "weights": folder.name if copy else None,
        "reference": reference,
        "tuned": tuned,
        "identity": encoder.identity(),
        "hidden_size": encoder.hidden_size,
        "hidden_indices": hidden_indices,
        "layer_norm": encoder.layer_norm,
        "combine": encoder.combine,
        "keep_tokens": encoder.keep_tokens,
        "pooling": encoder.pooling,
        "template": encoder.template,
        "chat_template": encoder.chat_template,
        "system_prompt": encoder.system_prompt,
        "max_length": encoder.max_length,
        "dtype": encoder.dtype,
        "batch_size": encoder.batch_size,
    }


def loader_files() -> dict[str, Path]:
    """The standalone loader's files, by their path in the export's loader package, each copied from its one source:
    text2img/pipeline.py as `__init__.py`, and the text2img modules it imports relatively (transitively) at their
    paths in text2img (`from .sampling.runtime import ...` -> `sampling/runtime.py`), so that the same relative
    imports resolve inside the exported package and never reach an installed text2img."""
    root = Path(pipeline.__file__).resolve().parent
    files, todo = {"__init__.py": root / "pipeline.py"}, [root / "pipeline.py"]
    while todo:
        source = todo.pop()
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                absolute = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                absolute = [node.module or ""]
            elif isinstance(node, ast.ImportFrom):
                if node.module is None:
                    raise RuntimeError(f"{source}: the loader imports modules by `from . import`; name the module")
                base = source.parent
                for _ in range(node.level - 1):
                    base = base.parent
                target = base.joinpath(*node.module.split(".")).with_suffix(".py")
                relative = target.relative_to(root).as_posix()
                if relative not in files:
                    files[relative] = target
                    todo.append(target)
                continue
            else:
                continue
            if any(name.split(".")[0] == "text2img" for name in absolute):
                raise RuntimeError(f"{source} is part of the standalone loader but imports text2img by name")
    return files


def write_loader(folder: Path) -> None:
    """The loader package `folder` (`loader_files`), with an `__init__.py` in each of its subfolders."""
    for relative, source in loader_files().items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        for package in target.relative_to(folder).parents:
            init = folder / package / "__init__.py"
            if not init.exists():
                init.write_text('"""Part of the exported text2img loader."""\n')


def check_diffusion(generator: type, checkpoint: str | None) -> None:
    if not issubclass(generator, DiffusionGenerator):
        raise ConfigError(
            f"export writes diffusion models (generator=diffusion or generator=ldm); ckpt='{checkpoint}' "
            f"holds a {generator.__name__}"
        )


def check_out(out: Path, overwrite: bool) -> None:
    if out.is_file():
        raise ConfigError(f"out='{out}' is a file; pass a folder (new or empty) to export to")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out='{out}' exists and is not empty; choose a new folder or pass overwrite=true")


def write_export(
    model: Text2ImgModule,
    encoder: HFTextEncoder,
    out: Path,
    *,
    copy_encoder: bool = True,
    overwrite: bool = False,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (its current weights) and `encoder` to `out` in the layout `text2img.pipeline` reads.

    The folder appears whole or not at all (written beside it, then renamed). `source` is provenance for
    text2img.json (checkpoint path, step). LoRA adapters are merged into copies of their bases, so the folder
    holds plain diffusers/transformers models. A text encoder trained with the model (`model.conditioner.encoder`,
    set when it is trainable) is exported in place of `encoder`, always copied.
    """
    source = source or {}
    tuned_encoder = model.conditioner.encoder
    if tuned_encoder is not None:
        if not isinstance(tuned_encoder, HFTextEncoder):
            raise ConfigError(
                f"export needs a transformers text encoder; the model's tuned encoder is {type(tuned_encoder).__name__}"
            )
        encoder = tuned_encoder
    generator = model.generator
    check_diffusion(type(generator), source.get("checkpoint"))
    check_out(out, overwrite)
    model.eval()
    sampler = generator.make_sampler()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_denoiser(generator.denoiser, tmp)
        sampler.save_pretrained(tmp / pipeline.SCHEDULER_DIR)
        if isinstance(generator, LatentDiffusionGenerator):
            save_first_stage(generator, tmp / pipeline.VAE_DIR)
        # The timesteps' dtype once set (some samplers hold float placeholders before): what the loader passes.
        sampler.set_timesteps(generator.sample_steps)
        export_fusion(model.fusion, sampler.timesteps.dtype, tmp / pipeline.FUSION_FILE, vector=generator.time_vector)
        null_text = {"tokens": model.conditioner.null_tokens, "pooled": model.conditioner.null_pooled}
        save_file({name: value.detach().float().contiguous() for name, value in null_text.items()},
                  tmp / pipeline.NULL_TEXT_FILE)
        settings = {
            "format": pipeline.FORMAT_VERSION,
            # torch's version too: torch.export files are only guaranteed to load in the version that wrote them
            "source": {
                **source, "generator": type(generator).__name__, "fusion": type(model.fusion).__name__,
                "torch": torch.__version__,
            },
            "generator": {
                "image_size": generator.image_size,
                "model_channels": generator.model_channels,
                "model_size": generator.model_size,
                "patch_size": generator.patch_size,
                "guidance_scale": generator.guidance_scale,
                "sample_steps": generator.sample_steps,
                "num_train_timesteps": generator.noise_scheduler.config.num_train_timesteps,
            },
            "text_encoder": text_encoder_settings(
                encoder, copy_encoder, tmp / pipeline.TEXT_ENCODER_DIR, tuned=tuned_encoder is not None
            ),
        }
        (tmp / pipeline.SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        write_loader(tmp / pipeline.LOADER_PACKAGE)
        has_vae = (tmp / pipeline.VAE_DIR).is_dir()
        (tmp / "README.md").write_text(readme(settings, generator.objective, has_vae))
        if out.exists():  # empty, or overwrite=true: replaced only now that the new folder is complete
            shutil.rmtree(out)
    return out


def save_denoiser(denoiser: Denoiser, folder: Path) -> None:
    """The denoiser's diffusers model, LoRA merged, in `folder`/its `folder` (unet/, transformer/), and its vector
    embedding where the network has none of its own (a DiT's, `pipeline.VECTOR_EMBEDDING_FILE`)."""
    merged = merged_copy(denoiser)
    merged.network.save_pretrained(folder / denoiser.folder)
    if merged.vector_embedding is not None:
        weights = {name: value.detach().contiguous() for name, value in merged.vector_embedding.state_dict().items()}
        save_file(weights, folder / pipeline.VECTOR_EMBEDDING_FILE)


def save_first_stage(generator: LatentDiffusionGenerator, folder: Path) -> None:
    """The first stage's `AutoencoderKL` (or fitted `PatchAutoencoder`) with the latent scale as its `scaling_factor`: diffusers pipelines
    decode `latents / vae.config.scaling_factor`, which is what `LatentDiffusionGenerator` does."""
    generator.first_stage.autoencoder.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["scaling_factor"] = generator.scale().item()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def readme(settings: dict[str, Any], objective: str, has_vae: bool) -> str:
    text, sampling = settings["text_encoder"], settings["generator"]
    reference = json.dumps(text["reference"])
    if text["weights"] and text["reference"] is None:
        encoder = f"copied into `{text['weights']}/` (weights and tokenizer; text2img builds them in code)"
    elif text["weights"] and text.get("tuned"):
        encoder = f"copied into `{text['weights']}/` (weights, LoRA merged, and tokenizer), fine-tuned from {reference}"
    elif text["weights"]:
        encoder = f"copied into `{text['weights']}/` (weights and tokenizer) from {reference}"
    else:
        encoder = (
            f"not copied: the loader loads {reference} (a hub name, or a path on the machine that exported; "
            "edit `text_encoder.reference` in text2img.json if the weights live elsewhere)"
        )
        if text["reference"].get("gguf_file"):
            encoder += "; reading a GGUF file also needs `pip install gguf`"
    vae = (
        "- `vae/`: the first stage, a diffusers `AutoencoderKL` or, when its config's `_class_name` says so, a fitted\n"
        "  patch code (`text2img_pipeline.generators.patch_autoencoder.PatchAutoencoder`, the same interface: a linear\n"
        "  code of image patches, with a small trained convolutional refiner of its decode if `refiner_width` > 0);\n"
        "  latents are decoded as `vae.decode(latents / vae.config.scaling_factor)`.\n"
    )
    return README.format(
        size=sampling["image_size"], steps=sampling["sample_steps"], guidance=sampling["guidance_scale"],
        objective=objective, encoder=encoder, identity=json.dumps(text["identity"]), vae=vae if has_vae else "",
    )


README = """\
# A text2img model, exported

Generates {size}x{size} images from a prompt with `torch`, `diffusers`, `transformers` and `safetensors`
only (no text2img, Hydra or Lightning; Pillow comes with diffusers):

    pip install torch diffusers transformers safetensors

```python
import sys
sys.path.insert(0, "path/to/this/folder")
from text2img_pipeline import Text2ImgPipeline

pipe = Text2ImgPipeline.from_folder("path/to/this/folder")   # device="cuda" for a GPU
images = pipe(["a red apple", "a green apple"], seed=0)      # PIL images; image i uses seed 0 + i
images[0].save("apple.png")
tensor = pipe(["a red apple"], seed=[7], guidance_scale={guidance}, steps={steps}, output_type="pt")  # [1, 3, H, W], [0, 1]

from PIL import Image
photo, mask = Image.open("apple.png"), Image.open("mask.png")   # mask: white = regenerate, black = keep
greener = pipe(["a green apple"], image=photo, strength=0.6)  # image-to-image (strength: share re-run, 0.8 default)
filled = pipe(["a pear"], image=photo, mask_image=mask)       # inpainting: black pixels come back unchanged
```

Defaults: `guidance_scale={guidance}` (classifier-free guidance; 1 = none), `steps={steps}`; objective {objective}.
Image i's starting noise comes from `torch.Generator().manual_seed(seed_i)` on the CPU, as in text2img, so a
seed gives the image the checkpoint gives in text2img, in any batch. On one machine in float32 the two are
identical when text2img encodes the prompts afresh. Training and evaluation read text embeddings from a cache
that was encoded in other batches, whose last bits can differ: against those, pixels differ by up to a few
1e-5 (2e-5 measured on the default SmolLM2 model).

## What is in the folder

- `unet/` or `transformer/`: the denoiser. A diffusers `UNet2DConditionModel`
  (`UNet2DConditionModel.from_pretrained(folder, subfolder="unet")`); with `patch_size` p > 1 in text2img.json it
  denoises `pixel_unshuffle(x, p)` (p x p patches as channels). Or a diffusion transformer
  (`<its _class_name>.from_pretrained(folder, subfolder="transformer")`, which embeds p x p patches itself); with
  `transformer/vector_embedding.safetensors` (a diffusers `TimestepEmbedding`), its output for the fusion head's
  vector is added to the transformer's timestep embedding.
- `scheduler/`: the sampler (`<its _class_name>.from_pretrained(folder, subfolder="scheduler")`).
{vae}- `fusion/fusion.pt2`: the fusion head, a `torch.export` program (`torch.export.load(...).module()`):
  `(tokens [B, L, D], mask [B, L] bool, pooled [B, D], timestep [B]) -> (cross-attention tokens, mask)`;
  batch and length are dynamic.
- `fusion/null_text.safetensors`: the learned unconditional embedding (`tokens` [1, D], `pooled` [D]):
  one always-attended token, the unconditional branch of guidance.
- `text2img.json`: sampling settings (`generator`), the text encoder's settings (`text_encoder`:
  hidden_indices, layer_norm, combine, keep_tokens, pooling, template, chat_template, system_prompt, max_length,
  dtype) and where the model
  came from (`source`).
- The text encoder is {encoder}. Its settings are those of the training run's text embeddings: {identity}.
- `text2img_pipeline/`: the loader, a package that imports only the packages above and itself (copies of
  text2img's `pipeline.py`, `encoders/text_model.py` and `sampling/runtime.py`, the code text2img samples
  with); `Text2ImgPipeline.encode(prompts)` gives the text embeddings alone.
"""


def export(cfg: DictConfig) -> Path:
    """Load `cfg.ckpt` and write it to `cfg.out`; returns the folder."""
    out = Path(cfg.out).expanduser()
    with one_line_errors():
        check_rules({key: cfg[key] for key, _ in RULES}, RULES)
        # before the model is built: fail fast
        check_out(out, cfg.overwrite)
        check_diffusion(get_class(load_checkpoint(cfg.ckpt)["text2img_config"]["generator"]["_target_"]), cfg.ckpt)
        checkpoint, _, model = load_model(cfg.ckpt)
        encoder = model.conditioner.text_encoder
        if not isinstance(encoder, HFTextEncoder):
            raise ConfigError(
                f"export needs a transformers text encoder; ckpt='{cfg.ckpt}' uses {type(encoder).__name__}"
            )
        source = {"checkpoint": str(Path(cfg.ckpt).expanduser().absolute()), "step": checkpoint.get("global_step")}
        write_export(model, encoder, out, copy_encoder=cfg.copy_encoder, overwrite=cfg.overwrite, source=source)
    print(f"exported {cfg.ckpt} -> {out}\nload it with text2img_pipeline.Text2ImgPipeline: see {out / 'README.md'}")
    return out


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def hydra_main(cfg: DictConfig) -> None:
    export(cfg)


def main() -> None:
    run_checked(hydra_main)


if __name__ == "__main__":
    main()
