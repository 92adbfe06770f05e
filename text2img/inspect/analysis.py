"""Reading a sweep back: each job's overrides, config, metric history and sample grids, and a table of the
configs that differ between jobs against their final metrics (what notebooks/analysis.ipynb shows).

A sweep folder is what `python -m text2img.train -m ...` writes: `<sweep>/<job number>/` with `.hydra/`,
`samples/*.png`, and the loggers' files: `csv/metrics.csv` and `csv/hparams.yaml` (`logger=csv`), or a W&B
run folder `wandb/offline-run-*/` (`logger=wandb`, read from its `run-<id>.wandb` file, offline or not).
"""

from __future__ import annotations

import glob
import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from text2img.errors import ConfigError

# A W&B run file: a 7-byte header (":W&B", magic 0xBEE1, version), then LevelDB log blocks.
WANDB_HEADER = b":W&B"
WANDB_HEADER_SIZE = 7
WANDB_BLOCK = 32 * 1024
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, kind; kind 1 = a whole record, 2/3/4 = first/middle/last part
STEP = "step"
# Lightning's W&B logger records the trainer's step under this name; its own `_step` counts log calls.
WANDB_STEP = "trainer/global_step"


@dataclass
class SweepRun:
    """One job of a sweep (or one single run).

    name:      the job's folder name (its number in a sweep)
    overrides: its command-line overrides (`.hydra/overrides.yaml`)
    choices:   the option picked for each config group, e.g. {"generator": "diffusion", "logger": "csv"}
    config:    its resolved config as the logger recorded it, flattened: {"generator.guidance_scale": 3.0, ...}
               (the unresolved `.hydra/config.yaml` when no logger recorded one)
    history:   its logged metrics, indexed by trainer step, one column per metric (NaN where not logged)
    grids:     its captioned sample grids, `samples/val_step*.png` and `samples/test_step*.png`, by step
    source:    where the history came from: "csv", "wandb" or "none"
    """

    name: str
    folder: Path
    overrides: list[str]
    choices: dict[str, str]
    config: dict[str, Any]
    history: pd.DataFrame
    grids: list[Path]
    source: str

    def final_metrics(self, prefixes: Sequence[str] = ("val/", "test/")) -> dict[str, float]:
        """The last logged value of each metric whose name starts with one of `prefixes`."""
        last = self.history.ffill().iloc[-1] if len(self.history) else pd.Series(dtype=float)
        return {name: float(value) for name, value in last.items() if name.startswith(tuple(prefixes))}

    def last_grid(self, stage: str = "val") -> Path | None:
        """The newest sample grid of a stage ("val" or "test"), or None."""
        grids = [path for path in self.grids if path.name.startswith(f"{stage}_")]
        return grids[-1] if grids else None


def newest(pattern: str, hint: str) -> Path:
    """The most recently modified path matching the glob `pattern` (e.g. "outputs/train/multiruns/*");
    `hint` says how to make one when nothing matches."""
    matches = glob.glob(os.path.expanduser(pattern))
    if not matches:
        raise ConfigError(f"nothing matches {pattern} (from {Path.cwd()}); {hint}")
    return Path(max(matches, key=os.path.getmtime))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": [1, 2]}: nested mappings become dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def wandb_records(run_file: Path) -> Iterator[Any]:
    """The protobuf records (`wandb_internal_pb2.Record`) of a W&B run file, `run-<id>.wandb`.

    wandb 0.31 reads these files in its Go core only, so the LevelDB log framing is read here: records are
    cut into parts that never cross a 32 KiB block, and a block's tail too short for a part header is padding.
    A run cut off mid-write ends at its last whole record.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    if data[:4] != WANDB_HEADER:
        raise ConfigError(f"{run_file} is not a W&B run file (it does not start with {WANDB_HEADER!r})")
    pos, parts = WANDB_HEADER_SIZE, []
    while pos + RECORD_HEADER.size <= len(data):
        room = WANDB_BLOCK - pos % WANDB_BLOCK
        if room < RECORD_HEADER.size:
            pos += room
            continue
        _, length, kind = RECORD_HEADER.unpack_from(data, pos)
        pos += RECORD_HEADER.size
        if kind == 0 or pos + length > len(data):  # zero padding, or the end of a cut-off run
            break
        parts.append(data[pos : pos + length])
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _item_name(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_wandb_run(run_file: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """The config and the metric history of a W&B run file. Media (sample grids, tables) and W&B's own
    bookkeeping (`_runtime`, `_timestamp`, ...) are left out of the history."""
    config: dict[str, Any] = {}
    rows = []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):  # wandb.init(config=...) is in the run record, later updates in their own
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({_item_name(item): json.loads(item.value_json) for item in updates})
        elif kind == "history":
            row = {}
            for item in record.history.item:
                if len(item.nested_key) > 1:  # a media object's fields, e.g. ("val/samples", "width")
                    continue
                value = json.loads(item.value_json)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[_item_name(item)] = value
            row[STEP] = row.pop(WANDB_STEP, row.get("_step"))
            rows.append({name: value for name, value in row.items() if not name.startswith("_")})
    config.pop("_wandb", None)
    return config, _by_step(pd.DataFrame(rows))


def _by_step(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per step (loggers write a step's metrics in several rows), metric columns sorted."""
    if frame.empty or STEP not in frame:
        return pd.DataFrame(index=pd.Index([], name=STEP, dtype="int64"))
    frame = frame.dropna(subset=[STEP]).astype({STEP: "int64"})
    # Rows with no metric left (a step that logged only media) are dropped.
    return frame.groupby(STEP).last().dropna(how="all").sort_index(axis=1)


