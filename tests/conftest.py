"""Shared test setup: no network, offline tracking, one cache folder for the packaged assets."""

import os
from pathlib import Path

import pytest

# Model hubs are unreachable here; without these a hub lookup takes ~50 s to fail.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def asset_cache_dir() -> Path:
    """The repository's cache of converted models and rendered datasets, shared with `make train`.

    Building these (SmolLM2 GGUF -> safetensors, OpenMoji renders) takes tens of seconds once;
    tests reuse them instead of rebuilding per test.
    """
    path = Path(os.environ.get("TEXT2IMG_CACHE", REPO_ROOT / ".cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path
