"""Rebuilding a trained model from its checkpoint alone: evaluation, sampling and export start here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf, open_dict

from text2img.errors import ConfigError
from text2img.lightning import Text2ImgDataModule, Text2ImgModule
from text2img.train import build_model


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


def load_model(
    path: str, data: dict[str, Any] | None = None
) -> tuple[dict[str, Any], Text2ImgDataModule, Text2ImgModule]:
    """The checkpoint, and its run's data module and model with the saved (EMA) weights loaded.

    The model is rebuilt from the run config stored in the checkpoint; `data` overrides entries of its
    `data` config (e.g. which split to evaluate).
    """
    checkpoint = load_checkpoint(path)
    run_cfg = OmegaConf.create(checkpoint["text2img_config"])
    with open_dict(run_cfg):
        for key, value in (data or {}).items():
            run_cfg.data[key] = value
        run_cfg.model.init_from = None  # the checkpoint holds every weight the run started from
    datamodule, model = build_model(run_cfg)
    model.on_load_checkpoint(checkpoint)  # as Lightning does: restores what the checkpoint leaves out
    model.load_state_dict(checkpoint["state_dict"])
    return checkpoint, datamodule, model