def _wandb_run_files(job: Path) -> list[Path]:
    """Every W&B run file of a job, oldest first (a resumed job has one per attempt)."""
    # Run folders are named [offline-]run-<date>_<time>-<id>.
    return sorted(job.glob("wandb/*run-*/run-*.wandb"), key=lambda path: path.parent.name.removeprefix("offline-"))


def load_run(folder: str | Path) -> SweepRun:
    """Read one run or sweep job folder (see `SweepRun`); CSV logs win when a job has both loggers."""
    job = Path(folder).expanduser()
    hydra_dir = job / ".hydra"
    if not (hydra_dir / "config.yaml").is_file():
        raise ConfigError(f"{job} is not a text2img run folder (no .hydra/config.yaml); pass a run or sweep job folder")
    overrides_file = hydra_dir / "overrides.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    hydra_file = hydra_dir / "hydra.yaml"
    choices = {}
    if hydra_file.is_file():
        runtime_choices = OmegaConf.load(hydra_file).hydra.runtime.choices
        # Config groups of the run's own config; Hydra's (hydra/launcher, ...) and packaged ones (x@y) left out.
        choices = {
            group: str(option) for group, option in runtime_choices.items() if "/" not in group and "@" not in group
        }
    config: dict[str, Any] | None = None
    history = _by_step(pd.DataFrame())
    source = "none"
    csv_file = job / "csv" / "metrics.csv"
    wandb_files = _wandb_run_files(job)
    if csv_file.is_file():
        history, source = _by_step(pd.read_csv(csv_file)), "csv"
        hparams = job / "csv" / "hparams.yaml"
        if hparams.is_file():
            config = OmegaConf.to_container(OmegaConf.load(hparams))
    elif wandb_files:
        configs, histories = zip(*(read_wandb_run(path) for path in wandb_files))
        config = {key: value for part in configs for key, value in part.items()}
        history = _by_step(pd.concat([frame.reset_index() for frame in histories], ignore_index=True))
        source = "wandb"
    if not config:
        config = OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"), resolve=False)
    grids = sorted(job.glob("samples/*_step*.png"))
    return SweepRun(job.name, job, overrides, choices, flatten(config), history, grids, source)


def load_sweep(folder: str | Path) -> list[SweepRun]:
    """Every job of a multirun folder, by job number."""
    sweep = Path(folder).expanduser()
    if not sweep.is_dir():
        raise ConfigError(f"sweep folder {sweep} does not exist; pass a folder under outputs/train/multiruns/")
    jobs = [path for path in sweep.iterdir() if (path / ".hydra" / "config.yaml").is_file()]
    if not jobs:
        raise ConfigError(
            f"{sweep} holds no sweep jobs (no <job>/.hydra/config.yaml); pass the folder `python -m text2img.train -m` "
            "wrote, e.g. outputs/train/multiruns/<date>_<time>"
        )
    jobs.sort(key=lambda path: (not path.name.isdigit(), int(path.name) if path.name.isdigit() else 0, path.name))
    return [load_run(job) for job in jobs]


def varying_config(runs: Sequence[SweepRun]) -> pd.DataFrame:
    """The config entries that differ between runs, one row per run (indexed by name).

    A config group whose option differs shows as one column (e.g. `generator`: diffusion / gan) instead of
    every entry under it; values that differ only by the run's own folder (its checkpoint folder, ...) count
    as the same.
    """
    rows = {run.name: {**run.choices, **run.config} for run in runs}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    # Paths inside a run's own folder (checkpoint dirs, ...) differ by run but are the same setting.
    own = {run.name: {str(run.folder.resolve()), str(run.config.get("paths.output_dir", run.folder))} for run in runs}

    def comparable(name: str, value: Any) -> str:
        text = json.dumps(value, sort_keys=True, default=str)
        for folder in own[name]:
            text = text.replace(folder, "<run>")
        return text

    texts = pd.DataFrame(
        [[comparable(name, value) for value in row] for name, row in frame.iterrows()],
        index=frame.index, columns=frame.columns,
    )
    varying = [column for column in frame.columns if texts[column].nunique() > 1]
    groups = [column for column in varying if all(column in run.choices for run in runs)]
    kept = [column for column in varying if not any(column.startswith(f"{group}.") for group in groups)]
    frame = frame[kept]
    frame.index.name = "job"
    return frame


def sweep_table(runs: Sequence[SweepRun], prefixes: Sequence[str] = ("val/", "test/")) -> pd.DataFrame:
    """What differs between the runs (`varying_config`) beside their final metrics (`SweepRun.final_metrics`)."""
    metrics = pd.DataFrame.from_dict({run.name: run.final_metrics(prefixes) for run in runs}, orient="index")
    return varying_config(runs).join(metrics)


def run_labels(runs: Sequence[SweepRun]) -> dict[str, str]:
    """A short label per run name: its varying config as `key=value` pairs ("job <name>" when nothing varies)."""
    varying = varying_config(runs)
    return {
        name: ", ".join(f"{column}={value}" for column, value in row.items()) or f"job {name}"
        for name, row in varying.iterrows()
    }
