"""experiments/study.py, the runner of seeded studies, and the study files it runs."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "experiments"))
import study  # noqa: E402

STUDIES = sorted((REPO_ROOT / "experiments").glob("*/*_study.yaml"))


def test_there_are_study_files() -> None:
    assert len(STUDIES) >= 3


@pytest.mark.parametrize("path", STUDIES, ids=lambda path: path.stem)
def test_every_variant_of_every_study_composes(path: Path) -> None:
    spec = OmegaConf.load(path)
    assert spec.variants and spec.seeds and spec.out.startswith("outputs/")
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        for name, overrides in spec.variants.items():
            cfg = compose(config_name="train", overrides=[*spec.get("train", []), *overrides, "seed=1"])
            assert cfg.seed == 1, name


def run_study(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str) -> list[list[str]]:
    """Run the runner on a two-variant study in tmp_path; return the commands it would have run."""
    spec = tmp_path / "tiny_study.yaml"
    spec.write_text(
        f"out: {tmp_path / 'out'}\nresults: {tmp_path / 'results'}\nseeds: [0, 1]\ntrain: [experiment=openmoji_ldm]\n"
        "variants:\n  base: []\n  flow: [generator.objective=flow]\ncompare: [--n-samples, '10']\n"
    )
    commands: list[list[str]] = []

    def record(command: list[str], **kwargs) -> subprocess.CompletedProcess:
        commands.append(command)
        if command[-1].startswith("hydra.run.dir="):  # what a training run makes
            Path(command[-1].split("=", 1)[1]).mkdir(parents=True)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(study.subprocess, "run", record)
    monkeypatch.setattr(sys, "argv", ["study.py", str(spec), *args])
    study.main()
    return commands


def test_runs_seeds_outside_variants_inside_then_compares(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    *trains, compare = run_study(monkeypatch, tmp_path, "trainer.max_steps=3")
    runs = [command[command.index("seed=0") if "seed=0" in command else command.index("seed=1")] for command in trains]
    assert runs == ["seed=0", "seed=0", "seed=1", "seed=1"]
    assert trains[1][3:] == [
        "experiment=openmoji_ldm", "generator.objective=flow", "seed=0", "test=false", "logger=csv", "ckpt_path=last",
        "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'out' / 'runs' / 'flow-s0'}",
    ]
    assert all((tmp_path / "out" / "runs" / name / "done").exists() for name in ("base-s0", "flow-s0", "base-s1"))
    assert compare[1].endswith("compare.py")
    assert compare[2:6] == [
        f"{name}={tmp_path / 'out' / 'runs' / name / 'checkpoints' / 'last.ckpt'}"
        for name in ("base-s0", "flow-s0", "base-s1", "flow-s1")
    ]
    assert compare[6:] == ["--n-samples", "10", "--out", str(tmp_path / "results"), "--eval-dir", str(tmp_path / "out" / "eval")]


def test_finished_runs_are_not_retrained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run_study(monkeypatch, tmp_path)
    *trains, compare = run_study(monkeypatch, tmp_path, "--seeds", "0", "1", "2", "--variants", "flow")
    assert [command[-1] for command in trains] == [f"hydra.run.dir={tmp_path / 'out' / 'runs' / 'flow-s2'}"]
    assert len(compare) == 2 + 3 + 6  # the three flow seeds are compared, finished or not


def test_an_unknown_variant_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"no variant vae in .*tiny_study.yaml; it has base, flow$"):
        run_study(monkeypatch, tmp_path, "--variants", "vae")
