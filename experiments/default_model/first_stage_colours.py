"""Does a first stage keep OpenMoji's colours? PSNR and colour error of its reconstructions, and strips of real
over reconstructed.

    python experiments/default_model/first_stage_colours.py [FIRST_STAGE.ckpt ...] [--pca CHANNELS ...]
        [--strips DIR] [--json FILE]

Reconstructs a fixed random sample of the rendered OpenMoji images (32 px, the render cache of `data=openmoji`)
through each first stage's posterior mean and decoder and, with --pca, through a fixed linear code of the same
latent shape (generator/first_stage=patch_pca: each 4x4 RGB patch projected on the top CHANNELS principal
components of all rendered images' patches, no training, fitted in 0.2 s), and prints per first stage:
- PSNR (dB, peak-to-peak 2 on [-1, 1]), averaged over images;
- colour error: on the real images' coloured pixels (CIELAB chroma C*ab > 20), the mean distance between real and
  reconstructed colour in the a*b* plane, lightness left out (about 50 for yellow or red drawn brown, 0 for a
  perfect copy). A first stage that turns every hue brown keeps its PSNR within a few dB and much of its RGB
  chroma (brown is a saturated dark orange), but not its colours.
With --strips, writes DIR/<checkpoint's run folder or patch_pca_CHANNELS>.png: the first 16 real images over
their reconstructions.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio

from text2img.data.openmoji import OpenMojiRender
from text2img.generators.first_stage import load_first_stage
from text2img.generators.patch_autoencoder import PatchAutoencoder

ROOT = Path(__file__).resolve().parents[2]


COLOURED_CHROMA = 20.0  # C*ab above which a pixel counts as coloured (greys and whites stay below ~5)


def cielab(images: Tensor) -> Tensor:
    """sRGB images in [-1, 1], [B, 3, H, W] -> CIELAB (L*, a*, b*) under D65, [B, 3, H, W]."""
    srgb = ((images + 1) / 2).clamp(0, 1)
    linear = torch.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    rgb_to_xyz = torch.tensor([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    white = torch.tensor([0.95047, 1.0, 1.08883]).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", rgb_to_xyz, linear) / white
    delta = 6 / 29
    f = torch.where(xyz > delta**3, xyz.clamp(min=1e-12) ** (1 / 3), xyz / (3 * delta**2) + 4 / 29)
    fx, fy, fz = f.unbind(dim=1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def colour_error(real: Tensor, rebuilt: Tensor) -> float:
    """Mean a*b* distance between real and rebuilt over the real images' coloured pixels."""
    real_ab, rebuilt_ab = cielab(real)[:, 1:], cielab(rebuilt)[:, 1:]
    coloured = real_ab.norm(dim=1) > COLOURED_CHROMA
    return (real_ab - rebuilt_ab).norm(dim=1)[coloured].mean().item()


def reconstruction_figures(real: Tensor, rebuilt: Tensor) -> dict[str, float]:
    """PSNR (mean over images) and colour error of reconstructions `rebuilt` of `real`."""
    # as text2img.metrics.reconstruction does, on [-1, 1] images
    psnr = peak_signal_noise_ratio(rebuilt, real, data_range=2.0, reduction="none", dim=(1, 2, 3))
    return {"psnr_db": psnr.mean().item(), "colour_error_ab": colour_error(real, rebuilt)}


def first_stage_reconstructions(checkpoint: str, real: Tensor) -> Tensor:
    """`real` through a first stage's posterior mean and decoder."""
    first_stage = load_first_stage(checkpoint)
    return first_stage.decode(first_stage.moments(real).chunk(2, dim=1)[0]).clamp(-1, 1)


def patch_pca_reconstructions(fit_images: Tensor, real: Tensor, channels: int) -> Tensor:
    """`real` through generator/first_stage=patch_pca's code of `channels` components, fitted on `fit_images`."""
    code = PatchAutoencoder(latent_channels=channels, patch_size=4).fit(fit_images.split(256))
    with torch.no_grad():
        return code.decode(code.encode(real).latent_dist.mean).sample.clamp(-1, 1)


def save_strip(real: Tensor, rebuilt: Tensor, out: Path) -> None:
    rows = [
        ((images[:16] + 1) * 127.5).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        for images in (real, rebuilt)
    ]
    strip = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    Image.fromarray(strip).resize((strip.shape[1] * 2, strip.shape[0] * 2), Image.NEAREST).save(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="*")
    parser.add_argument(
        "--pca",
        type=int,
        nargs="+",
        default=[],
        metavar="CHANNELS",
        help="also a fixed linear code: 4x4 patches through this many principal components",
    )
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument(
        "--strips", type=Path, help="folder for one real-over-reconstructed strip per first stage"
    )
    parser.add_argument("--json", type=Path, help="write the figures per first stage here")
    parser.add_argument(
        "--render",
        type=Path,
        default=next((ROOT / ".cache" / "openmoji").glob("*-32px.npz"), None),
        help="the OpenMoji render cache (.npz); `make train` writes it",
    )
    args = parser.parse_args()
    if not args.checkpoints and not args.pca:
        parser.error("nothing to measure: give first-stage checkpoints and/or --pca CHANNELS")
    if args.render is None or not args.render.is_file():
        parser.error(
            f"no OpenMoji render cache at {args.render}; run `make train` once, or pass --render PATH"
        )
    render = OpenMojiRender.load(args.render)
    every_image = torch.from_numpy(render.images).permute(0, 3, 1, 2).float() / 127.5 - 1
    real = every_image[np.random.default_rng(0).choice(len(every_image), args.images, replace=False)]
    # name (a checkpoint's run folder, or patch_pca_<channels>) -> what reconstructs `real`
    first_stages = {
        Path(checkpoint).parent.parent.name: partial(first_stage_reconstructions, checkpoint, real)
        for checkpoint in args.checkpoints
    }
    first_stages |= {
        f"patch_pca_{channels}": partial(patch_pca_reconstructions, every_image, real, channels)
        for channels in args.pca
    }
    results = {}
    for name, reconstruct in first_stages.items():
        rebuilt = reconstruct()
        results[name] = reconstruction_figures(real, rebuilt)
        print(
            f"{name}: PSNR {results[name]['psnr_db']:.2f} dB, colour error {results[name]['colour_error_ab']:.1f} "
            f"({args.images} images)",
            flush=True,
        )
        if args.strips:
            args.strips.mkdir(parents=True, exist_ok=True)
            save_strip(real, rebuilt, args.strips / f"{name}.png")
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "first_stages": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
