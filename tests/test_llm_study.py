"""experiments/llm_study: its cells compose one factor away from their baseline, a multirun keeps each finished job
as one JSON file (and commits it alone), and the notebook tabulates the results with intervals and tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO_ROOT, compose_train, smoke_overrides, write_imagefolder
from omegaconf import OmegaConf
from test_notebooks import execute, kernel, outputs  # noqa: F401 (kernel: a fixture)

from text2img.inspect.analysis import flatten
from text2img.inspect.study import StudyResults, holm_significant, load_results, study_table

STUDY = REPO_ROOT / "experiments" / "llm_study"
SEARCH_PATH = f"hydra.searchpath=[file://{STUDY / 'conf'}]"
CELLS = sorted(path.stem for path in (STUDY / "conf" / "cell").glob("*.yaml"))
# What each cell may change besides its own name: its one factor.
FACTOR_KEYS = {
    "encoder": ("encoder.", "fusion.in_dim", "fusion.layer_width", "model.text_dim"),
    "layers": ("encoder.", "fusion.", "model.text_dim", "generator.denoiser."),
    "connector": ("fusion.",),
}


def study_config(tmp_path: Path, cell: str, *extra: str) -> dict:
    cfg = compose_train(tmp_path, ["experiment=llm_study_model", SEARCH_PATH, "+llm_study=shapes", f"+cell={cell}", *extra])
    return flatten(OmegaConf.to_container(cfg, resolve=False))


def test_the_study_model_stays_the_one_its_results_came_from(tmp_path: Path) -> None:
    """The committed results came from make train's model of 2026-12-07, pinned by the study's own preset (not make
    train's, which moved on): openmoji_ldm's UNet and v-prediction on the linear 8-component patch code, 400 steps."""
    ldm = compose_train(tmp_path, ["experiment=openmoji_ldm"])
    study = compose_train(tmp_path, ["experiment=llm_study_model", SEARCH_PATH])
    assert (study.trainer.max_steps, study.trainer.val_check_interval) == (400, 400)
    first_stage = study.generator.first_stage
    assert first_stage._target_.endswith("patch_pca_first_stage")
    assert (first_stage.latent_channels, first_stage.refiner_width) == (8, 0)
    assert list(study.generator.denoiser.unet.block_out_channels) == [64, 128, 128]
    assert (study.generator.objective, study.generator.sample_steps, study.generator.guidance_scale) == ("v_prediction", 12, 7.0)
    for cfg in (ldm, study):
        del cfg.generator.first_stage, cfg.trainer.max_steps, cfg.trainer.val_check_interval
    for part in ("encoder", "fusion", "model", "generator", "trainer", "data"):
        assert study[part] == ldm[part], part


@pytest.mark.parametrize("cell", CELLS)
def test_each_cell_is_one_factor_away_from_its_baseline(cell: str, tmp_path: Path) -> None:
    config = study_config(tmp_path, cell)
    baseline = study_config(tmp_path, config["llm_study.baseline"])
    changed = {key for key in config.keys() | baseline.keys() if config.get(key) != baseline.get(key)}
    changed -= {"llm_study.factor", "llm_study.baseline"}
    if cell == config["llm_study.baseline"]:
        assert not changed
        return
    allowed = FACTOR_KEYS[config["llm_study.factor"]]
    assert changed and all(key.startswith(allowed) for key in changed), sorted(changed)
    assert config["data._target_"] == "text2img.lightning.Text2ImgDataModule" and "Shapes" in config["data.source._target_"]


def test_make_llm_study_runs_every_cell() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    (line,) = [line for line in makefile.splitlines() if line.startswith("STUDY_CELLS ?= ")]
    assert sorted(line.removeprefix("STUDY_CELLS ?= ").split(",")) == CELLS


def test_the_table_marks_only_differences_that_survive_holm(tmp_path: Path) -> None:
    for cell, values in {"default": [0.10, 0.20, 0.30], "better": [0.80, 0.85, 0.90], "noisy": [0.0, 0.5, 0.4]}.items():
        for seed, value in enumerate(values):
            path = tmp_path / "shapes" / f"{cell}-s{seed}.json"
            path.parent.mkdir(exist_ok=True)
            study = {"factor": "baseline" if cell == "default" else "connector", "baseline": "default"}
            path.write_text(json.dumps({"cell": cell, "seed": seed, "figures": {"attr_overall": value}, "study": study}))
    results = load_results(tmp_path)
    table = study_table(results, "shapes", ["attr_overall"])
    assert table.loc["default", "attr_overall"] == "0.200 ± 0.248"  # t(2) interval of 0.1, 0.2, 0.3
    assert table.loc["better", "attr_overall Δ"].startswith("+0.65 (p=") and table.loc["better", "attr_overall Δ"].endswith(" *")
    assert not table.loc["noisy", "attr_overall Δ"].endswith("*")
    # Holm: the smallest p against alpha / m, the next against alpha / (m - 1), ... stopping at the first above
    assert holm_significant([("a", "x", 0.01), ("b", "x", 0.03)]) == [("a", "x"), ("b", "x")]
    assert holm_significant([("a", "x", 0.01), ("b", "x", 0.06)]) == [("a", "x")]
    assert holm_significant([("a", "x", 0.03), ("b", "x", 0.04)]) == []  # 0.03 > 0.05 / 2


def test_a_result_is_committed_alone(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "config", "user.email", "t@example.com"], check=True)
    subprocess.run([*git, "config", "user.name", "t"], check=True)
    (repo / "work.py").write_text("unfinished\n")
    subprocess.run([*git, "add", "work.py"], check=True)  # someone's staged change
    result = repo / "results" / "default-s0.json"
    result.parent.mkdir()
    result.write_text("{}\n")
    StudyResults._commit(result, "llm_study: shapes default seed 0")
    committed = subprocess.run([*git, "show", "--name-only", "--format=%s", "HEAD"], capture_output=True, text=True, check=False)
    assert committed.stdout.split() == ["llm_study:", "shapes", "default", "seed", "0", "results/default-s0.json"]
    staged = subprocess.run([*git, "diff", "--cached", "--name-only"], capture_output=True, text=True, check=False).stdout.split()
    assert staged == ["work.py"]


@pytest.mark.slow  # ~1 min: four smoke jobs, their re-run, and the notebook
def test_a_small_study_runs_resumes_and_is_tabulated(tmp_path: Path, kernel: str, monkeypatch) -> None:  # noqa: F811
    results = tmp_path / "results"
    command = [
        sys.executable, "-m", "text2img.train", "-m", SEARCH_PATH, "+llm_study=shapes", "seed=0,1", "+cell=default,refiner",
        *smoke_overrides(write_imagefolder(tmp_path / "data"), "callbacks.sample_grid=null"), "metrics=[image]",
        "trainer.max_steps=6", "trainer.val_check_interval=3",  # the study's 1,000 steps come after debug=smoke's
        f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.callbacks.study_results.folder={results / 'shapes'}",
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(path.name for path in (results / "shapes").glob("*.json"))
    assert files == ["default-s0.json", "default-s1.json", "refiner-s0.json", "refiner-s1.json"]
    record = json.loads((results / "shapes" / "refiner-s1.json").read_text())
    assert record["seed"] == 1 and record["study"]["factor"] == "connector" and "fid_effnet" in record["figures"]
    # each job's folder is its cell and seed; seeds outside, cells inside: a study cut short has every cell at
    # its first seeds
    folders = [Path(json.loads(path.read_text())["folder"]) for path in sorted((results / "shapes").glob("*.json"))]
    assert [folder.name for folder in folders] == ["default-s0", "default-s1", "refiner-s0", "refiner-s1"]
    launched = sorted(folders, key=lambda folder: OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra.job.num)
    assert [folder.name for folder in launched] == ["default-s0", "refiner-s0", "default-s1", "refiner-s1"]
    # a re-run with another seed and fewer cells trains only the new job: each finished one is skipped
    checkpoints = {path: path.stat().st_mtime_ns for path in (tmp_path / "sweep").glob("*/checkpoints/last.ckpt")}
    more = [arg.replace("seed=0,1", "seed=1,2").replace("+cell=default,refiner", "+cell=refiner") for arg in command]
    again = subprocess.run(more, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {path: path.stat().st_mtime_ns for path in checkpoints} == checkpoints
    assert (results / "shapes" / "refiner-s2.json").is_file() and len(list((results / "shapes").glob("*.json"))) == 5
    monkeypatch.setenv("TEXT2IMG_STUDY_RESULTS", str(results))
    notebook = execute("llm_study.ipynb", kernel)
    table = next(text for text in outputs(notebook, "text/plain") if "fid_effnet" in text)
    assert "refiner" in table and "default" in table and "±" in table
    assert len(outputs(notebook, "image/png")) == 1
    pd.testing.assert_series_equal(load_results(results).seed, pd.Series([0, 1, 0, 1, 2], name="seed"))
