"""Hydra multiruns: DDP ranks inside their job's folder, re-runs that skip finished jobs, Optuna, SLURM presets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from conftest import CONF_DIR, REPO_ROOT, smoke_overrides
from text2img.errors import ConfigError
from text2img.run.sweeps import DDP_ENVIRONMENT, JobResult, SweepJob, finished_result, ranks_stay_in_job, write_result


def run_sweep(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "text2img.train", *args], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def logged_steps(job: Path) -> list[int]:
    """The steps of train/loss rows in a job's CSV log."""
    import csv

    with open(job / "csv" / "metrics.csv") as file:
        return [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")]


@pytest.mark.slow
def test_ddp_multirun_keeps_each_jobs_ranks_in_its_folder_and_a_rerun_skips_finished_jobs(tmp_path, imagefolder):
    sweep = tmp_path / "sweep"
    args = ["-m", *smoke_overrides(imagefolder), "trainer=ddp_cpu", "model.caption_dropout=0.1,0.2", "logger=csv",
            "test=false", f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep}"]
    run_sweep(*args)
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    assert not (tmp_path / "logs").exists()  # no rank started a run or a sweep of its own elsewhere
    for job, dropout in (("0", 0.1), ("1", 0.2)):
        folder = sweep / job
        assert (folder / "train_ddp_process_1.log").is_file()  # rank 1 ran in this job's folder
        assert not (folder / "0").exists()  # ... as a single run, not a sweep of its own
        assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
        assert logged_steps(folder) == sorted(set(logged_steps(folder)))  # each step trained once
        result = json.loads((folder / "result.json").read_text())
        assert f"model.caption_dropout={dropout}" in result["overrides"] and result["value"] > 0
    stamp = (sweep / "0" / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    (sweep / "1" / "result.json").unlink()  # as if job 1 had been killed after its last checkpoint

    rerun = run_sweep(*args)
    log = rerun.stderr + rerun.stdout
    assert "sweep job 0 already finished" in log
    assert (sweep / "0" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp
    assert f"sweep job 1 resumes from {sweep / '1' / 'checkpoints' / 'last.ckpt'}" in log
    assert (sweep / "1" / "result.json").is_file()


@pytest.mark.slow
def test_optuna_search_of_two_trials_with_ddp(tmp_path, imagefolder):
    sweep = tmp_path / "optuna"
    run_sweep(*smoke_overrides(imagefolder), "hparams_search=optuna", "hydra.sweeper.n_trials=2", "trainer=ddp_cpu",
              "logger=csv", "test=false", f"hydra.sweep.dir={sweep}")
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "optimization_results.yaml"]
    values = [json.loads((sweep / job / "result.json").read_text())["value"] for job in ("0", "1")]
    results = (sweep / "optimization_results.yaml").read_text()
    assert f"best_value: {min(values)}" in results
    trials = [json.loads((sweep / job / "result.json").read_text())["overrides"] for job in ("0", "1")]
    assert trials[0] != trials[1] and all(any(o.startswith("model.optimizer.lr=") for o in t) for t in trials)


def compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_search_presets_compose_with_experiments():
    cfg = compose_with_hydra(["experiment=openmoji_ldm", "hparams_search=optuna"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.generator._target_.endswith("LatentDiffusionGenerator")
    assert (cfg.optimized_metric, cfg.hydra.sweeper.direction, cfg.callbacks.best_checkpoint.mode) == (
        "val/fid_effnet", "minimize", "min")
    cfg = compose_with_hydra(["experiment=openmoji_gan", "hparams_search=optuna_alignment"])
    assert (cfg.optimized_metric, cfg.hydra.sweeper.direction, cfg.callbacks.best_checkpoint.mode) == (
        "val/r_precision", "maximize", "max")


def test_slurm_preset_takes_nodes_and_gpus_from_the_trainer():
    cfg = compose_with_hydra(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)


@pytest.fixture
def multirun_job(tmp_path):
    """A faked multirun job: Hydra's runtime config as a sweep's job 3 sees it."""
    cfg = compose_with_hydra(["fusion=perceiver", "seed=7"])
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.runtime.output_dir = str(tmp_path / "3")
        cfg.hydra.job.num = 3
    HydraConfig.instance().set_config(cfg)
    yield SweepJob.current()
    GlobalHydra.instance().clear()


def test_a_job_is_known_by_its_overrides(multirun_job, tmp_path):
    assert multirun_job == SweepJob(tmp_path / "3", ["fusion=perceiver", "seed=7"], 3)
    multirun_job.folder.mkdir()
    assert finished_result(multirun_job) is None
    write_result(multirun_job, JobResult(multirun_job.overrides, "val/fid_effnet", 12.5))
    assert finished_result(multirun_job).value == 12.5
    other = SweepJob(multirun_job.folder, ["fusion=film"], 3)
    with pytest.raises(ConfigError, match="holds a finished run of other overrides .*fusion=perceiver seed=7.*hydra.sweep.dir"):
        finished_result(other)


def test_ranks_stay_in_job_relaunches_the_job_alone_and_leaves_no_ddp_state(multirun_job, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "fusion=perceiver,film", "seed=7"])
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")  # set by a cluster: must survive
    for name in DDP_ENVIRONMENT[1:]:
        monkeypatch.delenv(name, raising=False)
    with ranks_stay_in_job(multirun_job):
        assert sys.argv == ["train.py", "fusion=perceiver", "seed=7", "hydra.mode=RUN"]
        assert HydraConfig.get().run.dir == str(multirun_job.folder)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="1234", LOCAL_RANK="0", WORLD_SIZE="2")  # as Lightning does
    assert sys.argv == ["train.py", "-m", "fusion=perceiver,film", "seed=7"]
    assert os.environ["MASTER_ADDR"] == "10.0.0.1"
    assert not any(name in os.environ for name in DDP_ENVIRONMENT[1:])


def test_single_runs_are_not_sweep_jobs():
    HydraConfig.instance().set_config(compose_with_hydra([]))
    assert SweepJob.current() is None
    GlobalHydra.instance().clear()
