"""Training throughput of the framework's diffusion step against a plain PyTorch loop, and the
speed-up of cached text embeddings over running the frozen encoder in every step.

    python experiments/bench/train_throughput.py [--steps 30] [--repeats 3] [overrides ...]

Both loops use the same modules, batch size, data loader and optimizer; they alternate within one
process (framework, plain, framework, ...) so machine noise hits both alike. Reports medians of
per-step times after warm-up. Extra arguments are Hydra overrides of conf/train.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from text2img.lightning import Text2ImgModule  # noqa: E402
from text2img.run.compose import build_data  # noqa: E402
from text2img.run.compose import build_model as build_run  # noqa: E402
from text2img.types import Batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


class StepTimer(L.Callback):
    """Wall time of each training step (batch fetch included, as in the plain loop)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, *args) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def compose_cfg(overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(out)
    return cfg


def build_model(cfg) -> Text2ImgModule:
    """A fresh model of `cfg`, its text conditioner included (prepared by `trainer.fit`)."""
    torch.manual_seed(0)
    return build_run(cfg)[1]


def framework_steps(cfg, datamodule, steps: int) -> list[float]:
    model = build_model(cfg)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, callbacks=[timer], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        gradient_clip_val=cfg.trainer.gradient_clip_val, precision=cfg.trainer.precision,
    )
    trainer.fit(model, datamodule=datamodule)
    return timer.times


def plain_steps(cfg, datamodule, steps: int, encoder=None) -> list[float]:
    """The same step written by hand; with `encoder`, captions are encoded in every step."""
    model = build_model(cfg)
    model.conditioner.setup(datamodule.caption_sets())
    model.train()
    optimizer = instantiate(cfg.model.optimizer)([p for p in model.parameters() if p.requires_grad])
    scheduler = instantiate(cfg.model.lr_scheduler)(optimizer, num_training_steps=steps)
    times, last = [], None
    loader = iter(datamodule.train_dataloader())
    for _ in range(steps):
        batch: Batch = next(loader)
        if encoder is not None:
            with torch.no_grad():
                text = encoder.encode(batch.captions).trimmed()
        else:
            text = model.conditioner.encode_captions(batch.captions, batch.caption_draws, training=True).text
        loss = model.generator.training_loss(batch.images, model.conditioner.drop(text), model.fusion)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
        scheduler.step()
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encoder-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    cfg = compose_cfg(args.overrides, args.out)
    encoder = instantiate(cfg.encoder)
    datamodule = build_data(cfg)
    build_model(cfg).conditioner.prepare(datamodule.caption_sets())  # fills the embedding cache
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = cfg.data.batch_size

    framework, plain = [], []
    for _ in range(args.repeats):
        framework += framework_steps(cfg, datamodule, args.steps + args.warmup)[args.warmup:]
        plain += plain_steps(cfg, datamodule, args.steps + args.warmup)[args.warmup:]
    fw, pl = statistics.median(framework), statistics.median(plain)

    cached = plain_steps(cfg, datamodule, args.encoder_steps + 2)[2:]
    in_step = plain_steps(cfg, datamodule, args.encoder_steps + 2, encoder=encoder)[2:]
    c, e = statistics.median(cached), statistics.median(in_step)

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "batch_size": batch,
        "framework_images_per_s": round(batch / fw, 1),
        "plain_images_per_s": round(batch / pl, 1),
        "framework_over_plain": round(pl / fw, 3),
        "cached_images_per_s": round(batch / c, 1),
        "encoder_in_step_images_per_s": round(batch / e, 1),
        "cache_speedup": round(e / c, 2),
        "overrides": args.overrides,
    }
    print(json.dumps(result, indent=2))
    (args.out / "train_throughput.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
