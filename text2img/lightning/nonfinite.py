"""What training does when a loss is NaN or inf: one policy for every LightningModule (`model.nonfinite_loss`),
decided on the device so that a GPU's queue is not drained every step to look at a loss."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor

from text2img.errors import ConfigError
from text2img.lightning.distributed import sum_over_processes

log = logging.getLogger(__name__)

NONFINITE_ACTIONS = ("stop", "skip")
# Loss values kept on the device for the message of a failure (a step reports at most this many losses).
MAX_LOSSES = 6


def skips_on_device(optimizers: Iterable[torch.optim.Optimizer], precision_plugin: object | None) -> bool:
    """Whether every optimiser can drop a step on the device: torch's fused Adam, AdamW, SGD and Adagrad read an
    `optimizer.found_inf` tensor and, where it is 1, leave parameters, moments, weight decay and step count exactly as
    they were (the mechanism AMP's GradScaler uses). Not under a GradScaler (trainer.precision=16-mixed), which sets
    `found_inf` itself."""
    optimizers = list(optimizers)
    if not optimizers or getattr(precision_plugin, "scaler", None) is not None:
        return False
    return all(group.get("fused") for optimizer in optimizers for group in optimizer.param_groups)


@dataclass(frozen=True)
class _Checked:
    """Host-side facts about one checked batch, looked up when the device flags are read."""

    step: int
    epoch: int
    batch_idx: int
    names: tuple[str, ...]


class _DeviceState:
    """The policy's running state, all on the training device and updated out of place (a logged tensor is never
    changed afterwards). A row is [number of the checked batch, non-finite on this process, loss values...]."""

    def __init__(self, device: torch.device, skipped: int, consecutive: int) -> None:
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.skipped = torch.full((), skipped, dtype=torch.float64, device=device)
        self.consecutive = torch.full((), consecutive, dtype=torch.float64, device=device)
        self.halted = torch.zeros((), dtype=torch.bool, device=device)  # every later update is dropped
        self.halt_row = torch.zeros(2 + MAX_LOSSES, dtype=torch.float64, device=device)
        self.last_skip_row = torch.zeros(2 + MAX_LOSSES, dtype=torch.float64, device=device)


class NonFiniteLossPolicy:
    """What training does when a loss is NaN or inf (`model.nonfinite_loss`), shared by every LightningModule.

    `stop` raises FloatingPointError naming the global step and the losses, before the weights are spoilt.
    `skip` leaves the weights and optimiser state as they were for that batch, counts it (`skipped_steps`, logged
    as `train/skipped_steps`) and stops after `max_consecutive_skips` skipped batches in a row: then the weights
    or the data are broken, not one batch. Every process takes the same decision (the count of non-finite
    losses is summed across processes), so under DDP no process waits alone in a gradient all-reduce.

    Where the decision is made (`on_device`, chosen when training starts):

    - On the device, when every optimiser is fused (`optimizer.fused=true`, the default on GPUs: see
      conf/model/): the flags are tensors, a dropped update is an optimiser step with `found_inf` set (which
      changes nothing, bit for bit), and the host reads the flags only every `trainer.log_every_n_steps` checked
      batches (the steps Lightning reads the logged metrics anyway) and when training ends: one copy of a few
      numbers. A `stop`, or the skip that reaches `max_consecutive_skips`, halts the updates on the device at once:
      every later update is dropped until the host reads the flags and raises, naming the batch that failed. So
      the weights are exactly those from before that batch, as when the error was raised at once; only
      `trainer.global_step` may have counted up to log_every_n_steps - 1 further (dropped) steps. Skips are warned
      about at the reads (the count since the last read and the last one's step and losses).
    - On the host otherwise (optimisers that cannot drop a step on the device, a GradScaler, a step outside a
      fit): the flags are read every batch and a dropped update has its gradients set to None, which torch
      optimisers leave alone: no step, no weight decay, no change of their moments. One host sync per batch.

    A module calls `check` once per batch with that batch's losses (it returns the device flag "drop this batch's
    update"), `apply` before each optimiser step with the flag, and `finish` when training ends.
    """

    def __init__(self, action: str, max_consecutive_skips: int, advice: str) -> None:
        if action not in NONFINITE_ACTIONS:
            raise ConfigError(f"model.nonfinite_loss={action!r} is unknown; use stop or skip")
        if max_consecutive_skips < 1:
            raise ConfigError(f"model.max_consecutive_skips={max_consecutive_skips} must be >= 1")
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.advice = advice
        # As of the last read of the device flags (after a fit: its end).
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.on_device = False
        self.read_every = 1
        self._state: _DeviceState | None = None
        self._trainer: object | None = None
        self._checked: dict[int, _Checked] = {}
        self._count = 0

    # --- the training step's calls ----------------------------------------------------------------------------

    @staticmethod
    def nonfinite(losses: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(on this process, on any process): device bools, true when some loss is NaN or inf."""
        local = torch.stack([(~torch.isfinite(loss.detach())).any() for loss in losses.values()]).any()
        return local, sum_over_processes(local.float()) > 0

    def flag(self, module: L.LightningModule, losses: Mapping[str, Tensor]) -> Tensor:
        """The device flag "drop this update" for losses checked before `check` sees the batch (a GAN's
        discriminator step): some loss non-finite on some process, or training halted. Counts nothing."""
        self._ensure_started(module)
        return self.nonfinite(losses)[1] | self._state.halted

    def check(
        self, module: L.LightningModule, losses: Mapping[str, Tensor], batch_idx: int, step: int | None = None
    ) -> Tensor:
        """Checks one batch's losses and returns the device flag "drop this batch's update". Counts a skip, halts
        a `stop` or a `skip` that gave up (see the class), and reads the flags on the host when it is time:
        then a halt raises FloatingPointError. `step` is the global step the failure is reported at (default:
        the module's now)."""
        if len(losses) > MAX_LOSSES:
            raise ValueError(f"at most {MAX_LOSSES} losses per check, got {len(losses)}")
        self._ensure_started(module)
        state = self._state
        local, bad = self.nonfinite(losses)

        self._count += 1
        self._checked[self._count] = _Checked(
            module.global_step if step is None else step, module.current_epoch, batch_idx, tuple(losses)
        )
        state.count = state.count + 1
        values = [loss.detach().double().reshape(()) for loss in losses.values()]
        row = torch.stack([state.count, local.double(), *values])
        row = torch.cat([row, row.new_zeros(2 + MAX_LOSSES - len(row))])

        halted_before = state.halted
        counted = bad & ~halted_before  # after a halt nothing is counted: the host raises at its next read
        if self.action == "skip":
            state.skipped = state.skipped + counted.double()
            state.consecutive = torch.where(counted, state.consecutive + 1, torch.where(halted_before, state.consecutive, 0))
            state.last_skip_row = torch.where(counted, row, state.last_skip_row)
            halt = counted & (state.consecutive >= self.max_consecutive_skips)
            module.log("train/skipped_steps", state.skipped.float())
        else:
            halt = counted
        state.halt_row = torch.where(halt, row, state.halt_row)
        state.halted = halted_before | halt

        if self._count % self.read_every == 0:
            self.read(module)
        return bad | state.halted

    def apply(self, optimizer: torch.optim.Optimizer | LightningOptimizer, drop: Tensor | bool) -> None:
        """Before `optimizer` steps: make its update a no-op where `drop` is true (see the class)."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        if self.on_device and self._state is not None:
            optimizer.found_inf = (self._state.halted | drop).float()
        elif drop if isinstance(drop, bool) else bool(drop):  # a host sync: the fallback (see the class)
            optimizer.zero_grad(set_to_none=True)

    def finish(self, module: L.LightningModule) -> None:
        """When training ends: the last read of the flags (it raises if training halted since the last read)."""
        if self._state is not None:
            try:
                self.read(module)
            finally:
                self._state, self._trainer = None, None

    # --- the host side ----------------------------------------------------------------------------------------

    def _ensure_started(self, module: L.LightningModule) -> None:
        trainer = module._trainer  # None for a step run outside a fit (a test, a notebook)
        if self._state is not None and self._trainer is trainer:
            return
        if trainer is None:
            self.on_device, self.read_every = False, 1
        else:
            self.on_device = skips_on_device(trainer.optimizers, trainer.precision_plugin)
            self.read_every = max(1, int(trainer.log_every_n_steps)) if self.on_device else 1
        self._trainer = trainer
        self._state = _DeviceState(module.device, self.skipped_steps, self.consecutive_skips)
        self._checked, self._count = {}, 0

    def read(self, module: L.LightningModule) -> None:
        """One host copy of the flags: warns about the skips since the last read, raises if training halted."""
        state = self._state
        values = torch.cat([
            torch.stack([state.skipped, state.consecutive, state.halted.double()]), state.halt_row, state.last_skip_row,
        ]).tolist()
        skipped, consecutive, halted = int(values[0]), int(values[1]), bool(values[2])
        halt_row, last_skip_row = values[3:5 + MAX_LOSSES], values[5 + MAX_LOSSES:]
        new_skips = skipped - self.skipped_steps
        self.skipped_steps, self.consecutive_skips = skipped, consecutive
        if halted:
            failure = self._describe(halt_row)
            self._state, self._trainer = None, None  # a fit after this one starts afresh
            if self.action == "stop":
                raise FloatingPointError(f"{failure}; {self.advice} (or set model.nonfinite_loss=skip to skip such steps)")
            raise FloatingPointError(
                f"model.nonfinite_loss=skip gave up after {self.max_consecutive_skips} skipped steps in a row (the "
                f"model.max_consecutive_skips limit; the weights or the data are broken, not one batch), the last "
                f"a {failure}; {self.advice}"
            )
        if new_skips > 0 and module.global_rank == 0:
            last = self._describe(last_skip_row)
            if new_skips == 1:
                log.warning("skipping the update: %s (%d skipped so far)", last, skipped)
            else:
                log.warning("skipped the updates of %d batches since the last check, the last a %s (%d skipped so "
                            "far)", new_skips, last, skipped)
        self._checked = {}  # a later row to describe is a later batch's

    def _describe(self, row: list[float]) -> str:
        checked = self._checked[int(row[0])]
        values = ", ".join(f"{name} {value:.4g}" for name, value in zip(checked.names, row[2:]))
        where = "" if row[1] else " (finite here, non-finite on another process)"
        return (f"non-finite loss at step {checked.step} (epoch {checked.epoch}, batch {checked.batch_idx}): "
                f"{values}{where}")
