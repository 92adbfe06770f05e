"""Gradient accumulation: the cost of `trainer.accumulate_grad_batches=K` at batch B/K against one batch of B,
and whether the two give the same losses.

    python experiments/bench/grad_accumulation.py [--batch 32] [--accumulate 4] [--steps 12] [--repeats 2] [overrides ...]

Both variants train the default model with the Lightning Trainer for the same number of optimizer steps on
the same global batches (the training loader's seeded order, noise keyed by sample: see `equivalence.py`,
caption dropout off), alternating within one process. Reports images/s (median optimizer-step time after
warm-up), their ratio, and the largest difference of the optimizer-step losses (the mean over the K
micro-batches). Extra arguments are Hydra overrides of conf/train.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


sys.path.insert(0, str(Path(__file__).resolve().parent))
from equivalence import side_by_side, timed_fit  # noqa: E402
from train_throughput import ROOT, build_model, compose_cfg  # noqa: E402

from text2img.run.compose import build_data  # noqa: E402


def run(cfg, datamodule, micro_batch: int, accumulate: int, steps: int) -> tuple[list[float], dict[int, float]]:
    """Step times and per-step losses of `steps` optimizer steps."""
    datamodule.batch_size = micro_batch
    return timed_fit(build_model(cfg), datamodule, steps, gradient_clip_val=cfg.trainer.gradient_clip_val,
                     precision=cfg.trainer.precision, accumulate_grad_batches=accumulate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="the global batch of an optimizer step")
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.batch % args.accumulate:
        parser.error(f"--batch {args.batch} is not a multiple of --accumulate {args.accumulate}")
    args.out.mkdir(parents=True, exist_ok=True)

    cfg = compose_cfg(["model.caption_dropout=0", *args.overrides], args.out)
    datamodule = build_data(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")

    variants = {"whole": (args.batch, 1), "accumulated": (args.batch // args.accumulate, args.accumulate)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, dict[int, float]] = {}
    for _ in range(args.repeats):
        for name, (micro_batch, accumulate) in variants.items():
            step_times, losses[name] = run(cfg, datamodule, micro_batch, accumulate, args.steps + args.warmup)
            times[name] += step_times[args.warmup:]
    result = {
        **side_by_side(args.batch, times, losses, "whole", "accumulated"),
        "accumulate_grad_batches": args.accumulate,
        "overrides": args.overrides,
    }
    print(json.dumps(result, indent=2))
    (args.out / "grad_accumulation.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
