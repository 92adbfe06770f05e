"""What training does when a loss is NaN or inf: one policy for every LightningModule (`model.nonfinite_loss`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import lightning as L
import torch
from torch import Tensor

from text2img.errors import ConfigError

log = logging.getLogger(__name__)

NONFINITE_ACTIONS = ("stop", "skip")


class NonFiniteLossPolicy:
    """What training does when a loss is NaN or inf (`model.nonfinite_loss`), shared by every LightningModule.

    `stop` raises FloatingPointError naming the global step and the losses, before the weights are spoilt.
    `skip` leaves the weights and optimiser state as they were for that step, counts it (`skipped_steps`, logged
    as `train/skipped_steps`) and stops after `max_consecutive_skips` skipped steps in a row: then the weights
    or the data are broken, not one batch. Every process takes the same decision (the count of non-finite
    losses is summed across processes), so under DDP no process waits alone in a gradient all-reduce.
    """

    def __init__(self, action: str, max_consecutive_skips: int, advice: str) -> None:
        if action not in NONFINITE_ACTIONS:
            raise ConfigError(f"model.nonfinite_loss={action!r} is unknown; use stop or skip")
        if max_consecutive_skips < 1:
            raise ConfigError(f"model.max_consecutive_skips={max_consecutive_skips} must be >= 1")
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.advice = advice
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._last_failure = ""

    def finite(
        self,
        module: L.LightningModule,
        losses: Mapping[str, Tensor],
        batch_idx: int,
        also_report: Callable[[], Mapping[str, Tensor]] | None = None,
    ) -> bool:
        """True when every loss is finite on every process. Otherwise `stop` raises and `skip` returns False: the
        caller must not update the weights with these losses' gradients. `also_report` gives further losses for
        the message, computed only then.

        One host sync per call; the progress bar reads the logged loss every step anyway.
        """
        trainer = module._trainer  # None for a step run outside a fit (a test, a notebook)
        local = sum((~torch.isfinite(loss.detach())).sum() for loss in losses.values())
        everywhere = local if trainer is None else trainer.strategy.reduce(local.float(), reduce_op="sum")
        if not everywhere.item():
            return True
        if also_report is not None:
            with torch.no_grad():
                losses = {**losses, **also_report()}
        values = ", ".join(f"{name} {float(loss.detach()):.4g}" for name, loss in losses.items())
        where = "" if local else " (finite here, non-finite on another process)"
        step, epoch = module.global_step, module.current_epoch
        self._last_failure = f"non-finite loss at step {step} (epoch {epoch}, batch {batch_idx}): {values}{where}"
        if self.action == "stop":
            raise FloatingPointError(
                f"{self._last_failure}; {self.advice} (or set model.nonfinite_loss=skip to skip such steps)"
            )
        return False

    def record(self, module: L.LightningModule, skipped: bool) -> None:
        """Count a training step, skipped or not; raise after too many skips in a row."""
        if skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.max_consecutive_skips:
                raise FloatingPointError(
                    f"model.nonfinite_loss=skip gave up after {self.consecutive_skips} skipped steps in a row (the "
                    f"model.max_consecutive_skips limit; the weights or the data are broken, not one batch), the last "
                    f"a {self._last_failure}; {self.advice}"
                )
            if module.global_rank == 0:
                log.warning("skipping the update: %s (%d skipped so far)", self._last_failure, self.skipped_steps)
        else:
            self.consecutive_skips = 0
        if self.action == "skip":
            module.log("train/skipped_steps", float(self.skipped_steps))
