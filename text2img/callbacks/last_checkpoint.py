"""The newest checkpoint of a run, always resumable: `last.ckpt` never dangles, and SIGTERM saves one."""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from text2img.utils.files import atomic_path

log = logging.getLogger(__name__)

# What a process killed by SIGTERM reports; a job script tells a stopped run from a finished one (exit 0) by it.
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class LastCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` for the newest state, made safe to kill at any moment:

    - with `save_last="link"`, `last.ckpt` is replaced by a new link in one rename, and the file it pointed to
      is removed only afterwards (Lightning removes the old step file first, then deletes and recreates the link:
      a kill in between leaves `last.ckpt` dangling, and `ckpt_path=last` would start the run again from step 0);
    - on SIGTERM (SLURM's notice before it kills a job), once Lightning stops after the current batch, it saves
      the state at that step and the process exits with status 143, not 0. A SIGTERM during validation saves
      nothing: the model then holds the averaged weights, so the run resumes from the previous checkpoint.

    The files themselves are written atomically by the trainer's `text2img.lightning.checkpoint_io.AtomicCheckpointIO`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._remove_after_relink: list[str] = []

    def _link_target(self) -> str | None:
        link = self.last_model_path
        return os.path.realpath(link) if link and os.path.islink(link) else None

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if self._link_target() == os.path.realpath(filepath):
            self._remove_after_relink.append(filepath)
            return
        super()._remove_checkpoint(trainer, filepath)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        while self._remove_after_relink:
            super()._remove_checkpoint(trainer, self._remove_after_relink.pop())

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            with atomic_path(Path(linkpath)) as tmp:
                try:
                    os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
                except OSError:  # no symbolic links (Windows without the privilege): a copy
                    shutil.copy(filepath, tmp)
        trainer.strategy.barrier()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            exception.code = SIGTERM_EXIT_CODE  # Lightning raises it with none: exit status 0
            if trainer.validating:
                log.warning("SIGTERM during validation: no checkpoint saved; resume from %s", self.last_model_path)
            elif not self._should_skip_saving_checkpoint(trainer):
                monitor_candidates = self._monitor_candidates(trainer)
                self._save_topk_checkpoint(trainer, monitor_candidates)
                self._save_last_checkpoint(trainer, monitor_candidates)
                log.info("SIGTERM: saved the state at step %d to %s", trainer.global_step, self.last_model_path)
        super().on_exception(trainer, pl_module, exception)
