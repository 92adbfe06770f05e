"""Reading a text2img checkpoint file (no model is built here: see `text2img.run.compose.load_model`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from text2img.errors import ConfigError


def load_checkpoint(path: str, key: str = "ckpt") -> dict[str, Any]:
    """A text2img checkpoint, loaded without unpickling code; one-line errors naming `key` (the option that gave
    the path) for anything else. Tensors are memory-mapped: they are read when used, so checking a file is cheap."""
    file = Path(path).expanduser()
    usage = "pass a .ckpt written by text2img.train, e.g. outputs/train/runs/<run>/checkpoints/last.ckpt"
    if not file.is_file():
        problem = "is a folder" if file.is_dir() else "does not exist"
        raise ConfigError(f"{key}='{path}' {problem}; {usage}")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated, unreadable, or not a torch file at all
        raise ConfigError(
            f"{key}='{path}' is not a text2img checkpoint (unreadable: truncated, or not a torch file; "
            f"{type(exc).__name__}); {usage}"
        ) from exc
    if not isinstance(checkpoint, dict) or "text2img_config" not in checkpoint or "state_dict" not in checkpoint:
        raise ConfigError(f"{key}='{path}' is not a text2img checkpoint (it holds no text2img run config); {usage}")
    return checkpoint


def run_folder(ckpt: str) -> Path:
    """The run a checkpoint belongs to (`<run>/checkpoints/x.ckpt` -> `<run>`), else the checkpoint's folder:
    where evaluation reports, samples and exports of it go by default."""
    path = Path(ckpt).expanduser()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent
