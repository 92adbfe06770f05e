"""Training with a LoRA-tuned text encoder: images/s and memory with and without gradient checkpointing.

    python experiments/bench/encoder_lora.py [--steps 10] [--repeats 3] [overrides ...]

Each variant is the default model (`conf/train.yaml`, SmolLM2 + token projection + pixel diffusion) with
`peft=lora`, trained by `Text2ImgModule.training_step` on OpenMoji batches with a plain optimizer loop;
a frozen, cached encoder is the reference. The variants alternate within one process (frozen, lora,
lora + checkpointing, frozen, ...) so machine noise hits them alike; the report gives medians after warm-up.

Memory is what a step keeps for its backward pass: the bytes of the tensors autograd saves (counted once
per storage by a `saved_tensors_hooks` pack hook), which is what gradient checkpointing trades for compute;
on CUDA also the peak allocated memory of a step. Extra arguments are Hydra overrides of conf/train.yaml.
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

import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import ROOT, SavedTensorBytes, compose_cfg  # noqa: E402

from text2img.conditioning import TextTable  # noqa: E402
from text2img.lightning import Text2ImgModule  # noqa: E402
from text2img.run.compose import build_model  # noqa: E402
from text2img.types import Batch  # noqa: E402

VARIANTS = {
    "frozen (cached)": [],
    "lora": ["peft=lora"],
    "lora + checkpointing": ["peft=lora", "encoder.gradient_checkpointing=true"],
}


def build(cfg) -> tuple[Text2ImgModule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(cfg)[1]
    model.train()
    optimizer = instantiate(cfg.model.optimizer)([p for p in model.parameters() if p.requires_grad])
    return model, optimizer


def batches(cfg, count: int, device: torch.device) -> list[Batch]:
    source = instantiate(cfg.data.source)
    split = source.split("train", augmented=False)
    size = cfg.data.batch_size
    out = []
    for b in range(count):
        items = [split[(b * size + i) % len(split)] for i in range(size)]
        images, captions = zip(*items)
        out.append(Batch(images=torch.stack(images).to(device), captions=list(captions)))
    return out


def run(model: Text2ImgModule, optimizer, data: list[Batch]) -> tuple[list[float], int, int]:
    """Step times, saved-for-backward bytes of the last step and the CUDA peak of the last step (0 on CPU)."""
    times = []
    saved = SavedTensorBytes()
    for batch in data:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        saved.storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
            loss = model.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return times, saved.total, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    configs = {name: compose_cfg([*args.overrides, *extra], args.out) for name, extra in VARIANTS.items()}
    built = {name: build(cfg) for name, cfg in configs.items()}
    for model, _ in built.values():
        model.to(device)
        model.log = lambda *a, **k: None  # no trainer attached
    reference_cfg = configs["frozen (cached)"]
    data = batches(reference_cfg, args.steps + args.warmup, device)
    encoder = instantiate(reference_cfg.encoder).to(device)
    captions = sorted({caption for batch in data for caption in batch.captions})
    with torch.no_grad():  # the frozen reference reads precomputed embeddings, as from the cache
        table = TextTable(encoder.encode(captions), {caption: row for row, caption in enumerate(captions)})
    built["frozen (cached)"][0].conditioner.table = table
    del encoder

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    memory: dict[str, tuple[int, int]] = {}
    for _ in range(args.repeats):
        for name, (model, optimizer) in built.items():
            step_times, saved, peak = run(model, optimizer, data)
            times[name] += step_times[args.warmup:]
            memory[name] = (saved, peak)

    size = reference_cfg.data.batch_size
    trainable = {
        name: sum(p.numel() for p in model.parameters() if p.requires_grad) for name, (model, _) in built.items()
    }
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}",
        "batch_size": size,
        "variants": {
            name: {
                "images_per_s": round(size / statistics.median(times[name]), 1),
                "saved_for_backward_mb": round(memory[name][0] / 2**20, 1),
                "cuda_peak_mb": round(memory[name][1] / 2**20, 1) if device.type == "cuda" else None,
                "trainable_parameters": trainable[name],
            }
            for name in VARIANTS
        },
        "overrides": args.overrides,
    }
    print(json.dumps(result, indent=2))
    (args.out / "encoder_lora.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
