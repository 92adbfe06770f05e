"""`python -m text2img.evaluate` end to end on a tiny checkpoint: report, reproducibility, DDP, caches, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, compose_train, eval_batch, smoke_overrides, write_imagefolder

from text2img.run.command_line import unknown_choice
from text2img.evaluate import evaluate, format_table
from text2img.metrics import ReconstructionQuality
from text2img.train import train


# The alignment evaluator at test size: trained in a second on the 29 training pairs.
SMALL_LIT = ["metrics=[image,alignment]", "metrics.alignment.config.steps=40", "metrics.alignment.config.batch_size=16",
             "metrics.alignment.k=4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step smoke run's last checkpoint (tiny encoder and UNet on a 48-image folder)."""
    root = tmp_path_factory.mktemp("evaluate")
    data = write_imagefolder(root / "data")
    train(compose_train(root / "run", smoke_overrides(data, "logger=csv", "test=false")))
    return root / "run" / "checkpoints" / "last.ckpt"


def run_evaluate(tmp_path: Path, checkpoint: Path, *overrides: str) -> dict:
    """Evaluate in-process; FID/KID/IS only and caches under tmp_path unless the overrides say otherwise."""
    defaults = {"metrics": "metrics=[image]", "paths.cache_dir": f"paths.cache_dir={tmp_path / 'cache'}"}
    given = {override.split("=")[0] for override in overrides}
    extra = [value for key, value in defaults.items() if key not in given]
    cfg = compose_train(tmp_path, [f"ckpt={checkpoint}", f"out={tmp_path / 'report.json'}", *extra, *overrides], "eval")
    return evaluate(cfg)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "text2img.evaluate", *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=600
    )


def test_cli_prints_a_table_and_writes_json_next_to_the_run(checkpoint: Path, tmp_path: Path, entry_point) -> None:
    out = entry_point("evaluate", f"ckpt={checkpoint}", "n_samples=12", f"hydra.run.dir={tmp_path}", f"paths.cache_dir={tmp_path}",
              *SMALL_LIT)
    assert out.returncode == 0, out.stderr[-2000:]
    report_file = checkpoint.parents[1] / "eval" / "test-last-n12-seed1234-effnet_lite0.json"
    report = json.loads(report_file.read_text())
    assert report["n_samples"] == 12 and report["split"] == "test" and report["step"] == 6
    assert {"fid_effnet", "kid_effnet", "is_effnet", "clip_score_lit", "r_precision"} <= set(report["metrics"])
    assert format_table(report["metrics"]) in out.stdout


def test_a_fixed_seed_gives_the_same_figures_twice(checkpoint: Path, tmp_path: Path) -> None:
    first = run_evaluate(tmp_path, checkpoint, "n_samples=10")["metrics"]
    assert run_evaluate(tmp_path, checkpoint, "n_samples=10")["metrics"] == first
    assert run_evaluate(tmp_path, checkpoint, "n_samples=10", "seed=99")["metrics"] != first


def test_real_features_are_cached_per_split_and_reused(checkpoint: Path, tmp_path: Path) -> None:
    features = tmp_path / "cache" / "eval" / "features"
    run_evaluate(tmp_path, checkpoint, "n_samples=8")
    files = {path: path.stat().st_mtime_ns for path in features.glob("*.safetensors")}
    assert len(files) == 1
    run_evaluate(tmp_path, checkpoint, "n_samples=8")
    run_evaluate(tmp_path, checkpoint, "n_samples=8", "split=val")
    after = {path: path.stat().st_mtime_ns for path in features.glob("*.safetensors")}
    assert len(after) == 2 and all(after[path] == mtime for path, mtime in files.items())  # val added, test reused


