"""FID of generated images against the real images of the same split, as a Lightning callback."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from text2img.metrics.effnet import EfficientNetLite0Features
from text2img.metrics.fid import build_fid, metric_name


class FIDCallback(L.Callback):
    """Logs `<stage>/fid_<extractor>` after every validation and test epoch.

    Real-image statistics are computed at the first evaluation of a stage and kept
    (`reset_real_features=False`), so later validations only pay for the generated images.
    Every DDP rank updates with its share of the split; torchmetrics syncs the states in `compute()`.
    """

    def __init__(self, feature_extractor: nn.Module | None = None) -> None:
        super().__init__()
        self.feature_extractor = feature_extractor
        self.metrics: dict[str, FrechetInceptionDistance] = {}
        self.real_done: dict[str, bool] = {}

    def _metric(self, stage: str, pl_module: L.LightningModule) -> FrechetInceptionDistance:
        if stage not in self.metrics:
            if self.feature_extractor is None:  # built on first use and shared by the stages
                self.feature_extractor = EfficientNetLite0Features()
            self.metrics[stage] = build_fid(self.feature_extractor, reset_real_features=False)
            self.real_done[stage] = False
        return self.metrics[stage].to(pl_module.device)

    def _update(self, stage: str, pl_module: L.LightningModule, outputs: dict[str, Any]) -> None:
        metric = self._metric(stage, pl_module)
        metric.update(outputs["images"], real=False)
        if not self.real_done[stage]:
            metric.update(outputs["real"], real=True)

    def _log(self, stage: str, pl_module: L.LightningModule) -> None:
        metric = self.metrics[stage]
        value = metric.compute()
        self.real_done[stage] = True
        pl_module.log(f"{stage}/{metric_name(metric)}", value)
        metric.reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._update("val", pl_module, outputs)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val" in self.metrics:
            self._log("val", pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("test", pl_module, outputs)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log("test", pl_module)
