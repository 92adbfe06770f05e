"""Sampling entry point: `python -m text2img.sample ckpt=PATH prompts='["red apple","green apple"]' [n=4 seed=0]`.

Rebuilds the checkpoint's model from the run config stored inside it and writes, into `out` (default
`<run folder>/samples/<date>_<time>-<checkpoint>-<mode>-seed<seed>/`):

- `p<i>-<slug of prompt i>-seed<s>.png`, one per image. Image j of prompt i uses seed `s = seed + i*n + j`
  and depends on nothing else (not on the batch it was drawn in), so
  `prompts='["<prompt i>"]' n=1 seed=<s>` regenerates it alone (the PNG's metadata holds its prompt, seed and
  that command);
- `grid.png`, the images captioned with their prompt and seed, one row per prompt when n > 1;
- `samples.json`, the settings and each file's prompt, the text the encoder read for it, seed and command.

Prompts missing from the run's embedding cache are encoded with the checkpoint's encoder (which is loaded
only then) and added to the cache. When the run used prompt expansion for sampling (`prompt_expansion.sample`),
each prompt is first rewritten by its expander (cached too); `samples.json` lists the text the encoder read.
Diffusion backends take another sampler by name (`sampler=DPMSolverMultistepScheduler`) and also edit: `init_image=PATH` alone is image-to-image
(SDEdit, `strength`), with `mask=PATH` inpainting (white = regenerate, black = keep). The image is
centre-cropped to a square and resized to the model's resolution; the mask must have the image's size.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image, ImageOps, UnidentifiedImageError

from text2img.errors import ConfigError
from text2img.run.command_line import run_checked
from text2img.run.compose import load_model, one_line_errors
from text2img.run.config_checks import (
    ANY_INTEGER,
    NULL,
    NUMBER,
    Requirement,
    check_device,
    check_rules,
    integer,
)
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
from text2img.utils.checkpoints import run_folder
from text2img.utils.grid import captioned_grid
from text2img.utils.paths import CONF_DIR

log = logging.getLogger(__name__)

REQUIRED = {"ckpt": "outputs/train/runs/<run>/checkpoints/last.ckpt", "prompts": """'["red apple"]'"""}
# The options' types (their ranges are checked where they are used, and by the generator)
RULES = (
    ("n", ANY_INTEGER), ("seed", integer(0)), ("batch_size", ANY_INTEGER), ("guidance", NUMBER | NULL),
    ("steps", ANY_INTEGER | NULL), ("sampler", Requirement(lambda value: isinstance(value, str), "a class name") | NULL),
)


@dataclass
class Sampled:
    """What `sample` wrote: the folder, one PNG per image (prompt-major order) and the grid."""

    folder: Path
    images: list[Path]
    grid: Path


def check_prompts(value: Any) -> list[str]:
    prompts = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, ListConfig)) else None
    if not prompts:
        raise ConfigError(f"prompts={value!r} gives no prompt; pass a list, e.g. prompts={REQUIRED['prompts']}")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"prompts[{index}]={prompt!r} is not a prompt; every prompt must be non-empty text")
    return prompts


def _open_image(option: str, path: str) -> Image.Image:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{option}='{path}' does not exist; pass an image file (PNG, JPEG, ...)")
    try:
        with Image.open(file) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"{option}='{path}' is not an image PIL can read ({exc}); pass a PNG or JPEG file") from None


def load_edit(cfg: DictConfig, image_size: int) -> ImageEdit | None:
    """The editing input of one image (batch of 1) at the model's resolution, or None without `init_image`."""
    if cfg.init_image is None:
        for option in ("mask", "strength"):
            if cfg[option] is not None:
                raise ConfigError(f"{option}={cfg[option]} needs init_image=PATH, the image to edit")
        return None
    image = _open_image("init_image", cfg.init_image)
    if image.size != (image_size, image_size):
        log.info("init_image %dx%d is centre-cropped and resized to the model's %d px", *image.size, image_size)
    mask = None
    if cfg.mask is not None:
        mask = _open_image("mask", cfg.mask)
        if mask.size != image.size:
            raise ConfigError(
                f"mask='{cfg.mask}' is {mask.size[0]}x{mask.size[1]} but init_image='{cfg.init_image}' is "
                f"{image.size[0]}x{image.size[1]}; give a mask of the image's size (white = regenerate, black = keep)"
            )
    edit = edit_from_images(image, mask, cfg.strength, image_size)
    if edit.mask is not None and not edit.mask.any():
        log.warning("mask='%s' is black everywhere: every pixel is kept and the output equals the input", cfg.mask)
    return edit