def test_few_samples_warn_with_the_number_needed(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        run_evaluate(tmp_path, checkpoint, "n_samples=6")
    assert "fid_effnet from 6 generated images" in caplog.text and "use n_samples>=1281" in caplog.text


@pytest.mark.slow
def test_one_and_two_ddp_processes_give_the_same_figures(checkpoint: Path, tmp_path: Path) -> None:
    single = run_evaluate(tmp_path, checkpoint, "n_samples=25", *SMALL_LIT)["metrics"]
    out = cli(f"ckpt={checkpoint}", "n_samples=25", "trainer=ddp_cpu", f"out={tmp_path / 'ddp.json'}",
              f"hydra.run.dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", *SMALL_LIT)
    assert out.returncode == 0, out.stderr[-2000:]
    ddp = json.loads((tmp_path / "ddp.json").read_text())["metrics"]
    # 25 samples split 13 + 12 over the processes (no padding duplicates); FID, KID, IS and alignment
    assert set(ddp) == set(single) and "r_precision" in ddp
    assert ddp == pytest.approx(single, rel=1e-4)


def one_line(out) -> str:  # a subprocess.CompletedProcess or a CliResult
    assert out.returncode != 0
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("text2img: error: ")
    return message


def test_missing_checkpoint_is_one_line(tmp_path: Path, entry_point) -> None:
    message = one_line(entry_point("evaluate", f"ckpt={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path}"))
    assert f"ckpt='{tmp_path / 'nope.ckpt'}' does not exist; pass a .ckpt written by text2img.train" in message


@pytest.mark.parametrize("content", ["text", "torch"])
def test_a_file_that_is_not_a_text2img_checkpoint_is_one_line(tmp_path: Path, content: str) -> None:
    path = tmp_path / "other.ckpt"
    if content == "text":
        path.write_text("not a checkpoint")
    else:
        torch.save({"state_dict": {}}, path)  # a PyTorch file without the run config
    with pytest.raises(SystemExit) as exc:
        run_evaluate(tmp_path, path)
    message = str(exc.value.code)
    assert message.startswith(f"text2img: error: ckpt='{path}' is not a text2img checkpoint") and "\n" not in message


def test_unknown_extractor_is_one_line() -> None:
    assert unknown_choice(["ckpt=x", "extractor=clip"]) == (
        "text2img: error: unknown extractor 'clip'; choose one of: effnet_lite0, inception"
    )


def test_reconstruction_quality_is_per_image_psnr_and_ssim() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.rand(6, 3, 16, 16, generator=g)

    def scores(reconstructions: torch.Tensor | None) -> dict[str, float]:
        metric = ReconstructionQuality()
        metric.update(eval_batch(real, reconstructions=reconstructions))
        return {name: value.item() for name, value in metric.compute().items()}

    assert scores(None) == {}  # generators that do not reconstruct report nothing
    noisy = (real + 0.05 * torch.randn(real.shape, generator=g)).clamp(0, 1)
    worse = (real + 0.2 * torch.randn(real.shape, generator=g)).clamp(0, 1)
    good, bad = scores(noisy), scores(worse)
    assert good["psnr"] == pytest.approx(26.4, abs=0.5)  # 10 log10(1 / 0.05^2) = 26.0, a little more after clamping
    assert good["psnr"] > bad["psnr"] + 10 and 0 < bad["ssim"] < good["ssim"] < 1
    assert scores(real)["ssim"] == pytest.approx(1.0)



def test_the_fixed_yardstick_reads_its_own_text_model_and_matches_the_run_s_on_the_same_one(
    checkpoint: Path, tmp_path: Path
) -> None:
    fixed = [
        "metrics=[alignment,alignment_fixed]", "metrics.alignment_fixed.text_encoder._target_=text2img.encoders.TinyEncoder",
        "+metrics.alignment_fixed.text_encoder.max_length=64", "metrics.alignment_fixed.k=4",
        "metrics.alignment_fixed.config={_target_:text2img.networks.LiTConfig,steps:40,batch_size:16}",
    ]
    lit = [f"metrics.alignment.{key}" for key in ("config.steps=40", "config.batch_size=16", "k=4")]
    # The run's own encoder (the tiny one, seed 0) as the fixed text model: the same evaluator and figures.
    same = run_evaluate(tmp_path / "same", checkpoint, "n_samples=12", *lit, *fixed)["metrics"]
    for name in ("clip_score_lit", "r_precision"):
        for kind in ("", "_real", "_shuffled"):
            assert same[f"{name}_fixed{kind}"] == pytest.approx(same[f"{name}{kind}"])
    # Another text model: its own evaluator, other figures.
    other = run_evaluate(
        tmp_path / "other", checkpoint, "n_samples=12", *lit, *fixed, "+metrics.alignment_fixed.text_encoder.seed=1"
    )["metrics"]
    assert other["clip_score_lit_real"] == same["clip_score_lit_real"]
    assert other["clip_score_lit_fixed_real"] != pytest.approx(same["clip_score_lit_fixed_real"])
    assert len(list((tmp_path / "other" / "cache" / "eval" / "lit").glob("*/weights.safetensors"))) == 2


def test_alignment_reports_generated_real_and_shuffled_figures_and_caches_the_evaluator(
    checkpoint: Path, tmp_path: Path
) -> None:
    figures = run_evaluate(tmp_path, checkpoint, "n_samples=12", *SMALL_LIT)["metrics"]
    for name in ("clip_score_lit", "r_precision"):
        assert {name, f"{name}_real", f"{name}_shuffled"} <= set(figures)
    assert all(0 <= figures[name] <= 1 for name in ("r_precision", "r_precision_real", "r_precision_shuffled"))
    assert 0 <= figures["clip_score_lit"] <= 100
    (evaluator,) = (tmp_path / "cache" / "eval" / "lit").glob("*/weights.safetensors")
    trained_at = evaluator.stat().st_mtime_ns
    again = run_evaluate(tmp_path, checkpoint, "n_samples=12", *SMALL_LIT)["metrics"]
    assert again == figures and evaluator.stat().st_mtime_ns == trained_at  # loaded, not retrained
