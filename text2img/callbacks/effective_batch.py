"""The effective batch size of a run, printed when training starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EffectiveBatch:
    """Samples per optimizer step: `per_process` x `accumulated` batches x `devices` per node x `nodes`."""

    per_process: int
    accumulated: int
    devices: int
    nodes: int

    @property
    def size(self) -> int:
        return self.per_process * self.accumulated * self.devices * self.nodes

    def __str__(self) -> str:
        return (
            f"effective batch size {self.size} = {self.per_process} per process x {self.accumulated} accumulated "
            f"x {self.devices} devices x {self.nodes} nodes"
        )


class EffectiveBatchSize(L.Callback):
    """Logs the effective batch size (what the learning rate is tuned for) once, from global rank 0, when
    training starts: the training loader's batch size (data.batch_size, or a whole train split smaller than it, see
    `Text2ImgDataModule`) x trainer.accumulate_grad_batches x trainer.devices x trainer.num_nodes."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batch = effective_batch(trainer)
        if batch is not None and trainer.is_global_zero:
            log.info("%s", batch)


def effective_batch(trainer: L.Trainer) -> EffectiveBatch | None:
    """The running fit's effective batch; None when its training loader has no fixed batch size."""
    per_process = getattr(trainer.train_dataloader, "batch_size", None)
    if per_process is None:
        return None
    return EffectiveBatch(per_process, trainer.accumulate_grad_batches, trainer.num_devices, trainer.num_nodes)
