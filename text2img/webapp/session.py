"""What the demo does, without the page: load checkpoints, draw their images for prompts as `text2img.sample` does
(same seeds, names, pixels), write them as PNGs with their prompt, seed and regenerating command, and render the
per-token cross-attention maps of one image.

Every mistake a user can make in the page raises `DemoError` with one line naming the problem and the fix; the
page shows it and keeps running.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from text2img.errors import ConfigError, root_cause
from text2img.generators.diffusion import DiffusionGenerator
from text2img.inspect.attention_maps import cross_attention_maps
from text2img.lightning import Text2ImgModule
from text2img.run.compose import USER_ERRORS, load_model
from text2img.sampling.images import (
    EditFiles,
    SamplingOptions,
    edit_from_images,
    generate_images,
    image_name,
    prompt_seeds,
    sample_command,
    save_png,
    to_uint8,
)
from text2img.sampling.runtime import ImageEdit

log = logging.getLogger(__name__)

MAX_IMAGES = 64  # prompts x images per prompt in one click: more would hold the page for minutes on a CPU


class DemoError(Exception):
    """A mistake in the page's input (a prompt, a checkpoint path, an image), said in one line with its fix."""


@dataclass
class LoadedRun:
    """A checkpoint's model, ready to sample, and what the page says about it."""

    checkpoint: Path
    model: Text2ImgModule
    summary: dict[str, str]

    @property
    def sampler_names(self) -> list[str]:
        return self.model.generator.sampler_names()

    @property
    def edits(self) -> bool:
        return isinstance(self.model.generator, DiffusionGenerator)


@dataclass(frozen=True)
class DemoImage:
    """One image as the page shows it: its PNG, caption, and the command that regenerates it."""

    path: Path
    caption: str
    command: str


@dataclass(frozen=True)
class DemoEdit:
    """An image to edit (uploaded) and, for inpainting, its mask (white = regenerate), saved where the regenerating
    command can read them."""

    image: Image.Image
    mask: Image.Image | None
    strength: float


def _class_name(node: Any) -> str | None:
    target = node.get("_target_") if isinstance(node, dict) else None
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else None


def run_summary(checkpoint: dict[str, Any]) -> dict[str, str]:
    """The run config's essentials: encoder (and the layers it reads), fusion, generator, steps trained."""
    cfg = checkpoint["text2img_config"]
    encoder, generator = cfg.get("encoder") or {}, cfg.get("generator") or {}
    summary = {"encoder": _class_name(encoder) or "none"}
    if encoder.get("model_name"):
        summary["encoder"] += f" ({encoder['model_name']})"
    if encoder.get("layers") is not None:
        summary["layers"] = f"{encoder['layers']} ({encoder.get('combine', 'mean')})"
    elif "layer" in encoder:
        mean = encoder.get("layer_mean") or 1
        summary["layers"] = str(encoder["layer"]) + (f", mean of the last {mean}" if mean > 1 else "")
    summary["fusion"] = _class_name(cfg.get("fusion")) or "none"
    summary["generator"] = _class_name(generator) or "unknown"
    parts = [_class_name(generator.get("denoiser")), generator.get("objective")]
    if _class_name(generator.get("first_stage")):
        parts.append(f"latents of {_class_name(generator['first_stage'])}")
    details = ", ".join(str(part) for part in parts if part)
    if details:
        summary["generator"] += f" ({details})"
    if generator.get("image_size"):
        summary["image size"] = f"{generator['image_size']} px"
    summary["steps trained"] = str(checkpoint.get("global_step", "unknown"))
    return summary


def load_run(path: str, device: str = "cpu") -> LoadedRun:
    """The checkpoint at `path` on `device`, or a DemoError saying why it does not load."""
    path = path.strip()
    if not path:
        raise DemoError("no checkpoint given; type the path of a .ckpt written by text2img.train")
    try:
        checkpoint, _, model = load_model(path)
    except Exception as exc:
        cause = root_cause(exc)
        if isinstance(cause, USER_ERRORS):
            raise DemoError(str(cause)) from exc
        raise DemoError(
            f"ckpt='{path}' does not build a model ({type(cause).__name__}: {cause}); pass a .ckpt written by this "
            "version of text2img.train"
        ) from exc
    model.to(device).eval()
    log.info("loaded %s (step %s) on %s", path, checkpoint.get("global_step"), device)
    return LoadedRun(Path(path).expanduser().absolute(), model, run_summary(checkpoint))


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line of the prompt box."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise DemoError("the prompt box is empty; type a prompt (one per line for several)")
    return prompts


def check_count(prompts: list[str], n: int) -> None:
    if n < 1:
        raise DemoError(f"images per prompt = {n}; ask for at least 1")
    if len(prompts) * n > MAX_IMAGES:
        raise DemoError(
            f"{len(prompts)} prompts x {n} images = {len(prompts) * n} images; ask for at most {MAX_IMAGES} at once"
        )


