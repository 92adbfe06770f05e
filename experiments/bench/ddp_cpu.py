"""One process at batch B against `trainer=ddp_cpu` (two gloo processes) at B/2 each: throughput, and whether
the two give the same losses for the same global batches.

    python experiments/bench/ddp_cpu.py [--batch 32] [--steps 12] [--repeats 2] [overrides ...]

Each variant is a fresh `python ddp_cpu.py --worker ...` (Lightning relaunches the script for rank 1), run in
turn (single, ddp, single, ddp, ...) so machine noise hits both alike. Both train the default model with the
Lightning Trainer of `conf/trainer/{cpu,ddp_cpu}.yaml` on the same global batches (the training loader's seeded
order, noise keyed by sample: see `equivalence.py`, caption dropout off). Each DDP process gets its share of
the cores as torch threads, the single process `--single-threads` (default: all). Reports images/s (median step
time after warm-up on rank 0, the steps being in lockstep) and the largest difference between the single
process's loss and the mean of the two processes' losses at each step. Extra arguments are Hydra overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from equivalence import OptimizerStepTimer, mean_loss_per_step, record_losses, side_by_side  # noqa: E402
from train_throughput import ROOT, build_model, compose_cfg  # noqa: E402
from text2img.run.compose import build_data  # noqa: E402

VARIANTS = {"single": ("cpu", 1), "ddp": ("ddp_cpu", 2)}


def worker(args: argparse.Namespace) -> None:
    """One variant's run; every rank writes its step times and losses to `<out>/ddp_cpu-<variant>-rank<r>.json`."""
    trainer_option, processes = VARIANTS[args.variant]
    torch.set_num_threads(args.single_threads if processes == 1 else max(1, os.cpu_count() // processes))
    cfg = compose_cfg([f"trainer={trainer_option}", f"data.batch_size={args.batch // processes}",
                       "model.caption_dropout=0", *args.overrides], args.out)
    datamodule = build_data(cfg)
    model = build_model(cfg)
    losses = record_losses(model)
    timer = OptimizerStepTimer()
    trainer = instantiate(
        cfg.trainer, max_steps=args.steps, max_time=None, logger=False, callbacks=[timer], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(model, datamodule=datamodule)
    record = {"times": timer.times, "losses": losses, "threads": torch.get_num_threads()}
    (args.out / f"ddp_cpu-{args.variant}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run_variant(args: argparse.Namespace, variant: str) -> list[dict]:
    for stale in args.out.glob(f"ddp_cpu-{variant}-rank*.json"):
        stale.unlink()
    command = [sys.executable, __file__, "--worker", variant, "--batch", str(args.batch),
               "--steps", str(args.steps + args.warmup), "--single-threads", str(args.single_threads),
               "--out", str(args.out), *args.overrides]
    subprocess.run(command, check=True, cwd=ROOT)
    return [json.loads(path.read_text()) for path in sorted(args.out.glob(f"ddp_cpu-{variant}-rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="the global batch of a step")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--single-threads", type=int, default=os.cpu_count(), help="torch threads of the single process")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    parser.add_argument("--worker", choices=VARIANTS, dest="variant", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        return worker(args)

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    losses: dict[str, dict[int, float]] = {}
    threads: dict[str, int] = {}
    for _ in range(args.repeats):
        for name in VARIANTS:
            ranks = run_variant(args, name)
            times[name] += ranks[0]["times"][args.warmup:]
            losses[name] = mean_loss_per_step([tuple(item) for rank in ranks for item in rank["losses"]])
            threads[name] = ranks[0]["threads"]
    result = {
        **side_by_side(args.batch, times, losses, "single", "ddp"),
        "threads_per_process": threads,
        "overrides": args.overrides,
    }
    print(json.dumps(result, indent=2))
    (args.out / f"ddp_cpu-single{args.single_threads}threads.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
