"""Captioned grids of generated images: a PNG in the run folder, and in every logger that shows images
(W&B also gets a prompt -> image table)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from text2img.utils.grid import captioned_grid
from text2img.lightning.tracking import SampleGrid, log_samples
from text2img.types import EvalOutputs


class SampleGridCallback(L.Callback):
    """Writes `<dirpath>/<stage>_step<global step>.png` from the first `num_images` generated images.

    The evaluation loaders are not shuffled and generation is seeded, so every grid shows the same
    prompts from the same noise: grids from different steps and runs can be compared side by side.
    """

    def __init__(self, dirpath: str, num_images: int = 32, ncols: int = 8) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.num_images = num_images
        self.ncols = ncols
        self.images: list[torch.Tensor] = []
        self.captions: list[str] = []
        self.keys: list[int] = []
        self.last_path: Path | None = None

    def _collect(self, trainer: L.Trainer, outputs: EvalOutputs) -> None:
        room = self.num_images - len(self.captions)
        if trainer.is_global_zero and room > 0 and not trainer.sanity_checking:
            self.images.append(outputs.images[:room].cpu())
            self.captions.extend(outputs.captions[:room])
            self.keys.extend(outputs.keys[:room].tolist())

    def _write(self, trainer: L.Trainer, stage: str) -> None:
        if not self.captions:
            return
        images = torch.cat(self.images)
        grid = captioned_grid(images, self.captions, ncols=self.ncols)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        self.last_path = self.dirpath / f"{stage}_step{trainer.global_step:06d}.png"
        grid.save(self.last_path)
        samples = SampleGrid(stage, trainer.global_step, grid, images, self.captions, self.keys)
        for logger in trainer.loggers:
            log_samples(logger, samples)
        self.images, self.captions, self.keys = [], [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, "test")
