"""Training end to end on a small image folder: fast_dev_run, products of a run, resume, DDP, bad input."""

import math
import subprocess
import sys

import lightning as L
import pytest
import torch

from conftest import REPO_ROOT, compose_train, smoke_overrides
from text2img.run.command_line import unknown_choice
from text2img.run.compose import build
from text2img.train import train


def test_fast_dev_run_with_tiny_encoder(tmp_path, imagefolder):
    cfg = compose_train(tmp_path, smoke_overrides(imagefolder, "trainer.fast_dev_run=true"))
    run = build(cfg)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step == 1
    assert math.isfinite(float(run.trainer.callback_metrics["train/loss"]))


class FirstStep(L.Callback):
    """Records the global step at which training (re)started."""

    def __init__(self):
        self.first = None

    def on_train_batch_start(self, trainer, *args):
        if self.first is None:
            self.first = trainer.global_step


def test_smoke_run_writes_checkpoint_grid_and_fid(tmp_path, imagefolder):
    cfg = compose_train(tmp_path, smoke_overrides(imagefolder, "logger=csv"))
    value = train(cfg)
    assert value is not None and math.isfinite(value) and value > 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    grids = sorted((tmp_path / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["test_step000006.png", "val_step000003.png", "val_step000006.png"]
    metrics = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "val/fid_effnet" in metrics and "test/fid_effnet" in metrics and "train/loss" in metrics
    # checkpoints load without executing pickled code and carry the resolved config
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["text2img_config"]["encoder"]["_target_"] == "text2img.encoders.TinyEncoder"
    assert ckpt["global_step"] == 6


def test_resume_continues_at_the_saved_step(tmp_path, imagefolder):
    # last.ckpt is written at each validation (every 3 steps in debug=smoke)
    first = compose_train(tmp_path / "a", smoke_overrides(imagefolder, "trainer.max_steps=3", "test=false"))
    train(first)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"] == 3

    resumed = compose_train(tmp_path / "b", smoke_overrides(imagefolder, "trainer.max_steps=6", "test=false",
                                                            f"ckpt_path={ckpt}"))
    run = build(resumed)
    probe = FirstStep()
    run.trainer.callbacks.append(probe)
    run.trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=str(ckpt))
    assert probe.first == 3
    assert run.trainer.global_step == 6


@pytest.mark.slow
def test_ddp_cpu_two_processes(tmp_path, imagefolder):
    out = subprocess.run(
        [sys.executable, "-m", "text2img.train", *smoke_overrides(imagefolder), "trainer=ddp_cpu", "logger=csv",
         f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "distributed_backend=gloo" in out.stderr + out.stdout
    assert "All distributed processes registered" in out.stderr + out.stdout
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    # rank 1 was relaunched into the same run folder: no second folder appeared
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "eval-cache", "run"]


def test_unknown_option_names_the_choices(entry_point):
    out = entry_point("train", "encoder=gpt9")
    assert out.returncode != 0
    assert out.stderr.strip() == "text2img: error: unknown encoder 'gpt9'; choose one of: hf, minilm, smollm2, tiny"


def test_unknown_option_in_a_sweep_or_list_is_found():
    assert unknown_choice(["-m", "fusion=token_projection,perceivr"]) == (
        "text2img: error: unknown fusion 'perceivr'; choose one of: deep, film, perceiver, pooled_mlp, refiner, "
        "timestep_aware, token_projection"
    )
    assert "unknown metrics 'fidd'" in unknown_choice(["metrics=[image,fidd]"])
    assert unknown_choice(["encoder=minilm", "trainer.max_steps=5", "+experiment=openmoji_gpu", "debug=null"]) is None


def test_an_option_from_a_search_path_folder_is_known(tmp_path):
    """A study adds its own presets with hydra.searchpath (experiments/llm_study: experiment=llm_study_model); the
    check counts that folder's options, in either order of the arguments, and still names a typo with them."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "my_study.yaml").write_text("# @package _global_\n")
    path = f"hydra.searchpath=[file://{tmp_path}]"
    assert unknown_choice(["experiment=my_study"]) is not None
    assert unknown_choice(["experiment=my_study", path]) is None
    assert unknown_choice([path, "-m", "experiment=my_study,openmoji_ldm"]) is None
    error = unknown_choice([path, "experiment=my_studdy"])
    assert error.startswith("text2img: error: unknown experiment 'my_studdy'; choose one of:") and "my_study" in error


def one_line_error(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value.code)
    assert message.startswith("text2img: error: ") and "\n" not in message, message
    return message


def test_fusion_generator_size_mismatch(tmp_path, imagefolder):
    cfg = compose_train(tmp_path, smoke_overrides(imagefolder, "fusion.out_dim=48"))
    with pytest.raises(SystemExit) as exc:
        train(cfg)
    message = one_line_error(exc)
    assert "fusion=token_projection" in message or "TokenProjection" in message
    assert "48" in message and "32" in message


def test_missing_dataset_path(tmp_path, imagefolder):
    cfg = compose_train(tmp_path, smoke_overrides(tmp_path / "nowhere"))
    with pytest.raises(SystemExit) as exc:
        train(cfg)
    assert "does not exist" in one_line_error(exc)


@pytest.mark.parametrize(
    "line, expected",
    [("{not json", "line 49: invalid JSON"), ('{"text": "a cat"}', "line 49: no string 'file_name'"),
     ('{"file_name": "000.png"}', "line 49: no string 'text'")],
)
def test_bad_metadata(tmp_path, imagefolder, line, expected):
    metadata = imagefolder / "metadata.jsonl"
    metadata.write_text(metadata.read_text() + line + "\n")
    cfg = compose_train(tmp_path, smoke_overrides(imagefolder, "data.source.strict=true"))
    with pytest.raises(SystemExit) as exc:
        train(cfg)
    assert expected in one_line_error(exc)


def test_bad_input_from_the_command_line_is_one_line(tmp_path, imagefolder, entry_point):
    out = entry_point("train", *smoke_overrides(tmp_path / "nowhere"), f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("text2img: error")]
    assert len(errors) == 1 and "does not exist" in errors[0]
    assert "Traceback" not in out.stderr
