"""Tracking: what an offline W&B run records (config, sample grid, prompt table, checkpoints), sweep jobs as
grouped and tagged runs, and the TensorBoard and CSV loggers."""

import glob
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict, read_write
from PIL import Image

from conftest import compose_train, smoke_overrides
from text2img.inspect.analysis import wandb_records
from text2img.lightning.tracking import (
    MAX_TAG_LENGTH,
    RunNaming,
    SampleGrid,
    finish_wandb_run,
    log_samples,
    sweep_run_naming,
    wandb_tag,
)
from text2img.train import train


@pytest.fixture(autouse=True)
def no_wandb_run_left(tmp_path, monkeypatch) -> Iterator[None]:
    """Each test starts without a W&B run (a WandbLogger would reuse one left by an earlier test) and ends its
    own; artifact staging copies go to tmp_path, not ~/.local/share/wandb."""
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    finish_wandb_run()
    yield
    finish_wandb_run()


def finished_run_records(save_dir: Path, timeout: float = 60) -> tuple[Path, list]:
    """The offline run folder under `save_dir` and its records, once complete: `wandb.finish()` returns before
    W&B's service has written them all."""
    (folder,) = (save_dir / "wandb").glob("offline-run-*")
    (run_file,) = folder.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(run_file))
        if any(record.HasField("exit") for record in records):
            return folder, records
        assert time.monotonic() < deadline, f"{run_file} has no exit record after {timeout} s"
        time.sleep(0.2)


def test_offline_wandb_run_holds_config_grid_table_and_checkpoints(tmp_path, imagefolder):
    cfg = compose_train(tmp_path, smoke_overrides(
        imagefolder, "logger=wandb", "logger.wandb.log_model=true", "trainer.max_steps=3", "test=false",
    ))
    train(cfg)
    finish_wandb_run()
    folder, records = finished_run_records(tmp_path)

    config = {item.key: json.loads(item.value_json)
              for r in records if r.HasField("config") for item in r.config.update}
    assert config["encoder"]["_target_"] == "text2img.encoders.TinyEncoder"  # nested, not flattened keys
    assert config["trainer"]["max_steps"] == 3

    # the captioned grid, and a table of the same 8 samples: step, key, prompt, image
    (grid_file,) = (folder / "files/media/images/val").glob("samples_*.png")
    history = {tuple(item.nested_key): json.loads(item.value_json) for r in records if r.HasField("history")
               for item in r.history.item}
    assert history["val/samples", "caption"] == "val step 3: 8 held-out prompts"
    assert history["val/samples", "path"] == f"media/images/val/{grid_file.name}"
    (table_file,) = (folder / "files/media/table/val").glob("samples_table_*.table.json")
    table = json.loads(table_file.read_text())
    metadata = (imagefolder / "metadata.jsonl").read_text().splitlines()
    prompts = {json.loads(line)["text"] for line in metadata}
    assert table["columns"] == ["step", "key", "prompt", "image"]
    assert len(table["data"]) == 8 and all(row[0] == 3 and row[2] in prompts for row in table["data"])
    # the table's images travel in its artifact, staged for `wandb sync`
    artifacts = [r.artifact for r in records if r.HasField("artifact")]
    (run_table,) = [a for a in artifacts if a.type == "run_table"]
    images = [entry for entry in run_table.manifest.contents if entry.path.startswith("media/images/")]
    assert len(images) == 8 and all(Path(entry.local_path).is_file() for entry in images)

    # checkpoints: the best and the newest; last.ckpt (a link to the newest) is not uploaded a second time
    models = {json.loads(a.metadata)["original_filename"]: a for a in artifacts if a.type == "model"}
    assert set(models) == {"best-step000003.ckpt", "step000003.ckpt"}
    assert set(models["best-step000003.ckpt"].aliases) == {"latest", "best"}
    assert set(models["step000003.ckpt"].aliases) == {"latest"}
    (content,) = models["step000003.ckpt"].manifest.contents
    assert Path(content.local_path).read_bytes() == (tmp_path / "checkpoints/step000003.ckpt").read_bytes()


def test_without_credentials_the_run_is_offline_and_the_notice_names_its_folder(tmp_path, monkeypatch, caplog):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    cfg = compose_train(tmp_path, ["logger=wandb"])
    with caplog.at_level("WARNING", logger="text2img.lightning.tracking"):
        logger = instantiate(cfg.logger.wandb)
    logger.experiment.log({"x": 1})
    (pattern,) = re.findall(r"`wandb sync (\S+)`", caplog.text)
    assert glob.glob(pattern) == [logger.log_dir] and logger.experiment.settings.mode == "offline"


def fake_multirun_job(sweep_dir: Path, num: int, overrides: list[str], exclude_keys: list[str] = ()) -> None:
    """Make HydraConfig describe job `num` of a multirun (compose_train set up a single run)."""
    cfg = HydraConfig.instance().cfg
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(sweep_dir)
        cfg.hydra.job.num = num
        cfg.hydra.overrides.task = overrides
        cfg.hydra.job.config.override_dirname.exclude_keys = list(exclude_keys)
        kept = [o for o in overrides if o.split("=")[0] not in exclude_keys]
        cfg.hydra.job.override_dirname = ",".join(kept)


