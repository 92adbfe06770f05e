"""notebooks/*.ipynb run top to bottom on a tiny sweep the test trains (one job logging to CSV, one to W&B),
and are committed with their outputs stripped."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from conftest import REPO_ROOT, smoke_overrides, write_imagefolder
from text2img.inspect.analysis import load_sweep

NOTEBOOKS = REPO_ROOT / "notebooks"
NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("*.ipynb"))
KERNEL = "text2img-test"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Two seconds-long jobs that differ only in their logger: `logger=csv` and `logger=wandb`."""
    root = tmp_path_factory.mktemp("notebooks")
    folder = root / "sweep"
    overrides = smoke_overrides(write_imagefolder(root / "data"), "test=false", f"hydra.sweep.dir={folder}")
    done = subprocess.run(
        [sys.executable, "-m", "text2img.train", "-m", *overrides, "logger=csv,wandb"],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )
    if done.returncode:
        pytest.fail(f"the sweep failed:\n{done.stderr[-3000:]}")
    return folder


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> str:
    """A kernelspec running this interpreter (a user-level "python3" spec could point at another Python)."""
    spec_dir = tmp_path_factory.mktemp("jupyter") / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(spec_dir.parents[1]))  # searched before the user's and system's specs
        yield KERNEL


def execute(name: str, kernel: str) -> nbformat.NotebookNode:
    """Run a notebook in notebooks/ (its working directory) and return it with its outputs; a cell error fails."""
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        notebook, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    return notebook


def outputs(notebook: nbformat.NotebookNode, mime: str) -> list[str]:
    """Every output of a kind ("text/plain", "image/png", or "stream" for printed text)."""
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if mime == "stream" and output.output_type == "stream":
                found.append(output.text)
            elif mime in output.get("data", {}):
                found.append(output.data[mime])
    return found


@pytest.mark.slow  # ~45 s on an idle 2-core machine: a two-job sweep, then two kernels
def test_notebooks_run_on_a_tiny_sweep(sweep, kernel, monkeypatch):
    runs = load_sweep(sweep)
    assert [run.source for run in runs] == ["csv", "wandb"]
    # Both readers give the same steps and metrics, and the jobs differ by their logger alone, so the same
    # training: the first job also filled the evaluation's caches, which must not move the random stream.
    pd.testing.assert_index_equal(runs[0].history.index, runs[1].history.index)
    pd.testing.assert_index_equal(runs[0].history.columns, runs[1].history.columns)
    pd.testing.assert_series_equal(runs[0].history["train/loss"], runs[1].history["train/loss"])
    assert set(runs[1].final_metrics()) == {"val/fid_effnet", "val/kid_effnet", "val/is_effnet"}

    monkeypatch.setenv("TEXT2IMG_SWEEP", str(sweep))
    analysis = execute("analysis.ipynb", kernel)
    printed = "".join(outputs(analysis, "stream"))
    assert "job 0 (csv)" in printed and "job 1 (wandb)" in printed
    table = next(text for text in outputs(analysis, "text/plain") if "val/fid_effnet" in text)
    assert "logger" in table and "csv" in table and "wandb" in table
    assert len(outputs(analysis, "image/png")) == 2  # the curves and the grids

    monkeypatch.setenv("TEXT2IMG_CKPT", str(sweep / "0" / "checkpoints" / "last.ckpt"))
    monkeypatch.setenv("TEXT2IMG_PROMPTS", "a red square|a blue circle")
    explore = execute("explore.ipynb", kernel)
    assert "last.ckpt: step 6" in "".join(outputs(explore, "stream"))
    assert len(outputs(explore, "image/png")) == 3  # the images, then one token-map figure per prompt


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=[path.name for path in NOTEBOOK_FILES])
def test_notebooks_are_committed_stripped(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, f"{path.name} has no code"
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), (
        f"{path.name} is committed with outputs; clear them (Jupyter: Edit > Clear Outputs of All Cells)"
    )


def test_both_notebooks_exist():
    assert {path.name for path in NOTEBOOK_FILES} >= {"analysis.ipynb", "explore.ipynb"}
