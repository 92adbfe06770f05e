"""Training throughput of the framework's diffusion step against a plain PyTorch loop, and the
speed-up of cached text embeddings over running the frozen encoder in every step.

    python experiments/bench/train_throughput.py [--steps 30] [--repeats 3] [overrides ...]
    python experiments/bench/train_throughput.py --suite backends [--steps 20] [--repeats 3] [overrides ...]

Both loops use the same modules, batch size, data loader and optimizer; they alternate within one
process (framework, plain, framework, ...) so machine noise hits both alike. Reports medians of
per-step times after warm-up. Extra arguments are Hydra overrides of conf/train.yaml.

`--suite NAME` runs each named override set of SUITES[NAME] (on top of the extra arguments) side by side in
the same alternation, and reports for each: framework and plain images/s and their ratio, the memory of a
step (see `step_memory`), the denoiser's parameters and images/s per million of them against the first
configuration; the cache comparison, which does not depend on the generator, is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
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
# make train's run as the loops below can time it (see the "budget" suite)
BUDGET = ["experiment=openmoji_ldm_budget", "generator.first_stage.refiner_width=0", "generator.cache_latents=false",
          "generator.latent_scale=1.0"]
# the UNet on unpatched latents instead of make train's DiT (its config's widths: 64/128/128)
UNET = ["generator/denoiser=unet", "generator.patch_size=1"]
# Named override sets compared side by side by --suite; the first is the reference of the per-parameter
# column.
SUITES: dict[str, dict[str, list[str]]] = {
    # the denoisers and objectives of issue 17 against today's default (UNet, v_prediction: DDPM noise)
    "backends": {
        "unet": [],
        "unet flow": ["generator.objective=flow"],
        "dit": ["generator=dit"],
        "dit flow": ["generator=dit", "generator.objective=flow"],
    },
    # make train's denoiser (the DiT over 2x2 latent patches) against the two UNets it replaced, on make train's
    # patch-code latents. The refiner, which no training step runs, is off (it would be trained for every build); each
    # step encodes its batch (a linear map) instead of reading the latent cache, and the latent scale is fixed at 1
    # (the code is whitened to unit variance) instead of calibrated at fit start: the loops here do neither.
    "budget": {
        "dit 6x128 p2 flow (make train)": BUDGET,
        "unet 32/64/64 flow": [*BUDGET, *UNET, "generator.denoiser.unet.block_out_channels=[32,64,64]"],
        "unet 64/128/128 v_prediction": [*BUDGET, *UNET, "generator.objective=v_prediction"],
    },
}


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
        del cfg.hydra  # the run config stored by build_model must resolve without a Hydra job
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


@dataclass
class PlainLoop:
    """The framework's training step written by hand over a fresh model of `cfg`: its optimizer, LR schedule
    and clipping, no Lightning. With `encoder`, captions are encoded in every step instead of read from the
    cache."""

    model: Text2ImgModule
    optimizer: torch.optim.Optimizer
    scheduler: object
    clip: float
    encoder: object = None

    @classmethod
    def build(cls, cfg, datamodule, steps: int, encoder=None) -> "PlainLoop":
        model = build_model(cfg)
        model.conditioner.setup(datamodule.caption_sets())
        model.train()
        optimizer = instantiate(cfg.model.optimizer)([p for p in model.parameters() if p.requires_grad])
        scheduler = instantiate(cfg.model.lr_scheduler)(optimizer, num_training_steps=steps)
        return cls(model, optimizer, scheduler, cfg.trainer.gradient_clip_val, encoder)

    def loss(self, batch: Batch) -> torch.Tensor:
        model = self.model
        if self.encoder is not None:
            with torch.no_grad():
                text = self.encoder.encode(batch.captions).trimmed()
        else:
            text = model.conditioner.encode_captions(batch.captions, batch.caption_draws, training=True).text
        return model.generator.training_loss(batch.images, model.conditioner.drop(text), model.fusion)

    def step(self, batch: Batch) -> None:
        loss = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()


def plain_steps(cfg, datamodule, steps: int, encoder=None) -> list[float]:
    """Per-step wall times of `PlainLoop` (batch fetch included)."""
    loop = PlainLoop.build(cfg, datamodule, steps, encoder)
    times, last = [], None
    loader = iter(datamodule.train_dataloader())
    for _ in range(steps):
        loop.step(next(loader))
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    return times


class SavedTensorBytes:
    """Bytes of the distinct storages autograd saves for backward while active."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def step_memory(cfg, datamodule) -> dict[str, float]:
    """What one training step holds at its peak, in MB: the activations autograd saves for backward (counted
    per storage) and the trainable state (weights, gradients, optimizer state). On a CPU, where no allocator
    keeps a peak per configuration in a shared process, this is the step's peak memory less transient buffers;
    on CUDA the allocator's peak of the step is given too."""
    loop = PlainLoop.build(cfg, datamodule, steps=2)
    batch = next(iter(datamodule.train_dataloader()))
    loop.step(batch)  # optimizer state exists from the first step on
    saved = SavedTensorBytes()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
        loss = loop.loss(batch)
    loss.backward()
    params = [p for p in loop.model.parameters() if p.requires_grad]
    state = sum(p.nbytes + (p.grad.nbytes if p.grad is not None else 0) for p in params)
    state += sum(v.nbytes for s in loop.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    result = {"saved_for_backward_mb": round(saved.total / 2**20, 1),
              "trainable_state_mb": round(state / 2**20, 1)}
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def denoiser_parameters(cfg) -> int:
    generator = instantiate(cfg.generator)
    network = getattr(generator, "denoiser", generator)  # diffusion generators: the network that learns
    return sum(p.numel() for p in network.parameters())


def machine() -> str:
    """The CPU model, whether it has AVX512 (AVX2-only parts run this project 2.5-5x slower and pick other
    kernels), cores, torch and its threads: what every timing depends on."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"model name\s*:\s*(.+)", info)
    isa = "AVX512" if "avx512f" in info else "no AVX512"
    return (f"{model[1] if model else platform.machine()} ({isa}), {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def prepare(cfg):
    """The data module of `cfg`, set up for fitting, its embedding cache filled."""
    datamodule = build_data(cfg)
    build_model(cfg).conditioner.prepare(datamodule.caption_sets())  # fills the embedding cache
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def run_suite(name: str, args) -> dict:
    """Every configuration of SUITES[name], alternated framework/plain within each repeat, on shared data."""
    configs = {key: compose_cfg([*args.overrides, *extra], args.out) for key, extra in SUITES[name].items()}
    datamodule = prepare(next(iter(configs.values())))  # the suites vary the generator, never the data
    framework = {key: [] for key in configs}
    plain = {key: [] for key in configs}
    for _ in range(args.repeats):
        for key, cfg in configs.items():
            framework[key] += framework_steps(cfg, datamodule, args.steps + args.warmup)[args.warmup:]
            plain[key] += plain_steps(cfg, datamodule, args.steps + args.warmup)[args.warmup:]
    batch = next(iter(configs.values())).data.batch_size
    rows = {}
    for key, cfg in configs.items():
        fw, pl = statistics.median(framework[key]), statistics.median(plain[key])
        parameters = denoiser_parameters(cfg)
        rows[key] = {
            "overrides": SUITES[name][key],
            "framework_images_per_s": round(batch / fw, 1),
            "plain_images_per_s": round(batch / pl, 1),
            "framework_over_plain": round(pl / fw, 3),
            **step_memory(cfg, datamodule),
            "denoiser_parameters": parameters,
            "images_per_s_per_million_parameters": round(batch / fw / (parameters / 1e6), 2),
        }
    reference = next(iter(rows.values()))["images_per_s_per_million_parameters"]
    for row in rows.values():
        row["per_parameter_vs_first"] = round(row["images_per_s_per_million_parameters"] / reference, 2)
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "batch_size": batch, "suite": name,
            "steps": args.steps, "repeats": args.repeats, "configurations": rows, "overrides": args.overrides}


def markdown(result: dict) -> str:
    """The suite's table, as experiments/bench/README.md records it."""
    lines = ["| configuration | framework img/s | plain img/s | framework / plain | saved for backward MB | "
             "weights+grads+Adam MB | denoiser parameters | img/s per M parameters | vs first |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in result["configurations"].items():
        lines.append(f"| {key} | {r['framework_images_per_s']} | {r['plain_images_per_s']} | "
                     f"**{r['framework_over_plain']:.3f}** | {r['saved_for_backward_mb']:,} | "
                     f"{r['trainable_state_mb']:,} | {r['denoiser_parameters']:,} | "
                     f"{r['images_per_s_per_million_parameters']} | {r['per_parameter_vs_first']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encoder-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    parser.add_argument("--suite", choices=sorted(SUITES), help="compare named override sets side by side")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if args.suite:
        result = run_suite(args.suite, args)
        print(json.dumps(result, indent=2))
        print(markdown(result))
        (args.out / f"train_throughput_{args.suite}.json").write_text(json.dumps(result, indent=2) + "\n")
        return

    cfg = compose_cfg(args.overrides, args.out)
    encoder = instantiate(cfg.encoder)
    datamodule = prepare(cfg)
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
        "machine": machine(),
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
