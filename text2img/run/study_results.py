"""A Hydra callback that keeps each finished job of a study as one small JSON file, committed to git if asked.

A study (experiments/llm_study) is a multirun whose jobs are `<cell> x <seed>`; long studies outlive sessions, so
each finished job's test figures are written at once to `<folder>/<cell>-s<seed>.json` (and, with `commit`, committed
on their own: `git commit -- <file>` leaves every other change alone), and nothing is lost when a session ends.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from text2img.inspect.analysis import load_run
from text2img.utils.files import atomic_path

log = logging.getLogger(__name__)


class StudyResults(Callback):
    """`on_job_end`: the job's `test/*` figures, its cell (the `cell` config group's choice), seed, overrides and
    wall time, to `<folder>/<cell>-s<seed>.json`."""

    def __init__(self, folder: str, commit: bool = False) -> None:
        self.folder = Path(folder).expanduser()
        self.commit = commit

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.COMPLETED:
            return
        hydra_cfg = HydraConfig.get()
        cell = hydra_cfg.runtime.choices.get("cell") or "default"
        run = load_run(hydra_cfg.runtime.output_dir)
        figures = {name.removeprefix("test/"): value for name, value in run.final_metrics(("test/",)).items()}
        if not figures:
            log.warning("study: job %s logged no test figures; nothing written", hydra_cfg.runtime.output_dir)
            return
        record = {
            "cell": cell,
            "seed": int(config.seed),
            "overrides": list(hydra_cfg.overrides.task),
            "figures": figures,
            "study": dict(config.get("llm_study") or {}),
            "folder": str(hydra_cfg.runtime.output_dir),
        }
        target = self.folder / f"{cell}-s{int(config.seed)}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as scratch:
            scratch.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        log.info("study: %s seed %d -> %s", cell, int(config.seed), target)
        if self.commit:
            self._commit(target, f"llm_study: {target.parent.name} {cell} seed {int(config.seed)}")

    @staticmethod
    def _commit(path: Path, message: str) -> None:
        """Commit `path` alone; a repository without changes to it, or no repository, is left as it is."""
        git = ["git", "-C", str(path.parent)]
        if subprocess.run([*git, "add", "--", path.name], capture_output=True).returncode:
            log.warning("study: %s is not in a git repository; not committed", path)
            return
        if subprocess.run([*git, "diff", "--cached", "--quiet", "--", path.name]).returncode:
            subprocess.run([*git, "commit", "-q", "-m", message, "--", path.name], check=False)
