"""The generator backends side by side: quality, alignment, speed and size of trained checkpoints.

    python experiments/backends/compare.py diffusion=CKPT gan=CKPT vae=CKPT ldm=CKPT [--n-samples 1000]

For each checkpoint, in one process so machine noise hits all alike:
- the evaluation of `python -m text2img.evaluate` on the test prompts (FID/KID/IS on EfficientNet-Lite0
  features, LiT alignment with its real-image ceiling, diversity among samples of one prompt, PSNR/SSIM
  of autoencoders' reconstructions), its report kept in `outputs/backends/eval/` and reused by a re-run;
- training images/s: training steps of the checkpoint's own configuration, timed after warm-up (median);
- sampling images/s: `generate` on 100 test prompts at the generator's default settings (median of repeats);
- parameter counts: what generates an image (fusion head + generator network, UNet or VAE decoder), the
  frozen first stage, and what only training uses (a GAN's discriminator, a VAE's encoder), each apart;
- a captioned grid of the first 24 test prompts (fixed seeds), written beside this script.
Results go to `results.json` here and are printed as a Markdown table. Runs named `<setting>-s<seed>` are also
summarised per setting (mean and 95% Student-t interval over seeds) with Welch's p-value of each pair of settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402

from text2img.evaluate import evaluate  # noqa: E402
from text2img.inspect.seeds import settings_summary, settings_table  # noqa: E402
from text2img.run.compose import build_model, load_model, trainer_clip_value  # noqa: E402
from text2img.utils.checkpoints import load_checkpoint  # noqa: E402
from text2img.utils.grid import captioned_grid  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# Parameters outside the image-generating path, counted apart: the frozen first stage, and what only training
# uses (a GAN's discriminator, a VAE's encoder).
SEPARATE = {
    "first_stage": ("generator.first_stage.",),
    "training_only": ("generator.discriminator.", "generator.autoencoder.encoder.", "generator.autoencoder.quant_conv."),
}

sys.path.insert(0, str(ROOT / "experiments" / "bench"))
from train_throughput import StepTimer, machine  # noqa: E402  (the benchmarks' step timer: one definition)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    counts = dict.fromkeys(["generating", *SEPARATE], 0)
    for name, param in model.named_parameters():
        part = next((key for key, prefixes in SEPARATE.items() if name.startswith(prefixes)), "generating")
        counts[part] += param.numel()
    return counts


def training_speed(ckpt: str, steps: int, warmup: int) -> tuple[float, int]:
    """Median images/s of the run's own training step (fresh weights, same config), validation off, and the
    number of parameters that train (LoRA adapters, not their frozen bases)."""
    run_cfg = OmegaConf.create(load_checkpoint(ckpt)["text2img_config"])
    datamodule, model = build_model(run_cfg)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=warmup + steps, logger=False, callbacks=[timer],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        precision=run_cfg.trainer.precision,
        gradient_clip_val=trainer_clip_value(model, run_cfg.trainer.gradient_clip_val),
    )
    trainer.fit(model, datamodule=datamodule)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # A GAN's global step counts its D and G optimiser steps: time per batch is what compares.
    return run_cfg.data.batch_size / statistics.median(timer.times[warmup:]), trainable


def sampling(ckpt: str, repeats: int, grid_path: Path) -> float:
    """Median images/s of `generate` on 100 test prompts; writes the grid of the first 24."""
    _, datamodule, model = load_model(ckpt)
    prompts = model.conditioner.reference(datamodule.captions("test")[:100])  # the run's cached test embeddings
    captions, text = prompts.captions, prompts.text
    seeds = list(range(len(captions)))
    model.eval()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        images = model.generate(text, seeds)
        times.append(time.perf_counter() - start)
    captioned_grid(images[:24], captions[:24], ncols=8).save(grid_path)
    return len(captions) / statistics.median(times[1:])


def evaluation(ckpt: str, n_samples: int, out: Path) -> dict:
    """The metrics of `text2img.evaluate`; a report already in `out` for this checkpoint and size is reused."""
    if out.is_file():
        report = json.loads(out.read_text())
        if report["checkpoint"] == str(Path(ckpt).absolute()) and report["n_samples"] == n_samples:
            print(f"{out}: reusing the evaluation of {ckpt}")
            return report["metrics"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="eval",
            overrides=[f"ckpt={ckpt}", f"n_samples={n_samples}", f"out={out}",
                       "metrics=[image,alignment,diversity,reconstruction]"],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(out.parent)
    return evaluate(cfg)["metrics"]


COLUMNS = [
    ("FID", "fid_effnet", ".1f"), ("KID", "kid_effnet", ".3f"), ("R@32", "r_precision", ".3f"),
    ("R@32 real", "r_precision_real", ".3f"), ("diversity", "diversity_ratio_effnet", ".2f"),
    ("PSNR", "psnr", ".1f"), ("SSIM", "ssim", ".3f"),
    ("train img/s", "train_images_per_s", ".1f"), ("sample img/s", "sample_images_per_s", ".1f"),
]
# the figures whose differences between settings are tested
TESTED = ("fid_effnet", "kid_effnet", "r_precision")


def table(results: dict[str, dict]) -> str:
    columns = COLUMNS
    head = "| backend | " + " | ".join(c[0] for c in columns) + " | params: generating / first stage / training only |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for name, row in results.items():
        cells = [format(row[key], fmt) if key in row else "—" for _, key, fmt in columns]
        p = row["parameters"]
        sizes = " / ".join(f"{p[k] / 1e6:.2f}M" if p[k] else "—" for k in ("generating", *SEPARATE))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sizes} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="name=checkpoint pairs")
    parser.add_argument("--n-samples", type=int, default=1000)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE, help="results.json and the grids")
    parser.add_argument("--eval-dir", type=Path, default=ROOT / "outputs" / "backends" / "eval",
                        help="the evaluation reports (generated files: outside the repository's tracked tree)")
    args = parser.parse_args()
    runs = dict(run.split("=", 1) for run in args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, ckpt in runs.items():
        checkpoint, _, model = load_model(ckpt)
        row = {
            "checkpoint": ckpt,
            "step": checkpoint.get("global_step"),
            "parameters": parameter_counts(model),
            **evaluation(ckpt, args.n_samples, args.eval_dir / f"{name}.json"),
            "train_images_per_s": training_speed(ckpt, args.train_steps, args.warmup)[0],
            "sample_images_per_s": sampling(ckpt, args.repeats, args.out / f"grid_{name}.png"),
        }
        results[name] = row
        print(name, json.dumps(row, indent=1), flush=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "n_samples": args.n_samples,
        "results": results,
        **settings_summary(results, COLUMNS, TESTED),
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print()
    print(settings_table(report, COLUMNS))


if __name__ == "__main__":
    main()
