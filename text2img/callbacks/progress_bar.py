"""Lightning's progress: its rich bar on a terminal, a log line per interval everywhere else."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar

from text2img.utils.progress import Progress, terminal_shows_bars


def progress_bar() -> ProgressBar:
    """`RichBar` when stdout and stderr are a terminal; `LoggedProgressBar` otherwise (CI, `| tee`, SLURM),
    where the rich bar prints nothing until a stage ends and tqdm's fills the file with carriage returns."""
    return RichBar() if terminal_shows_bars() else LoggedProgressBar()


def bar_metrics(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
    """The module's `bar_metrics` (names of logged training metrics, e.g. ("train/loss",)) as numbers: a host copy.

    The modules log them without `prog_bar=True`, since Lightning copies every prog_bar metric to the host after
    every training step, which stalls a GPU's queue; the bars call this only when they draw."""
    metrics = trainer.callback_metrics
    return {name: float(metrics[name]) for name in getattr(pl_module, "bar_metrics", ()) if name in metrics}


class RichBar(RichProgressBar):
    """Lightning's rich bar, which reads its metrics after every training batch (a host sync per step on a GPU),
    reading them at most every `metrics_interval` seconds instead, with the module's `bar_metrics`."""

    def __init__(self, metrics_interval: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics_interval = metrics_interval
        self._metrics_read = -math.inf

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return {**super().get_metrics(trainer, pl_module), **bar_metrics(trainer, pl_module)}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # resumed mid-epoch, as Lightning's own hook does
        self._update(self.train_progress_bar_id, batch_idx + 1)
        if time.monotonic() - self._metrics_read >= self.metrics_interval:
            self._metrics_read = time.monotonic()
            self._update_metrics(trainer, pl_module)
        self.refresh()


class LoggedProgressBar(ProgressBar):
    """Training, validation and test progress as `text2img.utils.progress` lines: the count, rate and time left (and the
    progress-bar metrics, e.g. the training loss) at most every `TEXT2IMG_PROGRESS_INTERVAL` seconds, and a last
    line when each ends. The training rate includes the pauses for validation, so its time left does too."""

    def __init__(self) -> None:
        super().__init__()
        self.is_enabled = True  # Lightning disables the bar on ranks > 0
        self.training: Progress | None = None
        self.evaluation: Progress | None = None

    def disable(self) -> None:
        self.is_enabled = False

    def enable(self) -> None:
        self.is_enabled = True

    def _progress(self, what: str, total: float, unit: str, done: int = 0) -> Progress | None:
        if not self.is_enabled:
            return None
        return Progress(what, None if math.isinf(total) else int(total), unit, done=done)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return {**super().get_metrics(trainer, pl_module), **bar_metrics(trainer, pl_module)}

    def _metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        metrics = self.get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return ", ".join(
            f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}" for name, value in metrics.items()
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.training = self._progress("training", trainer.estimated_stepping_batches, "steps", trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if self.training is not None:  # optimizer steps: with accumulated batches, not every batch is one
            # the metrics only when a line is written: reading them brings values back from the device
            self.training.advance(trainer.global_step - self.training.done, lambda: self._metrics(trainer, pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.training is not None:
            self.training.close()
            self.training = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.evaluation = self._progress("validation", self.total_val_batches, "batches")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluation = self._progress("test", sum(trainer.num_test_batches), "batches")

    def on_validation_batch_end(self, *args) -> None:
        if self.evaluation is not None:
            self.evaluation.advance()

    on_test_batch_end = on_validation_batch_end

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.evaluation is not None:
            self.evaluation.close()
            self.evaluation = None

    on_test_end = on_validation_end

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        for progress in (self.training, self.evaluation):
            if progress is not None:
                progress.close(finished=False)
        self.training = self.evaluation = None