def check_edits(run: LoadedRun) -> None:
    if not run.edits:
        raise DemoError(
            f"{run.summary['generator']} cannot edit images (only diffusion backends denoise from a noised input); "
            "remove the image to edit, or load a diffusion checkpoint"
        )


def prepare_edit(run: LoadedRun, edit: DemoEdit, folder: Path) -> tuple[ImageEdit, EditFiles]:
    """The edit at the model's resolution, with the input files written to `folder` for the regenerating command."""
    check_edits(run)
    if not 0 < edit.strength <= 1:
        raise DemoError(f"strength={edit.strength} is out of range; use 0 < strength <= 1")
    folder.mkdir(parents=True, exist_ok=True)
    image_file = folder / "init_image.png"
    edit.image.convert("RGB").save(image_file)
    mask_file = None
    if edit.mask is not None:
        mask_file = folder / "mask.png"
        edit.mask.convert("L").save(mask_file)
    # Read back from the files, so the page edits exactly what the command will.
    mask = None if mask_file is None else _read_image(mask_file)
    prepared = edit_from_images(_read_image(image_file), mask, edit.strength, run.model.generator.image_size)
    return prepared, EditFiles(image_file, mask_file, prepared.strength)


def _read_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.copy()


def generate(
    run: LoadedRun,
    prompts: list[str],
    n: int,
    seed: int,
    options: SamplingOptions,
    folder: Path,
    edit: DemoEdit | None = None,
    on_image: Callable[[int], None] | None = None,
) -> list[DemoImage]:
    """`n` images per prompt from `run`'s model, written to `folder` as `text2img.sample` names and draws them;
    `on_image(count)` follows each batch of images."""
    check_count(prompts, n)
    if seed < 0:
        raise DemoError(f"seed={seed} is negative; use 0 or more")
    if options.sampler is not None and options.sampler not in run.sampler_names:
        raise DemoError(f"sampler {options.sampler} does not apply to {run.summary['generator']}; pick another")
    edit_input, edit_files = prepare_edit(run, edit, folder / "inputs") if edit is not None else (None, None)
    model = run.model
    entries = prompt_seeds(prompts, n, seed)
    try:
        text = model.conditioner.sampling(prompts).text
        rows = torch.tensor([i for i, _, _ in entries])
        images = generate_images(model, text[rows], [s for _, _, s in entries], options, edit_input, on_image)
    except ConfigError as exc:  # a setting the generator refuses: guidance below 1, too many steps, ...
        raise DemoError(str(exc)) from exc
    folder.mkdir(parents=True, exist_ok=True)
    shown = []
    for (i, prompt, s), pixels in zip(entries, to_uint8(images), strict=True):
        path = folder / image_name(i, prompt, s)
        command = sample_command(run.checkpoint, prompt, s, options, edit_files)
        save_png(path, pixels, {"prompt": prompt, "seed": str(s), "checkpoint": str(run.checkpoint),
                                "command": command})
        shown.append(DemoImage(path, f"{prompt} (seed {s})", command))
    return shown


def heat_overlay(image: torch.Tensor, share: torch.Tensor) -> Image.Image:
    """`image` [3, H, W] in [0, 1] with a token's attention share [H, W] laid over it in red, scaled to its peak."""
    heat = (share / share.max().clamp_min(1e-12)).numpy()[..., None]
    base = image.permute(1, 2, 0).numpy() * 0.35  # dimmed, so the red reads as attention
    red = np.array([1.0, 0.15, 0.05])
    return Image.fromarray(((base * (1 - heat) + red * heat) * 255).round().astype(np.uint8))


def attention_gallery(
    run: LoadedRun, prompt: str, seed: int, options: SamplingOptions
) -> list[tuple[Image.Image, str]]:
    """The image of `prompt` and `seed` (the one `generate` draws) followed by one overlay per conditioning token,
    captioned with the token and its share of all attention."""
    try:
        maps = cross_attention_maps(
            run.model, prompt, seed=seed, guidance_scale=options.guidance, steps=options.steps, sampler=options.sampler
        )
    except ConfigError as exc:  # a backend without cross-attention, or a setting it refuses
        raise DemoError(str(exc)) from exc
    image = Image.fromarray(to_uint8(maps.image[None])[0])
    shares = maps.maps.mean(dim=(1, 2))
    tiles = [(image, f"{prompt} (seed {seed})")]
    for token, share_map, share in zip(maps.tokens, maps.maps, shares, strict=True):
        tiles.append((heat_overlay(maps.image, share_map), f"{token.strip() or repr(token)}: {share:.0%}"))
    return tiles
