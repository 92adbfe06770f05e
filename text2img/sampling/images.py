"""Images for prompts from a trained model, as `text2img.sample` makes them and the demo shows them: seeds, file
names, batches, edit inputs, PNG metadata and the command that regenerates one image.

Image j of prompt i uses seed `seed + i*n + j` and depends on nothing else (not on the batch it was drawn in), so
`python -m text2img.sample ckpt=... prompts='["<prompt i>"]' n=1 seed=<that seed>` regenerates it alone.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from text2img.data.base import uint8_to_tensor
from text2img.data.imagefolder import square_rgb
from text2img.sampling.runtime import DEFAULT_STRENGTH, ImageEdit
from text2img.types import TextEmbedding


class ImageModel(Protocol):
    """What draws the images: `Text2ImgModule` (this layer does not import it)."""

    device: torch.device

    def generate(
        self, text: TextEmbedding, seeds: Sequence[int], guidance_scale: float | None = None,
        steps: int | None = None, edit: ImageEdit | None = None, sampler: str | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class SamplingOptions:
    """How images are drawn; None is the checkpoint generator's own setting. `batch_size` changes no image."""

    guidance: float | None = None
    steps: int | None = None
    sampler: str | None = None
    batch_size: int = 16


@dataclass(frozen=True)
class EditFiles:
    """The files an edit reads, as `text2img.sample` takes them (init_image, mask) with its strength."""

    init_image: Path
    mask: Path | None
    strength: float


def image_seed(seed: int, prompt_index: int, n: int, j: int) -> int:
    """The seed of image j of prompt i."""
    return seed + prompt_index * n + j


def prompt_seeds(prompts: list[str], n: int, seed: int) -> list[tuple[int, str, int]]:
    """(prompt index, prompt, seed) of every image, prompt-major: n images per prompt."""
    return [(i, prompt, image_seed(seed, i, n, j)) for i, prompt in enumerate(prompts) for j in range(n)]


def slug(prompt: str, max_length: int = 40) -> str:
    """A file-name-safe short form of a prompt: "Red apple, shiny!" -> "red-apple-shiny"."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_length].rstrip("-") or "prompt"


def image_name(prompt_index: int, prompt: str, seed: int) -> str:
    return f"p{prompt_index:03d}-{slug(prompt)}-seed{seed}.png"


def edit_from_images(
    image: Image.Image, mask: Image.Image | None, strength: float | None, image_size: int
) -> ImageEdit:
    """The edit of one image (a batch of 1) at the model's resolution: `image` centre-cropped and resized, `mask`
    (white = regenerate, black = keep; the image's size) cut the same way; `strength` None is the mode's default."""
    pixels = uint8_to_tensor(square_rgb(image, image_size))[None]
    mask_tensor = None
    if mask is not None:
        # The same crop as the image; nearest-neighbour keeps the mask's edge where it was drawn.
        grey = ImageOps.fit(mask.convert("L"), (image_size, image_size), Image.Resampling.NEAREST)
        mask_tensor = torch.from_numpy(np.asarray(grey) > 127).float()[None, None]
    if strength is None:
        strength = DEFAULT_STRENGTH["img2img" if mask_tensor is None else "inpaint"]
    return ImageEdit(images=pixels, strength=float(strength), mask=mask_tensor)


def generate_images(
    model: ImageModel,
    text: TextEmbedding,
    seeds: list[int],
    options: SamplingOptions,
    edit: ImageEdit | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] for N (text row, seed) pairs, `options.batch_size` at a time; every image is
    edited from the same input when `edit` (a batch of one) is given. `on_batch(count)` follows each batch."""
    images = []
    for start in range(0, len(seeds), options.batch_size):
        batch = slice(start, start + options.batch_size)
        count = len(seeds[batch])
        batch_edit = None
        if edit is not None:
            mask = None if edit.mask is None else edit.mask.expand(count, -1, -1, -1)
            batch_edit = replace(edit, images=edit.images.expand(count, -1, -1, -1), mask=mask)
        images.append(
            model.generate(
                text[batch].to(model.device), seeds[batch], guidance_scale=options.guidance, steps=options.steps,
                edit=batch_edit, sampler=options.sampler,
            ).cpu()
        )
        if on_batch is not None:
            on_batch(count)
    return torch.cat(images)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> [N, H, W, 3] uint8, the pixels the PNG files hold."""
    return (images * 255).round().byte().permute(0, 2, 3, 1).numpy()


def sample_command(
    checkpoint: str | Path, prompt: str, seed: int, options: SamplingOptions, edit: EditFiles | None = None
) -> str:
    """The shell command with which `text2img.sample` regenerates the image of `prompt` and `seed` alone."""
    args = ["python", "-m", "text2img.sample", f"ckpt={checkpoint}", f"prompts=[{hydra_quoted(prompt)}]"]
    args += ["n=1", f"seed={seed}"]
    for key in ("guidance", "steps", "sampler"):
        value = getattr(options, key)
        if value is not None:
            args.append(f"{key}={value}")
    if edit is not None:
        args += [f"init_image={edit.init_image}", f"strength={edit.strength}"]
        if edit.mask is not None:
            args.append(f"mask={edit.mask}")
    return shlex.join(args)


def hydra_quoted(text: str) -> str:
    """`text` as a double-quoted string of a Hydra override that reads back as `text` exactly: backslashes that
    precede a quote, the end or an interpolation are doubled, quotes and `${` escaped."""
    text = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    return f'"{text}"'


def save_png(path: Path, pixels: np.ndarray, metadata: dict[str, str]) -> None:
    """One image [H, W, 3] uint8 as a PNG whose text chunks hold `metadata` (prompt, seed, the command, ...)."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_itxt(key, value)  # international text: prompts need not be Latin-1
    Image.fromarray(pixels).save(path, pnginfo=info)
