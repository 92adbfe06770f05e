"""The GPU check (issue 16, point 6): one call on one GPU, at most ~8 minutes, one table.

    python experiments/bench/gpu_check.py [--out DIR] [--steps 30] [--cpu]

Rows, each run in this process through the project's own entry points (`text2img.run.compose.build`,
`text2img.train.train`) on a small generated image folder with `debug=smoke`-sized models (tests/conftest.py's
`smoke_overrides`):

- `train+eval (trainer=gpu)`: bf16-mixed, a short fit with a validation, then the test metrics (`text2img.train`).
- `host syncs per step: diffusion / GAN`: the training steps under `torch.cuda.set_sync_debug_mode("warn")`, each
  warning counted per batch (logging every 4 batches): the mean outside the logging batches (target 0), the mean
  at them, and where they came from.
- `framework vs plain loop`: images/s of the framework's training step (the Lightning Trainer built by
  `build`, its callbacks and logging included) against a hand-written loop over the same modules, optimiser,
  scheduler and batches, alternated in one process; the ratio (target >= 0.95) and each one's peak GPU memory.
- `trainer=ddp trainer.devices=1` and `trainer=fsdp trainer.devices=1 '~callbacks.ema'`: a few steps each.

Prints the table, writes `gpu_check.json` and `gpu_check.md` under --out (default `$OUT` on the device machine,
else outputs/gpu_check); exits 1 if a row failed. Without a GPU it says so and exits 0; `--cpu` runs the rows a CPU
can (train+eval, framework vs plain) with trainer=cpu, to try the script itself.

On a machine whose Python lacks this project's packages (the device machine): see experiments/bench/README.md,
"GPU check", for the wheel bundle (`make gpu-wheels`) and the one command to run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LOG_EVERY = 4


def gpu_missing() -> str | None:
    if not torch.cuda.is_available():
        return "no GPU: torch.cuda.is_available() is False; the GPU check needs one (nothing was run)"
    return None


# --- runs ------------------------------------------------------------------------------------------------------


def compose(out: Path, data: Path, *overrides: str):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import compose_train, smoke_overrides  # the tests' own compose: the CLI's config, outputs under `out`

    # the evaluation's feature cache goes beside the data, as in the tests
    # the CSV logger: W&B is not among the packages the device machine is given
    return compose_train(out, smoke_overrides(data, "logger=csv", *overrides))


def image_folder(out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_imagefolder

    return write_imagefolder(out / "data", n=96)


class BatchMarks:
    """A callback factory kept apart so that importing this file needs no Lightning."""

    @staticmethod
    def make(on_start):
        import lightning as L

        class Marks(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                on_start()

        return Marks()


def step_times(run) -> list[float]:
    """Fit `run` and return the wall time of each training batch (from one batch's end to the next)."""
    import lightning as L

    times: list[float] = []

    class Timer(L.Callback):
        last = None

        def on_train_batch_end(self, *args):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            now = time.perf_counter()
            if Timer.last is not None:
                times.append(now - Timer.last)
            Timer.last = now

    run.trainer.callbacks.append(Timer())
    run.trainer.fit(run.model, datamodule=run.datamodule)
    return times


def plain_loss(model, batch):
    """The module's training loss without Lightning: its text side, caption dropout, generator and fusion head."""
    if hasattr(model, "conditioner"):
        prompts = model.conditioner.encode_captions(batch.captions, batch.caption_draws, training=True)
        text = model.conditioner.drop(prompts.text)
    else:
        text = model.drop_captions(model.text_of(batch))
    return model.generator.training_loss(batch.images, text, model.fusion, latents=batch.latents)


def plain_step_times(model, datamodule, steps: int, clip: float | None, precision: str) -> list[float]:
    """The same step by hand over the same (already set-up) module and data: autocast as the trainer's precision,
    a fresh optimiser and scheduler from the module's own factories, clipping, and no callbacks or logging."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    device = model.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = model.optimizer_factory(params)
    scheduler = model.lr_scheduler_factory(optimizer, num_training_steps=steps) if model.lr_scheduler_factory else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    model.train()
    times, last = [], None
    loader = iter(datamodule.train_dataloader())
    for _ in range(steps):
        try:
            batch = next(loader)
        except StopIteration:
            loader = iter(datamodule.train_dataloader())
            batch = next(loader)
        batch = move_data_to_device(batch, device)
        with autocast:
            loss = plain_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    return times


def peak_memory_mb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --- rows ------------------------------------------------------------------------------------------------------


def row_train_eval(out: Path, data: Path, trainer: str, steps: int) -> dict:
    from text2img.train import train

    cfg = compose(out / "train_eval", data, f"trainer={trainer}", f"trainer.max_steps={steps}",
                  f"trainer.val_check_interval={steps // 2}", "test=true")
    start = time.perf_counter()
    reset_peak_memory()
    value = train(cfg)
    return {"what": f"train+eval (trainer={trainer}, {cfg.trainer.precision})", "ok": True,
            "result": f"{steps} steps, validation and test in {time.perf_counter() - start:.0f} s; "
                      f"{cfg.optimized_metric}={value if value is None else round(value, 4)}",
            "peak_mb": peak_memory_mb()}


def row_syncs(out: Path, data: Path, name: str, *overrides: str, batches: int = 12) -> dict:
    """Host syncs per training batch, counted by torch's sync debug mode."""
    from text2img.run.compose import build

    cfg = compose(out / f"syncs_{name}", data, "trainer=gpu", "test=false", "trainer.val_check_interval=1000",
                  f"trainer.log_every_n_steps={LOG_EVERY}", *overrides)
    run = build(cfg)
    marks: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.trainer.callbacks.append(BatchMarks.make(lambda: marks.append(len(caught))))
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run.trainer.fit(run.model, datamodule=run.datamodule)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    marks.append(len(caught))
    per_batch, where = [], collections.Counter()
    for b in range(len(marks) - 1):
        in_batch = [w for w in caught[marks[b]:marks[b + 1]] if "synchroniz" in str(w.message)]
        per_batch.append(len(in_batch))
        if (b + 1) % LOG_EVERY and b > 0:  # outside the logging batches (and the first, which sets things up)
            where.update(f"{Path(w.filename).name}:{w.lineno}" for w in in_batch)
    logging = [n for b, n in enumerate(per_batch) if (b + 1) % LOG_EVERY == 0]
    others = [n for b, n in enumerate(per_batch) if (b + 1) % LOG_EVERY and b > 0]
    mean = statistics.mean(others) if others else float("nan")
    return {"what": f"host syncs per step: {name}", "ok": True,
            "result": f"{mean:.2f} per batch outside logging batches (target 0), "
                      f"{statistics.mean(logging) if logging else float('nan'):.1f} at logging batches; "
                      f"per batch {per_batch}; {len(syncs)} in all"
                      + (f"; from {dict(where.most_common(5))}" if where else ""),
            "syncs_per_batch": per_batch, "peak_mb": None}


def row_throughput(out: Path, data: Path, trainer: str, steps: int, warmup: int = 5, repeats: int = 2) -> dict:
    from text2img.run.compose import build

    framework, plain, peaks = [], [], {"framework": 0.0, "plain": 0.0}
    batch = 32
    for repeat in range(repeats):
        cfg = compose(out / f"throughput_{repeat}", data, f"trainer={trainer}", "test=false",
                      f"trainer.max_steps={steps + warmup}", "trainer.val_check_interval=100000",
                      f"data.batch_size={batch}", "trainer.log_every_n_steps=50")
        run = build(cfg)
        reset_peak_memory()
        framework += step_times(run)[warmup:]
        peaks["framework"] = max(peaks["framework"], peak_memory_mb() or 0.0)
        reset_peak_memory()
        plain += plain_step_times(run.model, run.datamodule, steps + warmup, cfg.trainer.gradient_clip_val,
                                  str(cfg.trainer.precision))[warmup:]
        peaks["plain"] = max(peaks["plain"], peak_memory_mb() or 0.0)
    fw, pl = statistics.median(framework), statistics.median(plain)
    return {"what": f"framework vs plain loop (trainer={trainer}, batch {batch})", "ok": True,
            "result": f"framework {batch / fw:.0f} img/s, plain {batch / pl:.0f} img/s, ratio {pl / fw:.3f} "
                      f"(target >= 0.95); peak {peaks['framework']:.0f} / {peaks['plain']:.0f} MB",
            "framework_images_per_s": round(batch / fw, 1), "plain_images_per_s": round(batch / pl, 1),
            "ratio": round(pl / fw, 3), "peak_mb": peaks}


def row_steps(out: Path, data: Path, name: str, *overrides: str, steps: int = 6) -> dict:
    from text2img.run.compose import build

    cfg = compose(out / name, data, *overrides, "test=false", f"trainer.max_steps={steps}",
                  "trainer.val_check_interval=100000")
    run = build(cfg)
    reset_peak_memory()
    start = time.perf_counter()
    run.trainer.fit(run.model, datamodule=run.datamodule)
    return {"what": " ".join(overrides), "ok": run.trainer.global_step == steps,
            "result": f"{run.trainer.global_step}/{steps} steps in {time.perf_counter() - start:.1f} s "
                      f"({type(run.trainer.strategy).__name__}, {run.trainer.precision})",
            "peak_mb": peak_memory_mb()}


def attempt(rows: list[dict], what: str, row, *args, **kwargs) -> None:
    print(f"--- {what}", flush=True)
    start = time.perf_counter()
    try:
        result = row(*args, **kwargs)
    except Exception as error:  # a row's failure is reported in the table; the others still run
        traceback.print_exc()
        result = {"what": what, "ok": False, "result": f"{type(error).__name__}: {str(error)[:300]}", "peak_mb": None}
    result["seconds"] = round(time.perf_counter() - start, 1)
    rows.append(result)
    print(f"    {'ok' if result['ok'] else 'FAILED'}: {result['result']}", flush=True)


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| check | ok | result | peak GPU MB | s |", "|---|---|---|---|---|"]
    for r in rows:
        peak = r.get("peak_mb")
        peak = "/".join(f"{v:.0f}" for v in peak.values()) if isinstance(peak, dict) else ("" if peak is None else f"{peak:.0f}")
        lines.append(f"| {r['what']} | {'yes' if r['ok'] else '**no**'} | {r['result']} | {peak} | {r['seconds']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else
                        ROOT / "outputs" / "gpu_check")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per throughput repeat")
    parser.add_argument("--cpu", action="store_true", help="without a GPU: the rows a CPU can run, trainer=cpu")
    args = parser.parse_args()
    missing = gpu_missing()
    if missing and not args.cpu:
        print(missing)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/text2img_gpu_check"))
    work.mkdir(parents=True, exist_ok=True)
    data = image_folder(work)
    trainer = "cpu" if args.cpu else "gpu"
    device = "CPU (--cpu)" if args.cpu else f"{torch.cuda.get_device_name()}"
    header = f"GPU check {time.strftime('%Y-%m-%d %H:%M')}: {device}, torch {torch.__version__}"
    print(header, flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True

    rows: list[dict] = []
    if not args.cpu:
        attempt(rows, "host syncs: diffusion", row_syncs, work, data, "diffusion", "trainer.max_steps=12")
        attempt(rows, "host syncs: GAN", row_syncs, work, data, "GAN", "generator=gan", "trainer.max_steps=24")
    attempt(rows, "framework vs plain", row_throughput, work, data, trainer, args.steps)
    attempt(rows, "train+eval", row_train_eval, work, data, trainer, 40)
    if not args.cpu:
        attempt(rows, "ddp", row_steps, work, data, "ddp", "trainer=ddp", "trainer.devices=1")
        attempt(rows, "fsdp", row_steps, work, data, "fsdp", "trainer=fsdp", "trainer.devices=1", "~callbacks.ema")

    text = table(rows, header)
    print("\n" + text, flush=True)
    (args.out / "gpu_check.md").write_text(text + "\n")
    (args.out / "gpu_check.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2, default=str) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
