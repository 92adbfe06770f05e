"""Every command the README shows runs as written.

The fast test runs each README command through its real command line (argument checks, Hydra's parser,
sweeper, launcher, run and sweep folders) with the entry point's work replaced by a stub that resolves the job's
whole config: what fails before any work starts fails here. The slow test then runs the commands this machine
can run for real, with only size-shrinking overrides appended (never overrides that route around a problem,
such as `hydra.sweep.dir=` or `paths.*`).
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO_ROOT

ENTRY = re.compile(r"(?:^|\s)-m\s+text2img\.(train|sample|evaluate|export|demo)\b")


@dataclass(frozen=True)
class Command:
    """One documented command: its entry point and arguments, as a user would type them."""

    line: str
    entry: str
    args: tuple[str, ...]

    @property
    def multirun(self) -> bool:
        return "-m" in self.args or any(arg.startswith("hparams_search=") for arg in self.args)

    def has(self, fragment: str) -> bool:
        return any(fragment in arg for arg in self.args)


def _code_lines(markdown: str) -> list[str]:
    """Lines of the indented code blocks, with `\\` continuations joined."""
    lines, pending = [], ""
    for raw in markdown.splitlines():
        if not raw.startswith("    ") and not pending:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line)
    return lines


def _fill_placeholders(arg: str) -> str:
    arg = re.sub(r"<([^>]*)>", lambda match: re.sub(r"\W+", "_", match.group(1)).strip("_"), arg)
    return re.sub(r"\$\w+", "1", arg)


def readme_commands() -> list[Command]:
    """The `python -m text2img.<entry>` and `make train` commands of the README, comments dropped."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    default_experiment = re.search(r"^EXPERIMENT \?= *(\S*)", makefile, re.M).group(1)
    commands = []
    for line in _code_lines((REPO_ROOT / "README.md").read_text()):
        if line.split()[:2] == ["make", "train"]:
            commands.append(Command(line, "train", (f"experiment={default_experiment}",)))
        elif match := ENTRY.search(line):
            words = shlex.split(_fill_placeholders(line), comments=True)
            start = words.index(f"text2img.{match.group(1)}") + 1
            # "..." stands for arguments shown elsewhere (`data=webdataset ... trainer=ddp`); placeholders
            # (`<run>`, `$SLURM_JOB_ID`) get a value as a user would give them
            args = tuple(arg for arg in words[start:] if arg != "...")
            commands.append(Command(line, match.group(1), args))
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_commands_of_every_entry_point() -> None:
    assert {command.entry for command in COMMANDS} == {"train", "sample", "evaluate", "export", "demo"}
    assert sum(command.multirun for command in COMMANDS) >= 4  # sweeps, Optuna, SLURM, the notebook's sweep


# A model hub is out of reach here (and in tests, HF_HUB_OFFLINE=1): these commands must fail in one line.
# Commands that name what only their user has, a hub model or a local pipeline folder: the real command must stop at
# once, in one line that names it (the first marker a command has decides).
NEEDS_THE_HUB = {"Qwen/": "encoder.model", "pretrained=/models/": "the pretrained folder '/models/"}
# SLURM submits through `sbatch`, which does not exist here: check what the launcher resolves before submitting.
SUBMITS_TO_SLURM = "hydra/launcher=slurm"


def _run_cli(command: Command, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Run the command's real CLI in this process with a stub for the entry point's work; the resolved jobs."""
    from hydra.core.global_hydra import GlobalHydra

    module = importlib.import_module(f"text2img.{command.entry}")
    jobs: list[dict] = []

    def stub(cfg):  # the entry point's signature
        jobs.append(OmegaConf.to_container(cfg, resolve=True))
        return 0.0 if command.entry == "train" else None

    monkeypatch.setattr(module, command.entry, stub)
    # size-shrinking only: an Optuna search of 2 trials instead of 20 or 40
    shrink = ["hydra.sweeper.n_trials=2"] if command.has("hparams_search=") else []
    monkeypatch.setattr(sys, "argv", [f"text2img-{command.entry}", *command.args, *shrink])
    GlobalHydra.instance().clear()
    try:
        module.main()
    finally:
        GlobalHydra.instance().clear()
    return jobs


def _slurm_folders(command: Command) -> dict:
    """What Hydra's submitit launcher resolves in the launching process (no job exists yet): the sweep folder
    and the launcher's settings, for the first job of the sweep."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [arg for arg in command.args if arg != "-m"]
    first_job = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0][0]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=command.entry, overrides=first_job, return_hydra_config=True)
    GlobalHydra.instance().clear()
    return {"sweep_dir": cfg.hydra.sweep.dir, "launcher": OmegaConf.to_container(cfg.hydra.launcher, resolve=True)}


