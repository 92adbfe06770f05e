"""Shared test setup: no network, offline tracking, one cache folder for the packaged assets."""

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from torch import Tensor

    from text2img.metrics import EvalBatch

# Model hubs are unreachable here; without these a hub lookup takes ~50 s to fail.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# `make test` runs one pytest-xdist worker per core: each computes on one thread (and so do the processes its tests
# start), since two workers of two threads each on 2 cores stall each other (small batches ran 2-30x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_wandb_run_outlives_its_test() -> Iterator[None]:
    """A W&B run left open would receive the next test's logs (WandbLogger adopts a running wandb.run)."""
    yield
    from text2img.lightning.tracking import finish_wandb_run

    finish_wandb_run()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module's tests (use with `pytestmark = pytest.mark.usefixtures(...)`).

    On a busy 2-core machine two threads stall each other: small batches ran 2-30x slower (measured).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def asset_cache_dir() -> Path:
    """The repository's cache of converted models and rendered datasets, shared with `make train`.

    Building these (SmolLM2 GGUF -> safetensors, OpenMoji renders) takes tens of seconds once;
    tests reuse them instead of rebuilding per test.
    """
    path = Path(os.environ.get("TEXT2IMG_CACHE", REPO_ROOT / ".cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


CONF_DIR = REPO_ROOT / "conf"


def compose_train(tmp_path: Path, overrides: list[str] = (), config_name: str = "train") -> "DictConfig":
    """Compose conf/<config_name>.yaml as the CLI would, with all run outputs under tmp_path."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO_ROOT)
        cfg.paths.log_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path)
        del cfg.hydra
    return cfg


def write_imagefolder(root: Path, n: int = 48, size: int = 32) -> Path:
    """A small captioned dataset in the diffusers imagefolder layout: coloured squares and discs."""
    import json

    import numpy as np
    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 210, 20)}
    shapes = ["square", "circle", "triangle"]
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        colour = list(colours)[i % len(colours)]
        shape = shapes[(i // len(colours)) % len(shapes)]
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        lo, hi = int(rng.integers(2, 8)), int(rng.integers(24, 30))
        if shape == "square":
            draw.rectangle([lo, lo, hi, hi], fill=colours[colour])
        elif shape == "circle":
            draw.ellipse([lo, lo, hi, hi], fill=colours[colour])
        else:
            draw.polygon([(lo, hi), (hi, hi), ((lo + hi) // 2, lo)], fill=colours[colour])
        name = f"{i:03d}.png"
        image.save(root / name)
        lines.append(json.dumps({"file_name": name, "text": f"a {colour} {shape} number {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    return write_imagefolder(tmp_path / "data")


def smoke_overrides(data_dir: Path, *extra: str) -> list[str]:
    """A seconds-long real training run on a small image folder (tiny encoder and UNet)."""
    return ["debug=smoke", "data=imagefolder", f"data.source.path={data_dir}", "data.source.val_fraction=0.2",
            "data.source.test_fraction=0.2", f"callbacks.evaluation.cache_dir={data_dir.parent / 'eval-cache'}", *extra]


def eval_batch(
    images: "Tensor", captions: list[str] | None = None, keys: "Tensor | None" = None,
    reconstructions: "Tensor | None" = None,
) -> "EvalBatch":
    """Evaluation outputs as metrics receive them, for images in [0, 1] that are also their own real images;
    the text embeddings are placeholders (no metric under test reads them)."""
    import torch

    from text2img.metrics import EvalBatch
    from text2img.types import EvalOutputs, TextEmbedding

    n = len(images)
    text = TextEmbedding(torch.zeros(n, 1, 2), torch.ones(n, 1, dtype=torch.bool), torch.zeros(n, 2))
    keys = torch.arange(n) if keys is None else keys
    return EvalBatch(EvalOutputs(images, images, captions or [""] * n, text, keys, reconstructions))


def write_tiny_autoencoder(folder: Path, levels: int = 3, latent_channels: int = 4) -> Path:
    """A random diffusers AutoencoderKL saved with `save_pretrained`: a local first stage for latent diffusion
    (32-px images -> latent_channels x 8 x 8 with 3 levels)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_first_stage(tmp_path_factory) -> Path:
    """The folder of a tiny random AutoencoderKL (see `write_tiny_autoencoder`)."""
    return write_tiny_autoencoder(tmp_path_factory.mktemp("first_stage") / "autoencoder")


@dataclass
class CliResult:
    """What a command-line run gave: its exit status and what it printed (a SystemExit message goes to stderr,
    as the interpreter would print it)."""

    returncode: int
    stdout: str
    stderr: str


def run_entry_point(entry: str, *args: str) -> CliResult:
    """Run `python -m text2img.<entry> <args>` in this process: the same argument checks, Hydra parsing and error
    reporting as the console script, without a new interpreter's ~5 s of imports."""
    import contextlib
    import importlib
    import io
    import sys

    from hydra.core.global_hydra import GlobalHydra

    module = importlib.import_module(f"text2img.{entry}")
    out, err = io.StringIO(), io.StringIO()
    status: object = 0
    GlobalHydra.instance().clear()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setattr(sys, "argv", [f"text2img-{entry}", *args])
        try:
            module.main()
        except SystemExit as exit:
            status = exit.code
        finally:
            GlobalHydra.instance().clear()
    if isinstance(status, str):
        return CliResult(1, out.getvalue(), f"{err.getvalue()}{status}\n")
    return CliResult(int(status or 0), out.getvalue(), err.getvalue())


@pytest.fixture
def entry_point() -> "Callable[..., CliResult]":
    """`run_entry_point`, for tests that take it as a fixture."""
    return run_entry_point
