"""Adapter-only checkpoints beside Lightning's: a LoRA run's trainable weights in megabytes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging

from text2img.errors import ConfigError
from text2img.utils.files import atomic_path
from text2img.utils.lora import has_lora, save_adapters


class AdapterCheckpoint(L.Callback):
    """Whenever a checkpoint is saved, writes the model's trainable parameters (LoRA weights, fusion head, null
    embedding) to `<dirpath>/step=<global step>.safetensors` and `last.safetensors` (`text2img.utils.lora.save_adapters`;
    restore with `load_adapters`). Does nothing for a model without LoRA, whose checkpoint is all trainable.

    The values are the checkpoint's `state_dict`: with the EMA callback (which runs first), the averaged
    weights that validation, sampling and export use.
    """

    def __init__(self, dirpath: str) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self._saved_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        callbacks = trainer.callbacks
        averaging = [i for i, callback in enumerate(callbacks) if isinstance(callback, WeightAveraging)]
        if averaging and averaging[-1] > callbacks.index(self):
            raise ConfigError(
                "callbacks: adapter_checkpoint comes before ema, so it would save the raw weights instead of the "
                "averaged ones; list it after ema"
            )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Both checkpoint callbacks may save at one step: write its adapters once.
        if not trainer.is_global_zero or not has_lora(pl_module) or trainer.global_step == self._saved_step:
            return
        path = save_adapters(pl_module, self.dirpath / f"step={trainer.global_step:06d}.safetensors",
                             checkpoint["state_dict"])
        with atomic_path(self.dirpath / "last.safetensors") as tmp:
            shutil.copyfile(path, tmp)
        self._saved_step = trainer.global_step
