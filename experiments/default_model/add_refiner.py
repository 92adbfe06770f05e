"""Give a checkpoint of latent diffusion on a patch code (`generator/first_stage=patch_pca`) a trained refiner of
the code's decode, and write it as a new checkpoint that `text2img.evaluate`, `sample`, `demo` and `export` load
as any other.

    python experiments/default_model/add_refiner.py CKPT OUT [--width 96] [--steps 600] [--noise 1.0]

A refiner changes nothing in how the denoiser trains (building it draws nothing from the run's random stream; it
is trained from its own seed on the training images, after the code's fit), so OUT is the checkpoint that the same
run with these `generator.first_stage.refiner_*` options would have written. This is how the refiner was measured
on checkpoints trained before it existed (experiments/default_model/README.md, "the refiner").
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from hydra.utils import instantiate

from text2img.generators.patch_autoencoder import PatchAutoencoder
from text2img.run.compose import load_model
from text2img.utils.files import atomic_path

PREFIX = "generator.first_stage."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="a text2img checkpoint of generator=ldm on generator/first_stage=patch_pca")
    parser.add_argument("out", type=Path, help="the checkpoint to write")
    parser.add_argument("--width", type=int, default=96, help="the refiner's channels")
    parser.add_argument("--steps", type=int, default=600, help="its training steps (64 images each)")
    parser.add_argument("--noise", type=float, default=1.0, help="the largest std of the latents' noise")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the refiner's training reports its progress

    checkpoint, datamodule, model = load_model(args.ckpt)
    first_stage = getattr(model.generator, "first_stage", None)
    if first_stage is None or not isinstance(first_stage.autoencoder, PatchAutoencoder):
        raise SystemExit(f"add_refiner: error: {args.ckpt} is not latent diffusion on a patch code")
    options = {"refiner_width": args.width, "refiner_steps": args.steps, "refiner_noise": args.noise}
    config = checkpoint["text2img_config"]["generator"]["first_stage"]  # the run's, resolved: same code, same dtype
    refined = instantiate({**config, **options})
    refined.load_state_dict(first_stage.state_dict(), strict=False)  # the fitted code; the refiner is new
    refined.fit_to(datamodule.source)  # trains the refiner alone

    state = {name: value for name, value in checkpoint["state_dict"].items() if not name.startswith(PREFIX)}
    state.update({PREFIX + name: value for name, value in refined.state_dict().items()})
    checkpoint["state_dict"] = state
    config.update(options)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:  # a crash leaves no half-written checkpoint under OUT's name
        torch.save(checkpoint, tmp)
    print(f"{args.out}: {args.ckpt} with a refiner of the patch code's decode ({options})")


if __name__ == "__main__":
    main()
