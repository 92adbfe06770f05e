"""Exact resume and no lost work: a run stopped at any step (an error, SIGKILL, SIGTERM) and restarted with
`ckpt_path=last` goes on as if it had never stopped; checkpoint files are whole or absent."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import REPO_ROOT, compose_train, smoke_overrides, write_imagefolder
from text2img.callbacks.last_checkpoint import SIGTERM_EXIT_CODE
from text2img.lightning.checkpoint_io import AtomicCheckpointIO
from text2img.train import train

STEPS = 8  # 4 training batches per epoch: checkpoints (every 2 steps) fall mid-epoch and at epoch ends


class Crash(Exception):
    """What `StopAt` raises by default: an error in the middle of training."""


class StopAt(L.Callback):
    """Stops the run once `step` steps are done, as the next batch is about to train: raises `Crash`, or with
    `signal_name`, sends that signal to its own process."""

    def __init__(self, step: int, signal_name: str | None = None) -> None:
        self.step = step
        self.signal = None if signal_name is None else signal.Signals[signal_name]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        if self.signal is None:
            raise Crash(f"stopped at step {self.step}")
        os.kill(os.getpid(), self.signal)


def run_overrides(imagefolder: Path, *extra: str) -> list[str]:
    # caption dropout on half the samples, so that a shifted random stream shows in the loss; EMA is on by default
    return smoke_overrides(imagefolder, "logger=csv", "test=false", f"trainer.max_steps={STEPS}",
                           "trainer.val_check_interval=2", "model.caption_dropout=0.5", *extra)


def stop_at(step: int, signal_name: str | None = None) -> list[str]:
    entry = ["+callbacks.stop._target_=test_resume.StopAt", f"+callbacks.stop.step={step}"]
    return entry + ([f"+callbacks.stop.signal_name={signal_name}"] if signal_name else [])


def loss_rows(run: Path) -> list[tuple[int, float]]:
    """(step, train/loss) rows of the run's CSV log in order; a resumed run appends its own after the earlier ones."""
    with open(run / "csv" / "metrics.csv") as file:
        return [(int(row["step"]), float(row["train/loss"])) for row in csv.DictReader(file) if row.get("train/loss")]


