"""bf16 mixed precision against 32-bit on the CPU: training throughput and loss curves.

    python experiments/bench/precision_cpu.py [--steps 20] [--repeats 2] [overrides ...]

Both variants train the default model with the Lightning Trainer (`trainer.precision=32-true`, then
`bf16-mixed`: autocast to bfloat16 on the CPU) on the same batches with the same noise (keyed by sample, see
`equivalence.py`; caption dropout off), alternating within one process. Reports images/s (median step time
after warm-up), their ratio, the per-step loss curves and their largest difference. Extra arguments are Hydra
overrides of conf/train.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


sys.path.insert(0, str(Path(__file__).resolve().parent))
from equivalence import side_by_side, timed_fit  # noqa: E402
from train_throughput import ROOT, build_model, compose_cfg  # noqa: E402

from text2img.run.compose import build_data  # noqa: E402

PRECISIONS = ("32-true", "bf16-mixed")


def run(cfg, datamodule, precision: str, steps: int) -> tuple[list[float], dict[int, float]]:
    return timed_fit(build_model(cfg), datamodule, steps, gradient_clip_val=cfg.trainer.gradient_clip_val,
                     precision=precision)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    cfg = compose_cfg(["model.caption_dropout=0", *args.overrides], args.out)
    datamodule = build_data(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")

    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    curves: dict[str, dict[int, float]] = {}
    for _ in range(args.repeats):
        for precision in PRECISIONS:
            step_times, curves[precision] = run(cfg, datamodule, precision, args.steps + args.warmup)
            times[precision] += step_times[args.warmup:]
    steps = sorted(curves["32-true"])
    result = {
        **side_by_side(cfg.data.batch_size, times, curves, "32-true", "bf16-mixed"),
        "mean_loss_last_5": {p: round(statistics.mean(curves[p][s] for s in steps[-5:]), 4) for p in PRECISIONS},
        "loss_curves": {p: [round(curves[p][s], 4) for s in steps] for p in PRECISIONS},
        "overrides": args.overrides,
    }
    print(json.dumps(result, indent=2))
    (args.out / "precision_cpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
