"""Captioned sample grids: layout, validation, and that captions are actually drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from text2img.utils.grid import GAP, captioned_grid


def test_grid_layout_matches_columns_and_rows() -> None:
    cell = 64
    one_row = captioned_grid(torch.rand(3, 3, 16, 16), ["a", "b", "c"], ncols=4, cell_size=cell)
    two_rows = captioned_grid(torch.rand(6, 3, 16, 16), list("abcdef"), ncols=4, cell_size=cell)
    assert one_row.width == 3 * (cell + GAP) + GAP  # fewer images than ncols: no empty columns
    assert two_rows.width == 4 * (cell + GAP) + GAP
    row_height = two_rows.height - one_row.height
    assert row_height > cell + GAP  # image plus a caption band
    assert one_row.height == row_height + GAP


def test_mismatched_captions_raise() -> None:
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        captioned_grid(torch.rand(3, 3, 8, 8), ["a", "b"])


def test_images_are_pixelated_and_captions_drawn() -> None:
    cell = 64
    images = torch.zeros(2, 3, 8, 8)
    images[:, 0, ::2, ::2] = 1.0  # red checker pixels: nearest upscaling keeps them as 8x8 blocks
    grid = np.asarray(captioned_grid(images, ["a red checkerboard", ""], ncols=2, cell_size=cell))
    tile = grid[GAP : GAP + cell, GAP : GAP + cell]
    assert set(np.unique(tile[..., 0])) == {0, 255}  # no interpolated in-between values
    band_top = GAP + cell
    first_band = grid[band_top:, GAP : GAP + cell]
    second_band = grid[band_top:, 2 * GAP + cell : 2 * (GAP + cell)]
    assert (first_band < 128).any()  # dark caption text under the captioned image
    assert (second_band == 255).all()  # the empty caption leaves a white band


def test_long_captions_wrap_to_at_most_three_lines() -> None:
    long_caption = " ".join(["word"] * 60)
    grid = np.asarray(captioned_grid(torch.rand(1, 3, 8, 8), [long_caption], cell_size=128))
    inked_rows = np.flatnonzero((grid[GAP + 128 :] < 128).any(axis=(1, 2)))
    assert inked_rows.size > 0 and inked_rows.max() < grid.shape[0] - GAP  # text stays inside its band
    # Nothing is drawn right of the cell: wrapping keeps text within the cell width.
    assert (grid[GAP + 128 :, GAP + 128 :] == 255).all()
