"""Progress of long phases: periodic lines with rate and time left, a last line, a bar on a terminal, rank 0 only."""

import io
import logging
import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from text2img.callbacks import LoggedProgressBar, progress_bar
from text2img.encoders import EmbeddingCache, TinyEncoder
from text2img.encoders import cache as cache_module
from text2img.run.first_stage_run import run_relayed
from text2img.utils.progress import Progress

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "text2img.utils.progress"]


def captions_progress(clock: FakeClock, **options) -> Progress:
    options = {"interval": 10.0, "terminal": False, "rank": 0, **options}
    return Progress("encoding captions", 3553, "captions", clock=clock, **options)


def test_a_line_has_the_count_rate_and_time_left(clock, caplog):
    caplog.set_level(logging.INFO)
    progress = captions_progress(clock)
    clock.now += 123.9
    progress.advance(1536)
    assert progress_lines(caplog) == ["encoding captions: 1,536/3,553 (43%), 12.4 captions/s, 2:43 left"]
    clock.now += 128.1
    progress.advance(2017, detail="loss 0.5")
    progress.close()
    assert progress_lines(caplog)[-1] == "encoding captions done: 3,553 captions in 4:12 (14.1 captions/s); loss 0.5"


def test_lines_come_at_most_once_per_interval(clock, caplog):
    caplog.set_level(logging.INFO)
    with captions_progress(clock) as progress:
        for _ in range(25):  # one unit a second
            clock.now += 1
            progress.advance()
        assert [line.split(",")[0] for line in progress_lines(caplog)] == [
            "encoding captions: 10/3", "encoding captions: 20/3"
        ]


def test_a_short_phase_logs_only_its_last_line_and_a_failed_one_none(clock, caplog):
    caplog.set_level(logging.INFO)
    with Progress("rendering shapes", 96, "images", clock=clock, interval=10.0, terminal=False, rank=0) as progress:
        clock.now += 0.5
        progress.advance(96)
    assert progress_lines(caplog) == ["rendering shapes done: 96 images in 0.5 s (192.0 images/s)"]
    caplog.clear()
    with pytest.raises(RuntimeError), captions_progress(clock) as progress:
        progress.advance(10)
        raise RuntimeError("interrupted")
    assert progress_lines(caplog) == []


def test_a_resumed_phase_counts_only_its_own_units_in_the_rate(clock, caplog):
    caplog.set_level(logging.INFO)
    progress = Progress("training", 1000, "steps", done=500, clock=clock, interval=0.0, terminal=False, rank=0)
    clock.now += 100
    progress.advance(100)
    assert progress_lines(caplog) == ["training: 600/1,000 (60%), 1.0 steps/s, 6:40 left"]


def test_ranks_other_than_zero_are_silent(clock, caplog):
    caplog.set_level(logging.INFO)
    with captions_progress(clock, rank=1, interval=0.0, terminal=True) as progress:
        clock.now += 5
        progress.advance(100)
        assert progress._bar is None
    assert progress_lines(caplog) == []


@pytest.fixture
def file_and_terminal(tmp_path: Path):
    """The root logger writing to a file and to a terminal, as a Hydra run in a terminal does."""
    root = logging.getLogger()
    file = logging.FileHandler(tmp_path / "train.log")
    terminal = logging.StreamHandler(FakeTerminal())
    saved = root.handlers, root.level
    root.handlers, root.level = [file, terminal], logging.INFO
    yield tmp_path / "train.log", terminal.stream
    root.handlers, root.level = saved
    file.close()


