"""experiments/bench/gpu_check.py without a GPU: it says so and exits 0 (the check itself runs on a lent GPU)."""

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
