"""Does a first stage keep OpenMoji's colours? PSNR of its reconstructions and a strip of real over reconstructed.

    python experiments/default_model/first_stage_colours.py FIRST_STAGE.ckpt OUT.png [--images 256]

Reconstructs a fixed random sample of the rendered OpenMoji images (32 px, the render cache of `data=openmoji`)
through the posterior mean and the decoder; prints the mean PSNR and writes the first 16 pairs to OUT.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from text2img.data.openmoji import OpenMojiRender
from text2img.generators.first_stage import load_first_stage

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--render", type=Path, default=next((ROOT / ".cache" / "openmoji").glob("*-32px.npz"), None),
                        help="the OpenMoji render cache (.npz); `make train` writes it")
    args = parser.parse_args()
    if args.render is None or not args.render.is_file():
        parser.error(f"no OpenMoji render cache at {args.render}; run `make train` once, or pass --render PATH")
    render = OpenMojiRender.load(args.render)
    chosen = np.random.default_rng(0).choice(len(render.images), args.images, replace=False)
    real = torch.from_numpy(render.images[chosen]).permute(0, 3, 1, 2).float() / 127.5 - 1
    first_stage = load_first_stage(args.checkpoint)
    mean = first_stage.moments(real).chunk(2, dim=1)[0]
    rebuilt = first_stage.decode(mean).clamp(-1, 1)
    psnr = 10 * torch.log10(4 / ((rebuilt - real) ** 2).mean(dim=(1, 2, 3)))  # peak-to-peak 2 on [-1, 1]
    print(f"{args.checkpoint}: PSNR {psnr.mean():.2f} dB over {args.images} images")
    rows = [((images[:16] + 1) * 127.5).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy() for images in (real, rebuilt)]
    strip = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    Image.fromarray(strip).resize((strip.shape[1] * 2, strip.shape[0] * 2), Image.NEAREST).save(args.out)


if __name__ == "__main__":
    main()