def test_on_a_terminal_a_bar_replaces_the_periodic_lines_there_but_not_in_the_file(clock, file_and_terminal, capsys):
    log_file, terminal = file_and_terminal
    handlers = list(logging.getLogger().handlers)
    with captions_progress(clock, terminal=True, interval=2.5) as progress:
        clock.now += 1
        progress.advance(10)
        assert progress._bar is None  # not before BAR_DELAY: quick phases draw nothing
        clock.now += 2
        progress.advance(10)
        assert progress._bar is not None
        logging.getLogger("elsewhere").warning("a warning during the phase")
    assert logging.getLogger().handlers == handlers
    logged = log_file.read_text()
    assert "encoding captions: 20/3,553 (1%), 6.7 captions/s, 8:50 left" in logged
    assert "a warning during the phase" in logged
    # the terminal's handler wrote only the last line; the warning went above the bar (rich, on stderr)
    assert terminal.getvalue() == "encoding captions done: 20/3,553 captions in 3.0 s (6.7 captions/s)\n"
    assert "a warning during the phase" in capsys.readouterr().err


def test_without_a_terminal_the_console_gets_the_periodic_lines(clock, file_and_terminal):
    log_file, _ = file_and_terminal
    console = io.StringIO()
    logging.getLogger().addHandler(logging.StreamHandler(console))
    with captions_progress(clock, interval=0.0) as progress:
        clock.now += 3
        progress.advance(10)
    assert console.getvalue().splitlines()[0] == "encoding captions: 10/3,553 (0%), 3.3 captions/s, 17:43 left"
    assert "\r" not in console.getvalue() + log_file.read_text()


def test_filling_the_embedding_cache_reports_progress(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TEXT2IMG_PROGRESS_INTERVAL", "0")
    monkeypatch.setattr(cache_module, "ENCODE_CHUNK", 2)
    caplog.set_level(logging.INFO)
    captions = ["grinning face", "red apple", "man running facing right", "", "a much longer caption"]
    encoder = TinyEncoder(max_length=16)
    cached = EmbeddingCache(tmp_path).lookup(encoder, captions)
    lines = progress_lines(caplog)
    line = r"encoding captions with TinyEncoder: {}/5 \({}%\), [\d.,e-]+ captions/s, [\d.:]+ s? ?left"
    assert [bool(re.fullmatch(line.format(n, pct), text)) for n, pct, text in zip((2, 4), (40, 80), lines)] == [1, 1]
    assert re.fullmatch(r"encoding captions with TinyEncoder done: 5 captions in [\d.]+ s \(.* captions/s\)", lines[-1])
    # encoding in chunks changes no embedding
    direct = encoder.encode(captions)
    torch.testing.assert_close(cached.tokens, direct.tokens, atol=1e-5, rtol=1e-4)


def test_lightning_progress_without_a_terminal_is_log_lines(monkeypatch, caplog):
    assert isinstance(progress_bar(), LoggedProgressBar)  # pytest captures stdout: not a terminal
    monkeypatch.setenv("TEXT2IMG_PROGRESS_INTERVAL", "0")
    caplog.set_level(logging.INFO)
    trainer = L.Trainer(
        max_steps=3, limit_val_batches=2, val_check_interval=3, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_model_summary=False, callbacks=[LoggedProgressBar()],
    )
    trainer.fit(BoringModel())
    lines = progress_lines(caplog)
    assert re.fullmatch(r"training: 1/3 \(33%\), [\d.,e-]+ steps/s, [\d.:]+ s? ?left", lines[0])
    assert "validation: 2/2 (100%)" in "\n".join(lines)
    assert re.fullmatch(r"training done: 3 steps in [\d.]+ s \(.*\)", lines[-1])


def test_a_nested_run_is_relayed_line_by_line_with_its_levels(tmp_path, caplog):
    child = tmp_path / "child.py"
    child.write_text(
        "import sys\n"
        "print('[2026-01-01 10:00:00,000][text2img.utils.progress][INFO] - training: 1/2 (50%)')\n"
        "print('[2026-01-01 10:00:01,000][text2img.data][WARNING] - careful')\n"
        "sys.stderr.write('bar 10%\\rbar 100%\\n')\n"
        "sys.exit(3)\n"
    )
    caplog.set_level(logging.INFO, logger="text2img.run.first_stage_run")
    assert run_relayed([sys.executable, str(child)], prefix="first stage |") == 3
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "first stage | training: 1/2 (50%)"),
        ("WARNING", "first stage | careful"),
        ("INFO", "first stage | bar 100%"),
    ]
