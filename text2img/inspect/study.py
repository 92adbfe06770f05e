"""A study's results, kept and read: `StudyResults`, a Hydra callback, writes each finished job of a study multirun
(experiments/llm_study: jobs `<cell> x <seed>`) as `<folder>/<cell>-s<seed>.json` at once (and, with `commit`,
commits that file on its own: `git commit -- <file>` leaves every other change alone), so a study that outlives a
session loses nothing; `load_results`, `study_table` and `plot_study` give every cell against its baseline, with
95% intervals over seeds and Welch's tests."""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from text2img.errors import ConfigError
from text2img.inspect.analysis import load_run
from text2img.inspect.seeds import difference, mean_interval
from text2img.utils.files import atomic_path

log = logging.getLogger(__name__)

# What each benchmark is read by, and which end of each figure is better.
FIGURES = {
    "shapes": ["attr_overall", "attr_colour", "attr_shape", "attr_size", "attr_count", "attr_position",
               "r_precision_fixed", "fid_effnet"],
    "openmoji": ["r_precision_fixed", "r_precision", "fid_effnet", "kid_effnet"],
}
LOWER_IS_BETTER = ("fid_effnet", "kid_effnet")


def load_results(folder: str | Path) -> pd.DataFrame:
    """One row per finished job of every benchmark under `folder`: benchmark, cell, seed, factor, baseline and
    each test figure."""
    root = Path(folder).expanduser()
    files = sorted(root.glob("*/*-s*.json"))
    if not files:
        raise ConfigError(f"{root} holds no study results (<benchmark>/<cell>-s<seed>.json); run the study first")
    rows = []
    for path in files:
        record = json.loads(path.read_text())
        study = record.get("study", {})
        rows.append({
            "benchmark": path.parent.name, "cell": record["cell"], "seed": record["seed"],
            "factor": study.get("factor", ""), "baseline": study.get("baseline", "default"), **record["figures"],
        })
    return pd.DataFrame(rows).sort_values(["benchmark", "factor", "cell", "seed"], ignore_index=True)


def study_table(results: pd.DataFrame, benchmark: str, figures: Sequence[str] | None = None,
                alpha: float = 0.05) -> pd.DataFrame:
    """Per cell of `benchmark`: its seeds, each figure's mean and 95% interval ("mean ± half-width"), and the
    difference from its baseline cell with Welch's p; a difference is marked * when it is significant after
    Holm's correction over every (cell, figure) test of the table, so a table of many cells does not find
    differences by chance."""
    rows = results[results.benchmark == benchmark]
    figures = [name for name in (figures or FIGURES.get(benchmark, [])) if name in rows]
    tests: list[tuple[str, str, float]] = []
    table: dict[str, dict[str, str]] = {}
    by_cell = {cell: group for cell, group in rows.groupby("cell", sort=False)}
    for cell, group in by_cell.items():
        baseline = group.baseline.iloc[0]
        entry = {"factor": group.factor.iloc[0], "seeds": str(len(group)), "vs": baseline if baseline != cell else ""}
        for name in figures:
            values = group[name].dropna().tolist()
            entry[name] = mean_interval(values).format(".3f" if "fid" not in name else ".1f") if values else "—"
            if baseline != cell and baseline in by_cell:
                base = by_cell[baseline][name].dropna().tolist()
                if values and base:
                    change = difference(values, base)
                    delta = change.delta if abs(change.delta) > 1e-8 else 0.0  # equal means: +0, not +1.2e-09
                    entry[f"{name} Δ"] = f"{delta:+.3g}"
                    if change.p_value is not None:
                        tests.append((cell, name, change.p_value))
                        entry[f"{name} Δ"] += f" (p={change.p_value:.2g})"
        table[cell] = entry
    for cell, name in holm_significant(tests, alpha):
        table[cell][f"{name} Δ"] += " *"
    return pd.DataFrame.from_dict(table, orient="index").fillna("")


def holm_significant(tests: Sequence[tuple[str, str, float]], alpha: float = 0.05) -> list[tuple[str, str]]:
    """The (cell, figure) pairs whose p-values stay below `alpha` under Holm's step-down correction."""
    significant = []
    ordered = sorted(tests, key=lambda test: test[2])
    for rank, (cell, name, p_value) in enumerate(ordered):
        if p_value > alpha / (len(ordered) - rank):
            break
        significant.append((cell, name))
    return significant


def plot_study(results: pd.DataFrame, benchmark: str, figures: Sequence[str] | None = None, columns: int = 4):
    """One panel per figure, `columns` to a row: each cell's mean with its 95% interval, cells grouped by factor,
    and a dashed line at the default cell's mean (a matplotlib Figure)."""
    import matplotlib.pyplot as plt

    rows = results[results.benchmark == benchmark]
    figures = [name for name in (figures or FIGURES.get(benchmark, [])) if name in rows]
    cells = list(dict.fromkeys(rows.sort_values(["factor", "cell"]).cell))
    columns = min(columns, len(figures))
    lines = -(-len(figures) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.4 * columns, lines * (0.3 * len(cells) + 1.0)), squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(figures):
            ax.set_visible(False)
            continue
        name = figures[index]
        intervals = [mean_interval(rows[rows.cell == cell][name].dropna().tolist()) for cell in cells]
        means = [interval.mean for interval in intervals]
        errors = [0 if interval.low is None else interval.mean - interval.low for interval in intervals]
        ax.barh(range(len(cells)), means, xerr=errors, color="#7a9cc6", ecolor="black", capsize=2)
        if "default" in cells:
            ax.axvline(means[cells.index("default")], color="grey", linestyle="--", linewidth=0.8)
        ax.set_yticks(range(len(cells)), cells if index % columns == 0 else [""] * len(cells))
        ax.invert_yaxis()
        ax.set_title(name + (" (lower is better)" if name in LOWER_IS_BETTER else ""), fontsize=9)
    fig.suptitle(f"LLM study, {benchmark}: mean and 95% interval over seeds; dashed: the default")
    fig.tight_layout()
    return fig


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
        if subprocess.run([*git, "add", "--", path.name], capture_output=True, check=False).returncode:
            log.warning("study: %s is not in a git repository; not committed", path)
            return
        if subprocess.run([*git, "diff", "--cached", "--quiet", "--", path.name], check=False).returncode:
            subprocess.run([*git, "commit", "-q", "-m", message, "--", path.name], check=False)
