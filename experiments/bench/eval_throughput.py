"""Evaluation throughput and peak memory at 1k and 10k generated samples.

    python experiments/bench/eval_throughput.py [--sizes 1000 10000] [--batch 100] [overrides ...]

Each size runs in its own process (so peak RSS is that size's alone) and feeds the default metrics
(`metrics=[image, alignment, attributes, reconstruction]`: FID/KID/IS and LiT alignment on OpenMoji's
test split) with N stand-in "generated" images: the split's real images, each with its own noise, keyed
0..N-1 as in `text2img.evaluate`. That isolates the metric side, whose memory must not grow with N.
Generation itself is timed once with the default generator (its speed does not depend on the weights).
Extra arguments are Hydra overrides of conf/train.yaml. Results: outputs/bench/eval_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from text2img.metrics import EvalBatch, EvalContext  # noqa: E402
from text2img.networks import RealFeatureCache  # noqa: E402
from text2img.run.compose import build_model  # noqa: E402
from text2img.types import EvalOutputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "outputs" / "bench" / "eval_throughput.json"


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(ROOT / "outputs" / "bench")
        del cfg.hydra  # the run config stored by build_model must resolve without a Hydra job
    return cfg


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_metrics(n: int, batch_size: int, overrides: list[str]) -> dict[str, float]:
    """Feed n stand-in generated images to the default metrics; time and memory of that alone."""
    cfg = compose_cfg(overrides)
    datamodule, model = build_model(cfg)
    datamodule.prepare_data()
    datamodule.setup("test")
    conditioner = model.conditioner
    conditioner.prepare(datamodule.caption_sets())
    reference = conditioner.reference(datamodule.captions("test"))
    prompts, prompt_text = reference.captions, reference.text
    context = EvalContext(
        source=datamodule.source, split="test", encoder=conditioner.reference_encoder, embeddings=conditioner.cache,
        features=RealFeatureCache(Path(cfg.paths.cache_dir) / "eval" / "features"),
        cache_dir=Path(cfg.paths.cache_dir) / "eval", prompts=prompts, prompt_text=prompt_text,
    )
    metrics = instantiate(cfg.metrics)
    for metric in metrics.values():
        metric.prepare(context)
    split = datamodule.source.split("test", augmented=False)
    real = (torch.stack([image for image, _ in split]) + 1) / 2
    text = prompt_text[[prompts.index(caption) for caption in split.captions]]

    def batch(keys: torch.Tensor) -> EvalBatch:
        rows = keys % len(real)
        noise = torch.stack([torch.randn(real.shape[1:], generator=torch.Generator().manual_seed(int(k))) for k in keys])
        images = (real[rows] + 0.05 * noise).clamp(0, 1)
        captions = [split.captions[int(r)] for r in rows]
        return EvalBatch(EvalOutputs(images, real[rows], captions, text[rows], keys))

    warmup = batch(torch.arange(batch_size))
    for metric in metrics.values():  # first-call costs (allocation, lazy init) outside the timing
        metric.update(warmup)
        metric.reset()
    rss_before = peak_rss_mb()
    start = time.perf_counter()
    for keys in torch.arange(n).split(batch_size):
        eval_batch = batch(keys)
        for metric in metrics.values():
            metric.update(eval_batch)
    figures = {name: float(value) for metric in metrics.values() for name, value in metric.compute().items()}
    seconds = time.perf_counter() - start
    return {
        "n": n, "seconds": seconds, "images_per_s": n / seconds, "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": rss_before, "fid_effnet": figures["fid_effnet"], "r_precision": figures["r_precision"],
    }


def measure_generation(batch_size: int, batches: int, overrides: list[str]) -> float:
    """Images/s of the default generator sampling (random weights: the cost does not depend on them)."""
    cfg = compose_cfg(overrides)
    datamodule, model = build_model(cfg)
    datamodule.prepare_data()
    datamodule.setup("test")
    model.conditioner.prepare(datamodule.caption_sets())
    prompt_text = model.conditioner.reference(datamodule.captions("test")).text
    text = prompt_text[torch.arange(batch_size) % len(prompt_text)].trimmed()
    model.eval()
    model.generate(text[:2], seeds=[0, 1])  # warm-up
    start = time.perf_counter()
    for b in range(batches):
        model.generate(text, seeds=list(range(b * batch_size, (b + 1) * batch_size)))
    return batch_size * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one size
    args, overrides = parser.parse_known_args()
    overrides = [*overrides, "logger=csv"]
    if args.one is not None:
        print(json.dumps(measure_metrics(args.one, args.batch, overrides)))
        return
    rows = []
    for n in args.sizes:
        child = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--batch", str(args.batch), *overrides],
            capture_output=True, text=True, check=True,
        )
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    generation = measure_generation(args.batch, 2, overrides)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "metrics": rows,
        "generation_images_per_s": generation,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print("| samples | metric img/s | peak RSS MB | FID (stand-ins) |")
    for row in rows:
        print(f"| {row['n']} | {row['images_per_s']:.1f} | {row['peak_rss_mb']:.0f} | {row['fid_effnet']:.1f} |")
    print(f"generation: {generation:.1f} img/s (default generator, batch {args.batch})")


if __name__ == "__main__":
    main()
