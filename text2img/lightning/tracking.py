"""Experiment tracking: a W&B logger (offline without credentials, one run per multirun job) and sample
grids for every logger that shows images."""

from __future__ import annotations

import csv
import hashlib
import logging
import netrc
import os
import sys
from dataclasses import dataclass, field
from functools import singledispatch
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers.utilities import _scan_checkpoints
from PIL import Image
from torch import Tensor

log = logging.getLogger(__name__)

MAX_TAG_LENGTH = 64  # W&B refuses longer tags


def wandb_credentials_found() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` writes it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_tag(override: str) -> str:
    """A Hydra override as a W&B tag: long values keep their end (a path's distinguishing part)."""
    if len(override) <= MAX_TAG_LENGTH:
        return override
    key, sep, value = override.partition("=")
    room = MAX_TAG_LENGTH - len(key) - len(sep) - 1
    if sep and room >= 8:
        return f"{key}{sep}…{value[-room:]}"
    return override[: MAX_TAG_LENGTH - 1] + "…"


@dataclass(frozen=True)
class RunNaming:
    """How a run is filed in W&B; empty outside a multirun."""

    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


def sweep_run_naming() -> RunNaming:
    """A multirun job's group (its sweep folder's name), name (its override_dirname, else its number) and
    tags (its overrides); nothing in a single run. Keys in `hydra.job.config.override_dirname.exclude_keys`
    are left out of both name and tags."""
    if not HydraConfig.initialized():
        return RunNaming()
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return RunNaming()
    excluded = set(hydra_cfg.job.config.override_dirname.exclude_keys)
    overrides = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") not in excluded]
    return RunNaming(
        group=Path(hydra_cfg.sweep.dir).name,
        name=hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}",
        tags=[wandb_tag(override) for override in overrides],
    )


def folder_run_id(run_folder: str) -> str:
    """A W&B run id fixed by the run's folder (its absolute path, which a requeued job on another node shares)."""
    return hashlib.sha256(str(Path(run_folder).resolve()).encode()).hexdigest()[:16]


class Text2ImgWandbLogger(WandbLogger):
    """Lightning's `WandbLogger` writing under `save_dir/wandb/`, with four changes:

    - offline when there are no credentials (or `WANDB_MODE=offline`), checkpoint artifacts included:
      `wandb sync` uploads them later (Lightning refuses `log_model` with its own `offline=True`);
    - in a Hydra multirun, each job's run is grouped by sweep, named and tagged by its overrides
      (an explicit `group` or `name` wins; `tags` are added to the overrides);
    - the run id follows from the run folder, so a run resumed there (`ckpt_path=last`) continues its W&B run;
    - with `log_model`, the "best" alias goes only to a monitored checkpoint, and a `last.ckpt` link is
      not uploaded a second time beside its target.
    """

    def __init__(
        self,
        save_dir: str,
        project: str = "text2img",
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        log_model: bool | str = False,
        offline: bool | None = None,
        **kwargs,
    ) -> None:
        if offline is None:
            mode = os.environ.get("WANDB_MODE")
            offline = mode in ("offline", "dryrun") if mode else not wandb_credentials_found()
            if offline and not mode:
                log.warning(
                    "wandb: no credentials found, logging offline to %s; upload later with "
                    "`wandb sync %s/wandb/offline-run-*`", save_dir, save_dir,
                )
        if offline:
            kwargs["mode"] = "offline"  # wandb.init's offline mode: it records artifacts for `wandb sync`
        # One W&B run per run folder: a run resumed in its folder (ckpt_path=last, a requeued sweep job) continues it.
        kwargs.setdefault("id", folder_run_id(save_dir))
        kwargs.setdefault("resume", "allow")
        naming = sweep_run_naming()
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(
            save_dir=save_dir, project=project, entity=entity, log_model=log_model,
            name=name or naming.name, group=group or naming.group,
            tags=list(dict.fromkeys([*(tags or []), *naming.tags])),  # in order, without repeats
            **kwargs,
        )
        self._uploaded: set[tuple[Path, float]] = set()  # checkpoint files (links resolved) and their mtimes

    @property
    def log_dir(self) -> str | None:
        """This run's folder, `<save_dir>/wandb/offline-run-<date>-<id>` offline: what `wandb sync` takes."""
        run_files = getattr(self._experiment, "dir", None)  # <run folder>/files
        return None if run_files is None else str(Path(run_files).parent)

    def _scan_and_log_checkpoints(self, checkpoint_callback: ModelCheckpoint) -> None:
        import wandb

        for mtime, path, score, _ in _scan_checkpoints(checkpoint_callback, self._logged_model_time):
            self._logged_model_time[path] = mtime
            file = Path(path).resolve()  # a last.ckpt link (save_last: link) is its target
            if (file, mtime) in self._uploaded:
                continue
            self._uploaded.add((file, mtime))
            monitored = checkpoint_callback.monitor is not None
            is_best = monitored and file == Path(checkpoint_callback.best_model_path).resolve()
            metadata = {
                "score": score.item() if isinstance(score, Tensor) else score,
                "monitor": checkpoint_callback.monitor,
                "original_filename": file.name,
            }
            self._checkpoint_name = self._checkpoint_name or f"model-{self.experiment.id}"
            artifact = wandb.Artifact(name=self._checkpoint_name, type="model", metadata=metadata)
            artifact.add_file(str(file), name="model.ckpt", policy=self.add_file_policy)
            self.experiment.log_artifact(artifact, aliases=["latest", "best"] if is_best else ["latest"])


class _AppendingCSVWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Lightning deletes an existing metrics.csv here; a resumed run appends to it instead, under its header
        (the columns of rows to come are checked against it, and the file rewritten when new ones appear)."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class ResumableCSVLogger(CSVLogger):
    """Lightning's `CSVLogger`, except that a run resumed in its folder (`ckpt_path=last`) keeps the rows logged
    before the interruption: it appends to `metrics.csv` rather than replacing it. Steps logged again after
    the resume appear twice, the later row last (`text2img.inspect.analysis` keeps that one)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingCSVWriter(log_dir=self.log_dir)
        return self._experiment


def finish_wandb_run() -> None:
    """End this process's W&B run, if any. Lightning's WandbLogger reuses a running `wandb.run` and never
    finishes it, so without this every job of a multirun would log into the first job's run."""
    wandb = sys.modules.get("wandb")  # not imported: no run (and no import for runs that log elsewhere)
    if wandb is not None and wandb.run is not None:
        wandb.finish()


@dataclass
class SampleGrid:
    """One evaluation's captioned grid and the samples it shows, for the loggers."""

    stage: str  # "val" or "test"
    step: int
    grid: Image.Image
    images: Tensor  # [N, 3, H, W] in [0, 1]
    captions: list[str]
    keys: list[int]  # each sample's position in the evaluation set, which fixes its noise

    @property
    def caption(self) -> str:
        return f"{self.stage} step {self.step}: {len(self.captions)} held-out prompts"


@singledispatch
def log_samples(logger: Logger, samples: SampleGrid) -> None:
    """Show `samples` in `logger`; loggers without images (CSV) get nothing."""


@log_samples.register
def _log_samples_to_wandb(logger: WandbLogger, samples: SampleGrid) -> None:
    """The captioned grid, and a table of the same samples, one row per prompt, in one history step."""
    import wandb

    pixels = (samples.images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    rows = [
        [samples.step, key, caption, wandb.Image(image)]
        for key, caption, image in zip(samples.keys, samples.captions, pixels, strict=True)
    ]
    logger.log_metrics({
        f"{samples.stage}/samples": wandb.Image(samples.grid, caption=samples.caption),
        f"{samples.stage}/samples_table": wandb.Table(columns=["step", "key", "prompt", "image"], data=rows),
    }, step=samples.step)


@log_samples.register
def _log_samples_to_tensorboard(logger: TensorBoardLogger, samples: SampleGrid) -> None:
    logger.experiment.add_image(
        f"{samples.stage}/samples", np.asarray(samples.grid), global_step=samples.step, dataformats="HWC"
    )