def test_each_multirun_job_is_its_own_run_grouped_by_sweep_and_tagged(tmp_path):
    long_path = "data.source.path=/datasets/" + "x" * 80 + "/emoji_final"
    ids = []
    for num, fusion in enumerate(["perceiver", "token_projection"]):
        cfg = compose_train(tmp_path / str(num), ["logger=wandb"])
        fake_multirun_job(tmp_path / "multiruns/lr_ablation", num, [f"fusion={fusion}", long_path])
        run = instantiate(cfg.logger.wandb).experiment
        assert run.group == "lr_ablation"
        assert run.name == f"fusion={fusion},{long_path}"
        assert run.tags == (f"fusion={fusion}", wandb_tag(long_path))
        ids.append(run.id)
        finish_wandb_run()
    assert ids[0] != ids[1]
    # set on the command line, group and name win and tags are kept beside the overrides
    cfg = compose_train(tmp_path / "2", ["logger=wandb", "logger.wandb.group=mine", "logger.wandb.tags=[x]"])
    fake_multirun_job(tmp_path / "multiruns/lr_ablation", 2, ["fusion=film", "seed=3"], exclude_keys=["seed"])
    run = instantiate(cfg.logger.wandb).experiment
    assert (run.group, run.name, run.tags) == ("mine", "fusion=film", ("x", "fusion=film"))


def test_a_job_without_overrides_is_named_by_its_number(tmp_path):
    compose_train(tmp_path, ["logger=wandb"])
    fake_multirun_job(tmp_path / "multiruns/repeat", 4, [])
    assert sweep_run_naming() == RunNaming(group="repeat", name="job4", tags=[])


def test_a_single_run_is_neither_grouped_nor_named(tmp_path):
    compose_train(tmp_path, ["logger=wandb"])
    naming = sweep_run_naming()
    assert naming.group is None and naming.name is None and naming.tags == []


def test_long_overrides_become_tags_that_keep_the_value_end():
    assert wandb_tag("fusion=perceiver") == "fusion=perceiver"
    tag = wandb_tag("data.source.path=/datasets/" + "x" * 80 + "/emoji_final")
    assert len(tag) == MAX_TAG_LENGTH
    assert tag.startswith("data.source.path=…") and tag.endswith("/emoji_final")
    assert len(wandb_tag("k" * 100)) == MAX_TAG_LENGTH


def sample_grid() -> SampleGrid:
    images = torch.rand(2, 3, 8, 8)
    grid = Image.new("RGB", (40, 20), "white")
    return SampleGrid("val", 7, grid, images, ["a red square", "a blue circle"], [0, 1])


def test_tensorboard_gets_the_config_and_the_grid(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_train(tmp_path, ["logger=tensorboard"])
    logger = instantiate(cfg.logger.tensorboard)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    log_samples(logger, sample_grid())
    logger.finalize("success")
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events)).Reload()
    (image,) = accumulator.Images("val/samples")
    assert (image.step, image.width, image.height) == (7, 40, 20)


def test_csv_logger_takes_the_config_and_no_images(tmp_path):
    cfg = compose_train(tmp_path, ["logger=csv"])
    logger = instantiate(cfg.logger.csv)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    log_samples(logger, sample_grid())
    logger.log_metrics({"val/fid_effnet": 12.5}, step=7)
    logger.finalize("success")
    assert "val/fid_effnet" in (tmp_path / "csv/metrics.csv").read_text()
    assert OmegaConf.load(tmp_path / "csv/hparams.yaml").encoder._target_ == cfg.encoder._target_


def test_a_resumed_runs_csv_log_keeps_the_rows_before_the_interruption(tmp_path):
    import csv

    from text2img.lightning.tracking import ResumableCSVLogger

    for steps in (range(0, 4), range(3, 6)):  # interrupted after step 3, resumed from the checkpoint of step 2
        logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
        for step in steps:
            logger.log_metrics({"train/loss": float(step)}, step=step)
            if step == 2:  # a validation: columns the resumed run logs only later
                logger.log_metrics({"val/fid": 9.0}, step=step)
        logger.finalize("success")
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    logger.log_metrics({"test/fid": 7.0}, step=5)  # a column new to the file
    logger.finalize("success")
    with open(tmp_path / "csv" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows] == [0, 1, 2, 2, 3, 3, 4, 5, 5]
    assert [row["val/fid"] for row in rows if row["val/fid"]] == ["9.0"]
    assert rows[-1]["test/fid"] == "7.0" and rows[-2]["train/loss"] == "5.0"


def test_a_run_resumed_in_its_folder_continues_its_wandb_run(tmp_path):
    ids = []
    for _ in range(2):  # the first launch, then the one that resumes in the same folder
        cfg = compose_train(tmp_path / "run", ["logger=wandb"])
        ids.append(instantiate(cfg.logger.wandb).experiment.id)
        finish_wandb_run()
    cfg = compose_train(tmp_path / "other", ["logger=wandb"])
    other = instantiate(cfg.logger.wandb).experiment.id
    assert ids[0] == ids[1] != other
    # offline-run-<date>_<time>-<id>, with "-1" appended when both launches fall in the same second
    folders = [p.name for p in (tmp_path / "run" / "wandb").glob("offline-run-*")]
    assert len(folders) == 2 and all(f"-{ids[0]}" in name for name in folders), folders
