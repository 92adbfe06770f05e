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
- the diffusion transformer with rectified flow (issue 17): `generator=dit generator.objective=flow` against a
  plain loop (as above), and a few steps of it in a tiny first stage's latents (`generator=ldm
  generator/denoiser=dit`).
- `experiment=webdataset_dit_gpu`, the real-corpus preset, as configured (DiT-B, 256 px, bf16) on one GPU:
  images/s per GPU, peak memory and the model FLOP utilisation they imply (experiments/bench/dit_flops.py), on
  img2dataset shards written from the image folder, with a randomly initialised Stable Diffusion VAE (the same
  architecture: the same FLOPs) and the tiny text encoder (the device has no SmolLM2: 17 of the step's ~460
  GFLOPs an image).

Prints the table, writes `gpu_check.json` and `gpu_check.md` under --out (default `$OUT` on the device machine,
else outputs/gpu_check); exits 1 if a row failed. Without a GPU it says so and exits 0; `--cpu` runs the rows a CPU
can (train+eval, framework vs plain, the DiT rows, the preset shrunk to CPU size) with trainer=cpu, to try the
script itself.

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


def row_throughput(out: Path, data: Path, trainer: str, steps: int, *overrides: str, warmup: int = 5,
                   repeats: int = 2) -> dict:
    from text2img.run.compose import build

    framework, plain, peaks = [], [], {"framework": 0.0, "plain": 0.0}
    batch = 32
    for repeat in range(repeats):
        cfg = compose(out / f"throughput_{repeat}", data, f"trainer={trainer}", "test=false",
                      f"trainer.max_steps={steps + warmup}", "trainer.val_check_interval=100000",
                      f"data.batch_size={batch}", "trainer.log_every_n_steps=50", *overrides)
        run = build(cfg)
        reset_peak_memory()
        framework += step_times(run)[warmup:]
        peaks["framework"] = max(peaks["framework"], peak_memory_mb() or 0.0)
        reset_peak_memory()
        plain += plain_step_times(run.model, run.datamodule, steps + warmup, cfg.trainer.gradient_clip_val,
                                  str(cfg.trainer.precision))[warmup:]
        peaks["plain"] = max(peaks["plain"], peak_memory_mb() or 0.0)
    fw, pl = statistics.median(framework), statistics.median(plain)
    what = " ".join([f"trainer={trainer}", *overrides])
    return {"what": f"framework vs plain loop ({what}, batch {batch})", "ok": True,
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


def image_shards(data: Path, out: Path, per_shard: int = 8) -> dict[str, str]:
    """The image folder as img2dataset writes shards (an image and a .txt caption per sample):
    `data.source.*_shards` overrides for data=webdataset, every image in the training shards (96 images: 12
    shards, one for each of up to 12 dataloader workers), the first 16 in val and test."""
    import json

    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    lines = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line.strip()]
    groups = {"train": [lines[i:i + per_shard] for i in range(0, len(lines), per_shard)],
              "val": [lines[:16]], "test": [lines[:16]]}
    for split, shards in groups.items():
        for index, shard in enumerate(shards):
            with wds.TarWriter(str(out / f"{split}-{index:05d}.tar")) as tar:
                for number, line in enumerate(shard):
                    image = (data / line["file_name"]).read_bytes()
                    tar.write({"__key__": f"{index:05d}{number:04d}", "png": image, "txt": line["text"].encode()})
    train = f"{out}/train-{{00000..{len(groups['train']) - 1:05d}}}.tar"
    return {"train_shards": f"'{train}'", "val_shards": f"{out}/val-00000.tar",
            "test_shards": f"{out}/test-00000.tar"}


def sd_vae_architecture(folder: Path) -> Path:
    """A randomly initialised AutoencoderKL of the Stable Diffusion VAE's architecture (what the preset names
    by hub name, which the device cannot reach): its FLOPs are the real one's."""
    from diffusers import AutoencoderKL

    sys.path.insert(0, str(ROOT / "experiments" / "bench"))
    from dit_flops import KNOWN_FIRST_STAGES

    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        AutoencoderKL(**KNOWN_FIRST_STAGES["stabilityai/sd-vae-ft-mse"]).save_pretrained(folder)
    return folder


# The preset at CPU size for --cpu and the tests: what differs is size only, so the same code path runs.
PRESET_CPU_SIZE = ("data.source.image_size=64", "data.batch_size=4", "generator.denoiser.depth=2",
                   "generator.denoiser.width=64", "generator.denoiser.heads=4", "generator.cond_dim=64",
                   "encoder.max_length=16", "data.num_workers=0", "data.val_samples=4")


def row_preset(out: Path, data: Path, trainer: str, first_stage: Path, size: tuple[str, ...] = (),
               steps: int = 20, warmup: int = 5) -> dict:
    """experiment=webdataset_dit_gpu on one device: median images/s of its training steps, peak memory, and
    the MFU they imply against the FLOP count of experiments/bench/dit_flops.py."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "experiments" / "bench"))
    from conftest import compose_train
    from dit_flops import H100_BF16_DENSE_TFLOPS, step_flops

    from text2img.run.compose import build

    shards = image_shards(data, out / "shards")
    cfg = compose_train(out / "preset", [
        "experiment=webdataset_dit_gpu", f"trainer={trainer}", "encoder=tiny", "logger=csv", "test=false",
        f"generator.first_stage.source={first_stage}", *(f"data.source.{k}={v}" for k, v in shards.items()),
        f"trainer.max_steps={steps + warmup}", "trainer.val_check_interval=100000",
        "trainer.log_every_n_steps=50",
        f"callbacks.evaluation.cache_dir={out / 'eval-cache'}", *size,
    ])
    run = build(cfg)
    reset_peak_memory()
    times = step_times(run)[warmup:]
    rate = cfg.data.batch_size / statistics.median(times)
    flops = step_flops(cfg, text_encoder=False)
    mfu = rate * flops.total / (H100_BF16_DENSE_TFLOPS * 1e12)
    what = (f"experiment=webdataset_dit_gpu (trainer={trainer}, {cfg.trainer.precision}, batch "
            f"{cfg.data.batch_size}, {cfg.data.source.image_size} px, "
            f"{flops.denoiser_parameters / 1e6:.1f}M-parameter DiT)")
    result = (f"{rate:.0f} img/s per device; {flops.total / 1e9:.3g} GFLOPs an image (VAE encoder included): "
              f"{mfu:.1%} of H100 bf16 dense peak")
    return {"what": what, "ok": run.trainer.global_step == steps + warmup, "result": result,
            "images_per_s": round(rate, 1), "mfu_h100": round(mfu, 4), "peak_mb": peak_memory_mb()}


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


DIT_FLOW = ("generator=dit", "generator.objective=flow")


def dit_rows(rows: list[dict], work: Path, data: Path, trainer: str, steps: int, cpu: bool) -> None:
    """Issue 17's rows: the DiT with the flow objective against a plain loop, in a tiny first stage's latents,
    and the real-corpus preset (at CPU size with `cpu`)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_tiny_autoencoder

    tiny = work / "tiny_first_stage"
    if not (tiny / "config.json").is_file():
        write_tiny_autoencoder(tiny)
    attempt(rows, "framework vs plain: dit flow", row_throughput, work, data, trainer, steps, *DIT_FLOW)
    attempt(rows, "latent dit flow", row_steps, work, data, "ldm_dit_flow", f"trainer={trainer}",
            "generator=ldm", "generator/denoiser=dit", "generator.objective=flow",
            f"generator.first_stage.source={tiny}")
    if cpu:  # the preset's path at CPU size: an f8 tiny first stage, as the SD VAE (64 px -> 8x8 latents)
        f8 = work / "tiny_first_stage_f8"
        if not (f8 / "config.json").is_file():
            write_tiny_autoencoder(f8, levels=4)
        attempt(rows, "preset", row_preset, work, data, trainer, f8, PRESET_CPU_SIZE, steps=3, warmup=1)
    else:
        attempt(rows, "preset", row_preset, work, data, trainer, sd_vae_architecture(work / "sd_vae_random"))


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
    dit_rows(rows, work, data, trainer, args.steps, cpu=args.cpu)

    text = table(rows, header)
    print("\n" + text, flush=True)
    (args.out / "gpu_check.md").write_text(text + "\n")
    (args.out / "gpu_check.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2, default=str) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
