"""Image grid with each caption written under its image, for logging samples next to their prompts."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

GAP = 6  # white gutter around every cell, so neighbouring images and captions do not run together
MAX_CAPTION_LINES = 3


def _font_size(cell_size: int) -> int:
    # About 18-20 characters per line at the default 128 px cell; never below the legible minimum.
    return max(9, min(16, cell_size // 10))


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels, at most MAX_CAPTION_LINES lines ('...' marks cut text)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        # A single word wider than the cell is split by characters rather than overflowing.
        while len(word) > 1 and font.getlength(word) > width:
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}" if line else word
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    if len(lines) > MAX_CAPTION_LINES:
        last = lines[MAX_CAPTION_LINES - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = lines[: MAX_CAPTION_LINES - 1] + [last.rstrip() + "..."]
    return lines


def captioned_grid(images: Tensor, captions: list[str], ncols: int = 8, cell_size: int = 128) -> Image.Image:
    """Tile images [N,3,H,W] (float in [0,1]) `ncols` per row, each with its wrapped caption underneath.

    Images are scaled with nearest-neighbour so that individual pixels of small samples stay visible
    (non-square images are stretched to the square cell).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N,3,H,W], got shape {tuple(images.shape)}")
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions; need one caption per image")
    if len(images) == 0 or ncols < 1 or cell_size < 1:
        raise ValueError(f"need at least one image, ncols >= 1 and cell_size >= 1 (got ncols={ncols}, "
                         f"cell_size={cell_size}, {len(images)} images)")

    font = ImageFont.load_default(size=_font_size(cell_size))
    line_height = int(font.getbbox("Ag")[3]) + 1  # "Ag": tallest ascender and lowest descender
    band = MAX_CAPTION_LINES * line_height + GAP  # fixed height, so rows line up whatever the captions
    cols = min(ncols, len(images))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * (cell_size + GAP) + GAP, rows * (cell_size + band + GAP) + GAP), "white")
    draw = ImageDraw.Draw(grid)

    pixels = (images.detach().float().clamp(0, 1) * 255).round().byte()
    pixels = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    for i, (pix, caption) in enumerate(zip(pixels, captions, strict=True)):
        x = GAP + (i % cols) * (cell_size + GAP)
        y = GAP + (i // cols) * (cell_size + band + GAP)
        cell = Image.fromarray(pix).resize((cell_size, cell_size), Image.Resampling.NEAREST)
        grid.paste(cell, (x, y))
        for j, line in enumerate(_wrap(caption, font, cell_size)):
            draw.text((x, y + cell_size + GAP // 2 + j * line_height), line, fill="black", font=font)
    return grid
