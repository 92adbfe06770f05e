"""Hydra multirun jobs: DDP ranks that stay inside their job, and sweeps that can be re-run.

A job of `python -m text2img.train -m ...` runs in the sweeper's process. When its trainer starts DDP
processes, Lightning relaunches the *command line* for each extra rank, which would start the whole sweep
again in a new folder; `ranks_stay_in_job` makes the relaunched command the job's own single run, in the
job's folder. Each finished job leaves `result.json`, so a sweep re-run in the same `hydra.sweep.dir`
returns the stored value of a finished job instead of training it again, and resumes an interrupted one
from its `last.ckpt` (what a requeued SLURM job needs).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write
from torch import distributed as dist

from text2img.errors import ConfigError
from text2img.utils.files import atomic_path

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
# What Lightning's DDP launcher sets in the launching process (lightning.fabric.strategies.launchers.subprocess_script)
DDP_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class SweepJob:
    """One job of a multirun: its folder and the overrides that define it."""

    folder: Path
    overrides: list[str]
    num: int

    @classmethod
    def current(cls) -> SweepJob | None:
        """The running multirun job; None in a single run (a DDP rank relaunched into a job is one)."""
        if not HydraConfig.initialized():
            return None
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return None
        return cls(Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task), int(hydra_cfg.job.num))

    @property
    def last_checkpoint(self) -> Path:
        return self.folder / "checkpoints" / "last.ckpt"


@dataclass(frozen=True)
class JobResult:
    """What a finished job returned to the sweeper, stored in its folder as result.json."""

    overrides: list[str]
    optimized_metric: str
    value: float | None


def finished_result(job: SweepJob) -> JobResult | None:
    """The stored result of this job if it already finished; raises if its folder holds another job's run."""
    path = job.folder / RESULT_FILE
    if not path.is_file():
        return None
    result = JobResult(**json.loads(path.read_text()))
    if result.overrides != job.overrides:
        raise ConfigError(
            f"sweep job {job.num}'s folder {job.folder} holds a finished run of other overrides "
            f"({' '.join(result.overrides)}); re-run a sweep with the same arguments, or give a new hydra.sweep.dir"
        )
    return result


def write_result(job: SweepJob, result: JobResult) -> None:
    with atomic_path(job.folder / RESULT_FILE) as tmp:
        tmp.write_text(json.dumps(asdict(result), indent=1) + "\n")


@contextmanager
def ranks_stay_in_job(job: SweepJob | None) -> Iterator[None]:
    """Within a multirun job, make Lightning's DDP relaunch of extra ranks run this job alone, in its folder.

    Lightning's subprocess launcher runs `sys.argv[1:]` plus `hydra.run.dir=<HydraConfig run.dir>`; here that
    becomes the job's own overrides (no `-m`, no sweep lists) as a single run, and the job's folder.
    """
    if job is None:
        yield
        return
    hydra_cfg = HydraConfig.get()  # the job's own: the launcher sets a fresh one for the next job
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = str(job.folder)
    argv = sys.argv
    # hydra.mode=RUN: a preset of the job's overrides may select MULTIRUN itself (hparams_search=optuna does)
    sys.argv = [argv[0], *job.overrides, "hydra.mode=RUN"]
    # The launcher also leaves LOCAL_RANK & co. in this process's environment (the next job would take them
    # to mean "started by torchrun" and start no ranks) and its process group open (on ranks that have exited).
    environment = {name: os.environ.get(name) for name in DDP_ENVIRONMENT}
    try:
        yield
    finally:
        sys.argv = argv
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
