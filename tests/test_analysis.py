"""Reading sweeps back (text2img.inspect.analysis): CSV and W&B logs give the same history, the table shows only what
differs between jobs, and bad folders get one-line errors."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from text2img.inspect.analysis import load_run, load_sweep, newest, run_labels, sweep_table, varying_config, wandb_records
from text2img.errors import ConfigError

# What Lightning's loggers write for two steps: the learning rate, the loss, and a validation at step 1.
CSV_METRICS = """epoch,lr-AdamW,step,train/loss,val/fid_effnet
,0.1,0,,
0,,0,1.0,
,0.2,1,,
0,,1,0.5,
0,,1,,9.0
"""
WANDB_LOGS = [
    {"lr-AdamW": 0.1, "trainer/global_step": 0},
    {"train/loss": 1.0, "epoch": 0, "trainer/global_step": 0},
    {"lr-AdamW": 0.2, "trainer/global_step": 1},
    {"train/loss": 0.5, "epoch": 0, "trainer/global_step": 1},
    {"val/fid_effnet": 9.0, "epoch": 0, "trainer/global_step": 1},
]
EXPECTED_HISTORY = pd.DataFrame(
    {"epoch": [0.0, 0.0], "lr-AdamW": [0.1, 0.2], "train/loss": [1.0, 0.5], "val/fid_effnet": [np.nan, 9.0]},
    index=pd.Index([0, 1], name="step"),
)


def run_config(job: Path, seed: int, generator: dict, logger: dict) -> dict:
    """A resolved run config as the loggers record it: paths inside the job folder differ by job."""
    return {
        "seed": seed,
        "trainer": {"max_steps": 6},
        "generator": generator,
        "logger": logger,
        "paths": {"output_dir": str(job)},
        "callbacks": {"last_checkpoint": {"dirpath": f"{job}/checkpoints"}},
    }


def write_hydra(job: Path, overrides: list[str], choices: dict[str, str]) -> None:
    (job / ".hydra").mkdir(parents=True)
    # Unresolved, as Hydra saves it: read only when no logger recorded the resolved config.
    (job / ".hydra" / "config.yaml").write_text("seed: 0\npaths:\n  output_dir: ${hydra:runtime.output_dir}\n")
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    all_choices = {**choices, "trainer": "cpu", "hydra/launcher": "basic", "generator_debug@generator": "x_smoke"}
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": all_choices}}}))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Job 0 logged to CSV (with sample grids), job 1 to a real offline W&B run; both logged the same metrics."""
    import wandb

    folder = tmp_path_factory.mktemp("sweep")
    csv_job, wandb_job = folder / "0", folder / "1"
    write_hydra(csv_job, ["seed=0", "generator=diffusion", "logger=csv"], {"generator": "diffusion", "logger": "csv"})
    (csv_job / "csv").mkdir()
    (csv_job / "csv" / "metrics.csv").write_text(CSV_METRICS)
    config = run_config(csv_job, 0, {"_target_": "Diffusion", "guidance_scale": 3.0}, {"csv": {"name": "csv"}})
    (csv_job / "csv" / "hparams.yaml").write_text(yaml.safe_dump(config))
    (csv_job / "samples").mkdir()
    for name in ("val_step000003.png", "val_step000006.png", "test_step000006.png"):
        Image.new("RGB", (4, 4)).save(csv_job / "samples" / name)

    write_hydra(wandb_job, ["seed=1", "generator=gan", "logger=wandb"], {"generator": "gan", "logger": "wandb"})
    # A config over one 32 KiB block: its record is split into parts, which the reader must join.
    generator = {"_target_": "GAN", "width": 8, "notes": "x" * 40_000}
    config = run_config(wandb_job, 1, generator, {"wandb": {"project": "text2img"}})
    run = wandb.init(mode="offline", dir=wandb_job, project="text2img", config=config)
    try:
        for step, row in enumerate(WANDB_LOGS):
            run.log(row)
            if step == 2:  # a grid: media, never a metric
                run.log({"val/samples": wandb.Image(np.zeros((4, 4, 3), np.uint8)), "trainer/global_step": 1})
    finally:
        run.finish()
    return folder


def test_csv_and_wandb_jobs_read_alike(sweep):
    runs = load_sweep(sweep)
    assert [(run.name, run.source) for run in runs] == [("0", "csv"), ("1", "wandb")]
    for run in runs:
        pd.testing.assert_frame_equal(run.history, EXPECTED_HISTORY, check_dtype=False)
        assert run.final_metrics() == {"val/fid_effnet": 9.0}
        assert run.final_metrics(("train/",)) == {"train/loss": 0.5}
    csv_run, wandb_run = runs
    assert csv_run.overrides == ["seed=0", "generator=diffusion", "logger=csv"]
    assert csv_run.choices == {"generator": "diffusion", "logger": "csv", "trainer": "cpu"}
    assert csv_run.config["generator.guidance_scale"] == 3.0
    assert wandb_run.config["generator.width"] == 8 and len(wandb_run.config["generator.notes"]) == 40_000
    assert [path.name for path in csv_run.grids] == ["test_step000006.png", "val_step000003.png", "val_step000006.png"]
    assert csv_run.last_grid("val").name == "val_step000006.png"
    assert csv_run.last_grid("test").name == "test_step000006.png"
    assert wandb_run.last_grid() is None


def test_table_shows_what_differs(sweep):
    runs = load_sweep(sweep)
    varying = varying_config(runs)
    # generator.* and logger.* collapse into their group's option; the job folders' paths are not differences.
    assert set(varying.columns) == {"seed", "generator", "logger"}
    table = sweep_table(runs)
    assert table.loc["1", "generator"] == "gan" and table.loc["0", "seed"] == 0
    assert table["val/fid_effnet"].tolist() == [9.0, 9.0]
    assert run_labels(runs)["1"] == "generator=gan, logger=wandb, seed=1"


def test_job_without_logs_falls_back_to_the_hydra_config(tmp_path):
    job = tmp_path / "run"
    write_hydra(job, [], {})
    run = load_run(job)
    assert run.source == "none" and run.history.empty and run.final_metrics() == {}
    assert run.config["paths.output_dir"] == "${hydra:runtime.output_dir}"


def test_a_cut_off_wandb_run_ends_at_its_last_whole_record(sweep, tmp_path):
    run_file = next(sweep.glob("1/wandb/offline-run-*/run-*.wandb"))
    whole = list(wandb_records(run_file))
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(run_file.read_bytes()[:-3])
    assert len(list(wandb_records(cut))) == len(whole) - 1
    cut.write_bytes(b"not a run")
    with pytest.raises(ConfigError, match="is not a W&B run file"):
        list(wandb_records(cut))


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing")
    with pytest.raises(ConfigError, match="holds no sweep jobs"):
        load_sweep(tmp_path)
    with pytest.raises(ConfigError, match="not a text2img run folder"):
        load_run(tmp_path)
    with pytest.raises(ConfigError, match="run a sweep first"):
        newest(f"{tmp_path}/multiruns/*", "run a sweep first")


def test_newest_is_the_latest_modified(tmp_path):
    for name, mtime in (("b", 100), ("a", 200)):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (mtime, mtime))
    assert newest(f"{tmp_path}/*", "") == tmp_path / "a"
