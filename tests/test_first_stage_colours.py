"""experiments/default_model/first_stage_colours.py: the colour error that tells a first stage which draws every
hue brown from one which keeps OpenMoji's colours."""

import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import REPO_ROOT, write_tiny_autoencoder

sys.path.insert(0, str(REPO_ROOT / "experiments" / "default_model"))
import first_stage_colours  # noqa: E402


def flat(rgb: tuple[float, float, float], size: int = 4) -> torch.Tensor:
    """One image of a single colour given in [0, 1] sRGB, as a [1, 3, size, size] batch in [-1, 1]."""
    return (torch.tensor(rgb).view(1, 3, 1, 1) * 2 - 1).expand(1, 3, size, size).clone()


@pytest.mark.parametrize(
    ("rgb", "lab"),
    [
        ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
        ((1.0, 0.0, 0.0), (53.24, 80.09, 67.20)),
        ((1.0, 1.0, 0.0), (97.14, -21.55, 94.48)),
        ((0.0, 0.0, 1.0), (32.30, 79.19, -107.86)),
    ],
)
def test_cielab_of_reference_colours(rgb, lab):
    assert first_stage_colours.cielab(flat(rgb))[0, :, 0, 0] == pytest.approx(torch.tensor(lab), abs=0.05)


def test_colour_error_separates_a_brown_copy_from_a_faithful_one():
    real = torch.cat([flat((1.0, 0.85, 0.1)), flat((1.0, 1.0, 1.0))], dim=-1)  # a yellow half, a white half
    brown = torch.cat([flat((0.55, 0.38, 0.2)), flat((1.0, 1.0, 1.0))], dim=-1)
    slightly_off = torch.cat([flat((0.97, 0.83, 0.12)), flat((0.9, 0.9, 0.9))], dim=-1)

    assert first_stage_colours.colour_error(real, real) == pytest.approx(0.0, abs=1e-4)
    assert first_stage_colours.colour_error(real, slightly_off) < 5
    assert first_stage_colours.colour_error(real, brown) > 40
    # only the real image's coloured pixels count: a white region drawn grey costs nothing
    greyed_white = torch.cat([flat((1.0, 0.85, 0.1)), flat((0.5, 0.5, 0.5))], dim=-1)
    assert first_stage_colours.colour_error(real, greyed_white) == pytest.approx(0.0, abs=1e-3)


def test_figures_and_strip_of_a_first_stage(tmp_path):
    torch.manual_seed(0)
    real = torch.rand(16, 3, 32, 32) * 2 - 1
    rebuilt = first_stage_colours.first_stage_reconstructions(
        str(write_tiny_autoencoder(tmp_path / "vae")), real
    )
    figures = first_stage_colours.reconstruction_figures(real, rebuilt)

    assert rebuilt.shape == real.shape and rebuilt.abs().max() <= 1
    expected_psnr = (10 * torch.log10(4 / ((rebuilt - real) ** 2).mean(dim=(1, 2, 3)))).mean().item()
    assert figures["psnr_db"] == pytest.approx(expected_psnr, rel=1e-5)
    assert figures["colour_error_ab"] > 0
    first_stage_colours.save_strip(real, rebuilt, tmp_path / "strip.png")
    assert Image.open(tmp_path / "strip.png").size == (16 * 32 * 2, 2 * 32 * 2)


def test_patch_pca_code_is_exact_with_every_component_and_loses_more_with_fewer():
    torch.manual_seed(0)
    # smooth images (low-passed noise), so that a few components hold most of a patch
    images = F.avg_pool2d(torch.rand(64, 3, 40, 40) * 2 - 1, 9, stride=1)[..., :32, :32]
    real = images[:8]
    full = first_stage_colours.patch_pca_reconstructions(images, real, channels=48)
    assert torch.allclose(full, real, atol=1e-4)
    psnr = [
        first_stage_colours.reconstruction_figures(
            real, first_stage_colours.patch_pca_reconstructions(images, real, channels)
        )["psnr_db"]
        for channels in (2, 8, 24)
    ]
    assert psnr[0] < psnr[1] < psnr[2]
