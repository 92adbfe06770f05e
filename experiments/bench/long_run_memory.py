"""Memory over a long run: the resident set size (RSS) of a 1,000-step training run, sampled every 50 steps after
warm-up, and the cost of the per-step non-finite loss check.

    python experiments/bench/long_run_memory.py [--every 50] [--warmup 100] [overrides ...]

The run is `text2img.train`'s own (`build`: data, model, trainer with every default callback: checkpoints,
EMA, evaluation metrics, sample grids, LR monitor), by default `debug=smoke trainer.max_steps=1000
trainer.val_check_interval=250 logger=csv test=false`; extra arguments are further Hydra overrides. Reports the
RSS at the first and last sample, its maximum, and the least-squares slope in MB per 100 steps (validations
included); data loader workers, if any, are counted separately. Target: no growth (slope ~0).

The non-finite check (`text2img.lightning.nonfinite.NonFiniteLossPolicy.check`: on the CPU's default optimisers a
host read per step; with fused ones, the GPU's default, the flags stay on the device) is timed on its own
afterwards, against the median training step of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import lightning as L  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from omegaconf import open_dict  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import ROOT, StepTimer, compose_cfg  # noqa: E402

from text2img.run.compose import build  # noqa: E402

RUN = ["debug=smoke", "trainer.max_steps=1000", "trainer.val_check_interval=250", "logger=csv", "test=false"]


class ResidentMemory(L.Callback):
    """RSS (MB) of this process and of its child processes every `every` steps from step `warmup` on."""

    def __init__(self, every: int, warmup: int) -> None:
        self.every, self.warmup = every, warmup
        self.samples: list[tuple[int, float, float]] = []  # (step, own MB, children MB)
        self.process = psutil.Process()

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        step = trainer.global_step
        if step >= self.warmup and step % self.every == 0:
            children = sum(child.memory_info().rss for child in self.process.children(recursive=True))
            self.samples.append((step, self.process.memory_info().rss / 2**20, children / 2**20))


def slope_per_100_steps(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of MB against steps, times 100."""
    steps, mb = [p[0] for p in points], [p[1] for p in points]
    mean_step, mean_mb = statistics.mean(steps), statistics.mean(mb)
    covariance = sum((s - mean_step) * (m - mean_mb) for s, m in zip(steps, mb))
    return 100 * covariance / sum((s - mean_step) ** 2 for s in steps)


def check_cost_us(model, calls: int = 2000) -> float:
    """Median time of one non-finite check of a scalar loss, in microseconds."""
    loss = torch.tensor(0.5)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        model.nonfinite.check(model, {"loss": loss}, 0)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    cfg = compose_cfg([*RUN, *args.overrides], args.out / "long_run")
    with open_dict(cfg):
        del cfg.hydra  # kept by HydraConfig; the run config stored in checkpoints leaves it out, as the CLI's does
    L.seed_everything(cfg.seed, workers=True)
    run = build(cfg)
    memory, timer = ResidentMemory(args.every, args.warmup), StepTimer()
    run.trainer.callbacks += [memory, timer]
    start = time.perf_counter()
    run.trainer.fit(run.model, datamodule=run.datamodule)
    wall = time.perf_counter() - start

    own = [(step, mb) for step, mb, _ in memory.samples]
    step_ms = 1e3 * statistics.median(timer.times)
    check_us = check_cost_us(run.model)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "steps": run.trainer.global_step,
        "wall_s": round(wall, 1),
        "rss_start_mb": round(own[0][1], 1),
        "rss_end_mb": round(own[-1][1], 1),
        "rss_max_mb": round(max(mb for _, mb in own), 1),
        "rss_slope_mb_per_100_steps": round(slope_per_100_steps(own), 2),
        # the first validation loads the metrics' feature extractor once: growth after it is what would accumulate
        "rss_slope_after_first_validation_mb_per_100_steps": round(
            slope_per_100_steps([(step, mb) for step, mb in own if step > cfg.trainer.val_check_interval]), 2
        ),
        "children_rss_max_mb": round(max(c for *_, c in memory.samples), 1),
        "samples": {step: round(mb, 1) for step, mb in own},
        "median_step_ms": round(step_ms, 2),
        "nonfinite_check_us": round(check_us, 1),
        "nonfinite_check_share_of_step": float(f"{check_us / (1e3 * step_ms):.2g}"),
        "overrides": [*RUN, *args.overrides],
    }
    print(json.dumps(result, indent=2))
    (args.out / "long_run_memory.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