def output_folder(cfg: DictConfig, mode: str) -> Path:
    if cfg.out:
        return Path(cfg.out).expanduser()
    stem = Path(cfg.ckpt).stem
    base = run_folder(cfg.ckpt) / "samples" / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{stem}-{mode}-seed{cfg.seed}"
    folder, copy = base, 1
    while folder.exists():  # two runs in the same second
        copy += 1
        folder = base.with_name(f"{base.name}-{copy}")
    return folder


def sample(cfg: DictConfig) -> Sampled:
    """Generate `n` images per prompt and write them, the grid and `samples.json`."""
    with one_line_errors():
        for option, example in REQUIRED.items():
            if OmegaConf.is_missing(cfg, option):
                raise ConfigError(f"{option} is required, e.g. {option}={example}")
        prompts = check_prompts(cfg.prompts)
        check_rules({key: cfg[key] for key, _ in RULES}, RULES)
        for option in ("n", "batch_size"):
            if cfg[option] < 1:
                raise ConfigError(f"{option}={cfg[option]} must be at least 1")
        if cfg.out and Path(cfg.out).expanduser().is_file():
            raise ConfigError(f"out='{cfg.out}' is a file; pass a folder (new or existing) for the images")
        device = check_device(cfg.device)
        checkpoint, _, model = load_model(cfg.ckpt)
        edit = load_edit(cfg, model.generator.image_size)
        model.to(device).eval()
        options = SamplingOptions(cfg.guidance, cfg.steps, cfg.sampler, cfg.batch_size)
        # Not trimmed to the longest prompt: an image does not depend on the lengths of its batch neighbours.
        encoded = model.conditioner.sampling(prompts)
        encoder_texts, text = encoded.texts, encoded.text
        entries = prompt_seeds(prompts, cfg.n, cfg.seed)
        rows, seeds = torch.tensor([i for i, _, _ in entries]), [s for _, _, s in entries]
        images = generate_images(model, text[rows], seeds, options, edit)
    mode = "txt2img" if edit is None else "img2img" if edit.mask is None else "inpaint"
    folder = output_folder(cfg, mode)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint_path = Path(cfg.ckpt).expanduser().absolute()
    edit_files = None
    if edit is not None:
        mask = None if cfg.mask is None else Path(cfg.mask).expanduser().absolute()
        edit_files = EditFiles(Path(cfg.init_image).expanduser().absolute(), mask, edit.strength)
    paths, commands = [], []
    for (i, prompt, s), pixels in zip(entries, to_uint8(images), strict=True):
        paths.append(folder / image_name(i, prompt, s))
        commands.append(sample_command(checkpoint_path, prompt, s, options, edit_files))
        save_png(paths[-1], pixels, {"prompt": prompt, "seed": str(s), "command": commands[-1]})
    grid = folder / "grid.png"
    captions = [f"{prompt} (seed {s})" for _, prompt, s in entries]
    captioned_grid(images, captions, ncols=cfg.n if cfg.n > 1 else 8).save(grid)
    manifest = {
        "checkpoint": str(checkpoint_path),
        "step": checkpoint.get("global_step"),
        "guidance": cfg.guidance,  # null: the checkpoint generator's default
        "steps": cfg.steps,
        "sampler": cfg.sampler,
        "edit": None if edit is None else {"init_image": cfg.init_image, "mask": cfg.mask, "strength": edit.strength},
        "images": [
            {"file": path.name, "prompt": p, "encoder_text": encoder_texts[i], "seed": s, "command": command}
            for path, (i, p, s), command in zip(paths, entries, commands)
        ],
    }
    (folder / "samples.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{len(paths)} images and grid.png -> {folder}")
    return Sampled(folder, paths, grid)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sample")
def hydra_main(cfg: DictConfig) -> None:
    sample(cfg)


def main() -> None:
    run_checked(hydra_main)


if __name__ == "__main__":
    main()
