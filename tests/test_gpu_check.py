"""experiments/bench/gpu_check.py without a GPU: it says so and exits 0 (the check itself runs on a lent GPU)."""

import functools
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run")
def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "experiments" / "bench" / "gpu_check.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("no GPU: ") and "nothing was run" in out.stdout
    assert not any(tmp_path.iterdir())


def test_the_dit_rows_run_at_cpu_size(tmp_path, one_torch_thread, monkeypatch):
    """Issue 17's rows (the DiT with rectified flow against a plain loop, in a first stage's latents, and the
    real-corpus preset experiment=webdataset_dit_gpu on img2dataset shards) through the code a GPU runs, at CPU
    size with trainer=cpu, as `--cpu` runs them (the throughput row with one repeat and one warm-up step)."""
    sys.path.insert(0, str(REPO_ROOT / "experiments" / "bench"))
    import gpu_check

    shrunk = functools.partial(gpu_check.row_throughput, warmup=1, repeats=1)
    monkeypatch.setattr(gpu_check, "row_throughput", shrunk)
    rows: list[dict] = []
    gpu_check.dit_rows(rows, tmp_path, gpu_check.image_folder(tmp_path), "cpu", steps=2, cpu=True)
    assert [row["ok"] for row in rows] == [True] * 3, [row["result"] for row in rows]
    throughput, latent, preset = rows
    assert "generator=dit generator.objective=flow" in throughput["what"] and throughput["ratio"] > 0
    assert "generator/denoiser=dit" in latent["what"] and "6/6 steps" in latent["result"]
    assert preset["what"].startswith("experiment=webdataset_dit_gpu") and preset["images_per_s"] > 0
    assert len(list((tmp_path / "shards").glob("train-*.tar"))) == 12
