"""The best checkpoint by `optimized_metric`, which a validation may not have computed."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

log = logging.getLogger(__name__)


class BestCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` of the best `monitor` value that skips a validation without that figure,
    with one warning, where Lightning stops the run.

    Metrics leave out figures they cannot compute on the data at hand (FID and KID under 2 images a side,
    R-precision with one distinct prompt): the run goes on, and only a validation that has the figure can
    become the best checkpoint. A `monitor` that the chosen metrics never compute is refused before training
    (`text2img.run.config_checks`).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._warned_missing = False

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        if self.monitor is None or self.monitor in monitor_candidates:
            super()._save_topk_checkpoint(trainer, monitor_candidates)
            return
        if not self._warned_missing:
            self._warned_missing = True
            log.warning(
                "best checkpoint: this validation did not compute %s (see the metrics' warnings), so it cannot be "
                "the best checkpoint; the run goes on, and checkpoints/last.ckpt is saved as usual",
                self.monitor,
            )