def losses(run: Path) -> dict[int, float]:
    """train/loss by step; a step logged again after a resume counts with its later value."""
    return dict(loss_rows(run))


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def assert_same_state(resumed: dict, reference: dict) -> None:
    """Exactly equal (CPU, same seed and thread count): EMA and raw weights, optimizer moments, LR schedule."""
    assert resumed["global_step"] == reference["global_step"] == STEPS
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]
    for key in ("state_dict", "current_model_state"):  # EMA weights; the raw ones
        assert resumed[key].keys() == reference[key].keys()
        for name, value in reference[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name}"
    ours, theirs = resumed["optimizer_states"][0]["state"], reference["optimizer_states"][0]["state"]
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[i][k], theirs[i][k]) for i in theirs for k in theirs[i])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run, in this process."""
    root = tmp_path_factory.mktemp("reference")
    data = write_imagefolder(root / "data")
    train(compose_train(root / "run", run_overrides(data)))
    return root / "run"


@pytest.mark.parametrize("stop", [7, 5], ids=["mid-epoch-checkpoint", "epoch-end-checkpoint"])
def test_a_crashed_run_resumes_exactly(tmp_path, imagefolder, reference, stop, monkeypatch):
    last = tmp_path / "checkpoints" / "last.ckpt"
    removed = []

    def remove_checkpoint(self, path):  # last.ckpt must lead to a whole checkpoint at every moment
        assert last.resolve() != Path(path).resolve() and last.resolve().is_file()
        removed.append(Path(path).name)
        os.remove(path)

    monkeypatch.setattr(AtomicCheckpointIO, "remove_checkpoint", remove_checkpoint)
    with pytest.raises(Crash):
        train(compose_train(tmp_path, run_overrides(imagefolder, *stop_at(stop))))
    assert checkpoint(tmp_path)["global_step"] == stop - 1
    assert "step000002.ckpt" in removed
    logged = len(loss_rows(tmp_path))
    train(compose_train(tmp_path, run_overrides(imagefolder, "ckpt_path=last")))
    assert loss_rows(tmp_path)[logged][0] == stop - 1  # the resumed run starts at the checkpoint's step...
    assert losses(tmp_path) == losses(reference)  # ...and every step's loss is the uninterrupted run's
    assert_same_state(checkpoint(tmp_path), checkpoint(reference))


def cli(run: Path, imagefolder: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m text2img.train` into the folder `run`, with this process's thread count (bitwise-equal sums)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO_ROOT / "tests")}
    return subprocess.run(
        [sys.executable, "-m", "text2img.train", *run_overrides(imagefolder, *extra), f"hydra.run.dir={run}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow  # two launches of the CLI: 18 s on an idle 2-core machine, more when busy
def test_a_killed_run_relaunched_with_the_same_command_resumes_exactly(tmp_path, imagefolder, reference):
    """A SLURM-style job script: the same command, `ckpt_path=last` in a fixed folder, starts fresh the first time
    and resumes after a SIGKILL."""
    run = tmp_path / "run"
    killed = cli(run, imagefolder, "ckpt_path=last", *stop_at(7, "SIGKILL"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert 'ckpt_path="last") is set, but there is no last checkpoint' in killed.stderr  # a fresh start
    assert checkpoint(run)["global_step"] == 6
    logged = len(loss_rows(run))
    resumed = cli(run, imagefolder, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = loss_rows(run)[logged:]
    assert after == [(step, loss) for step, loss in loss_rows(reference) if step >= 6]
    assert losses(run) == losses(reference)
    assert_same_state(checkpoint(run), checkpoint(reference))


@pytest.mark.slow  # a CLI process signalled mid-run, then resumed: ~18 s on an idle 2-core machine
def test_sigterm_saves_the_step_it_reached_and_exits_143(tmp_path, imagefolder, reference):
    # sent during step 7's batch, which has no validation (every 2 steps) and so no checkpoint of its own
    stopped = cli(tmp_path, imagefolder, *stop_at(6, "SIGTERM"))
    assert stopped.returncode == SIGTERM_EXIT_CODE == 143, stopped.stderr[-2000:]
    assert checkpoint(tmp_path)["global_step"] == 7
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("[ls]*")) == ["last.ckpt", "step000007.ckpt"]
    logged = len(loss_rows(tmp_path))
    train(compose_train(tmp_path, run_overrides(imagefolder, "ckpt_path=last")))
    assert loss_rows(tmp_path)[logged:] == [(STEPS - 1, losses(reference)[STEPS - 1])]
    assert losses(tmp_path) == losses(reference)
    assert_same_state(checkpoint(tmp_path), checkpoint(reference))


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)

    def broken_save(obj, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path) == {"global_step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left behind


KILLED_MID_SAVE = """
import os, signal, sys, torch
from text2img.lightning.checkpoint_io import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, sys.argv[1])
def killed_while_writing(obj, file):
    file.write(b"PK\\x03\\x04 half a checkpoint")
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = killed_while_writing
io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, sys.argv[1])
"""


@pytest.mark.slow  # a fresh interpreter killed mid-write: ~5 s
def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    out = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(path)], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 1 and torch.equal(loaded["w"], torch.ones(1000))
    (partial,) = [p for p in tmp_path.iterdir() if p != path]  # the half-written file is beside it, hidden
    assert partial.name.startswith(".last.ckpt.") and partial.name.endswith(".tmp")


def test_each_ddp_rank_draws_from_a_stream_of_its_own():
    """Ranks are seeded alike; without separate streams sample i of every rank would get the same noise."""
    from types import SimpleNamespace

    from text2img.callbacks import RNGState

    def first_draws(rank: int) -> torch.Tensor:
        torch.manual_seed(0)
        callback = RNGState()
        trainer = SimpleNamespace(global_rank=rank)
        callback.on_train_batch_start(trainer, None, None, 0)
        draws = torch.rand(4)
        callback.on_train_batch_start(trainer, None, None, 1)  # later steps leave the stream alone
        return torch.cat([draws, torch.rand(4)])

    torch.manual_seed(0)
    shared = torch.rand(8)
    assert torch.equal(first_draws(0), shared)  # rank 0 (and a single process) keeps the seeded stream
    assert not torch.equal(first_draws(1), shared) and not torch.equal(first_draws(1)[:4], first_draws(2)[:4])
    assert torch.equal(first_draws(1), first_draws(1))  # reproducible


def test_ema_refuses_fsdp_with_the_fix():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from text2img.callbacks import EMA
    from text2img.errors import ConfigError

    trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    with pytest.raises(ConfigError, match=r"~callbacks.ema"):
        EMA().setup(trainer, None, "fit")


def test_the_training_order_follows_the_runs_seed_not_a_ranks_reseeded_stream(monkeypatch):
    from text2img.lightning.datamodule import run_seed

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    torch.manual_seed(12345)  # as RNGState does on ranks > 0
    assert run_seed() == 7
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert run_seed() == 12345