def _fast_or_slow(commands: list[Command]) -> list:
    """Each command as a test parameter. The fast suite keeps those that exercise Hydra's run, sweep and launcher
    machinery (sweeps, run folders) and the first of each entry point; the others (~1 s each) run with SLOW=1."""
    first_of_entry = {command.entry: command for command in reversed(commands)}
    params = []
    for command in commands:
        fast = command.multirun or command.has("hydra") or first_of_entry[command.entry] is command
        params.append(pytest.param(command, id=command.line, marks=() if fast else pytest.mark.slow))
    return params


@pytest.mark.parametrize("command", _fast_or_slow(COMMANDS))
def test_readme_command_runs_as_written(
    command: Command, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # runs and sweeps go to ./outputs, as for a user
    if command.has(SUBMITS_TO_SLURM):
        resolved = _slurm_folders(command)
        assert Path(resolved["sweep_dir"]).is_relative_to(tmp_path / "outputs" / "train" / "multiruns")
        assert resolved["launcher"]["nodes"] >= 1 and resolved["launcher"]["gpus_per_node"] >= 1
        return
    named = [says for marker, says in NEEDS_THE_HUB.items() if command.has(marker)]
    if named:  # the real command: it must stop at once, in one line
        result = subprocess.run([sys.executable, "-m", f"text2img.{command.entry}", *command.args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        last_line = result.stderr.strip().splitlines()[-1]
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert last_line.startswith("text2img: error:") and named[0] in last_line, last_line
        return
    jobs = _run_cli(command, monkeypatch)
    if command.has("--cfg"):
        assert "encoder:" in capsys.readouterr().out
        return
    assert jobs, "the entry point never ran"
    outputs = tmp_path / "outputs" / command.entry
    if command.multirun:
        expected = 2 if command.has("hparams_search=") else None
        assert expected is None or len(jobs) == expected
        sweeps = list((outputs / "multiruns").iterdir())
        summary = "optimization_results.yaml" if command.has("hparams_search=") else "multirun.yaml"
        assert len(sweeps) == 1 and (sweeps[0] / summary).is_file()
        assert sorted(path.name for path in sweeps[0].iterdir() if path.is_dir()) == [str(i) for i in range(len(jobs))]
    for job in jobs:
        assert Path(job["paths"]["output_dir"]).is_relative_to(tmp_path)
        assert Path(job["paths"]["cache_dir"]) == Path(os.environ.get("TEXT2IMG_CACHE", tmp_path / ".cache"))


# What the slow test runs for real: the commands this machine can run (CPU, no hub), shrunk.
# debug=smoke: the tiny encoder (unless the command picks one), a tiny generator, 6 steps with 2 validations (a sweep
# needs its validation figure), few samples.
SHRINK = ["debug=smoke", "logger=csv"]
# GPUs, the hub, data that is not here, SLURM, and a checkpoint of an earlier run (`<vae run>`)
CANNOT_RUN_HERE = ("trainer=gpu", "trainer=ddp ", "trainer=fsdp", "Qwen/", "/data/", SUBMITS_TO_SLURM, "<vae run>")


def _runnable_train_commands() -> list[Command]:
    runnable = []
    for command in COMMANDS:
        text = command.line + " "
        if command.entry == "train" and "--cfg" not in command.args and not any(x in text for x in CANNOT_RUN_HERE):
            runnable.append(command)
    return runnable


@pytest.mark.slow
@pytest.mark.parametrize("command", _runnable_train_commands(), ids=lambda command: command.line)
def test_readme_train_command_trains(command: Command, tmp_path: Path) -> None:
    """The documented command, run as a user would from a folder of their own, with size-shrinking overrides."""
    shrink = list(SHRINK)
    if command.has("hparams_search="):
        shrink.append("hydra.sweeper.n_trials=2")
    if (command.has("encoder.") or command.has("peft=")) and not command.has("encoder="):
        shrink.append("encoder=smollm2")  # debug=smoke swaps in the tiny encoder; these commands set the default's options
    env = {**os.environ, "TEXT2IMG_CACHE": str(REPO_ROOT / ".cache"), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "text2img.train", *command.args, *shrink], cwd=tmp_path, env=env,
        # generous: SmolLM2 encodes every OpenMoji caption for each encoder setting, ~2 min alone on an AVX2-only CPU
        capture_output=True, text=True, timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
