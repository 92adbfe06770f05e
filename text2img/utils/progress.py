"""Progress of long phases (encoding captions, extracting features, rendering, training an evaluator...).

One `Progress` per phase. It writes a log line at most every `TEXT2IMG_PROGRESS_INTERVAL` seconds (default 10)
with the count, rate and time left, e.g.

    encoding captions: 1,536/3,553 (43%), 12.4 captions/s, 2:43 left

and one line at the end (`encoding captions done: 3,553 captions in 4:12 (14.1 captions/s)`); a phase shorter than
the interval logs only that last line. The lines go through `logging`, so a Hydra run's console and its log file
(`train.log`) both get them. On a terminal (stdout and stderr both TTYs) a live bar shows the same status instead of
the periodic lines on the console, while the log file still gets them. Only rank 0 reports under DDP.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from types import TracebackType

from lightning.fabric.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

log = logging.getLogger(__name__)

INTERVAL_ENV = "TEXT2IMG_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0
# A phase shows its bar only once it has run this long: quick ones leave nothing on the terminal but their last line.
BAR_DELAY = 2.0
# Set on periodic records: a terminal showing the bar drops them (the bar says the same), files and pipes keep them.
PERIODIC = "text2img_progress_periodic"


def report_interval() -> float:
    """Seconds between periodic lines: `TEXT2IMG_PROGRESS_INTERVAL`, else 10."""
    return float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))


def terminal_shows_bars() -> bool:
    """Whether live bars are drawn: only when both streams are a terminal. With `| tee` (stdout a pipe, stderr the
    terminal) the log lines reach the terminal through tee, which would tear a bar drawn beside them."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def duration(seconds: float) -> str:
    """`7.3 s` under a minute, else `4:12` or `1:02:03`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def rate_text(per_second: float, unit: str) -> str:
    return f"{per_second:,.1f} {unit}/s" if per_second >= 1 else f"{per_second:.2g} {unit}/s"


class Progress:
    """The progress of one phase of `total` units (None when unknown): `advance` after each piece of work; use as a
    context manager (or call `close`) so that the final line is written and the bar removed.

    `done`: units already done before this process started (a resumed training), not counted in the rate.
    `interval`, `terminal`, `rank` and `clock` default to the environment's (`report_interval`,
    `terminal_shows_bars`, Lightning's rank, `time.monotonic`); tests set them.
    """

    def __init__(
        self,
        what: str,
        total: int | None,
        unit: str,
        *,
        done: int = 0,
        interval: float | None = None,
        terminal: bool | None = None,
        rank: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.total = total
        self.unit = unit
        self.done = self.initial = done
        self.interval = report_interval() if interval is None else interval
        self.terminal = terminal_shows_bars() if terminal is None else terminal
        self.quiet = (rank_zero_only.rank if rank is None else rank) != 0
        self.clock = clock
        self.start = self.last_line = clock()
        self.detail: str | Callable[[], str] = ""
        self._bar: RichProgress | None = None
        self._restore_handlers: Callable[[], None] | None = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close(finished=kind is None)

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    @property
    def rate(self) -> float:
        """Units per second since this process started the phase."""
        return (self.done - self.initial) / max(self.elapsed, 1e-9)

    def status(self) -> str:
        """`1,536/3,553 (43%), 12.4 captions/s, 2:43 left[, detail]`."""
        parts = [f"{self.done:,}" if self.total is None else f"{self.done:,}/{self.total:,}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(rate_text(self.rate, self.unit))
        if self.total is not None and self.rate > 0:
            parts.append(f"{duration(max(self.total - self.done, 0) / self.rate)} left")
        if detail := self.detail_text():
            parts.append(detail)
        return ", ".join(parts)

    def detail_text(self) -> str:
        return self.detail() if callable(self.detail) else self.detail

    def advance(self, count: int = 1, detail: str | Callable[[], str] | None = None) -> None:
        """`count` more units done; `detail` (e.g. the current loss) is shown after the time left. A callable is
        called only when a line or the bar shows it: reading a value off a GPU every step would stall it."""
        self.done += count
        if detail is not None:
            self.detail = detail
        if self.quiet:
            return
        now = self.clock()
        if self.terminal and self._bar is None and now - self.start >= BAR_DELAY:
            self._show_bar()
        if self._bar is not None:
            self._bar.update(self._bar.task_ids[0], completed=self.done, status=self.status())
        if now - self.last_line >= self.interval:
            self.last_line = now
            log.info("%s: %s", self.what, self.status(), extra={PERIODIC: True})

    def close(self, finished: bool = True) -> None:
        """Remove the bar; when `finished`, log the last line: the count, the time and the rate."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._restore_handlers is not None:
            self._restore_handlers()
            self._restore_handlers = None
        if finished and not self.quiet:
            count = f"{self.done:,}" if self.done == self.total or self.total is None else f"{self.done:,}/{self.total:,}"
            tail = f"; {detail}" if (detail := self.detail_text()) else ""
            log.info(
                "%s done: %s %s in %s (%s)%s",
                self.what, count, self.unit, duration(self.elapsed), rate_text(self.rate, self.unit), tail,
            )

    def _show_bar(self) -> None:
        console = Console(stderr=True)
        self._bar = RichProgress(
            TextColumn(self.what), BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
            console=console, transient=True, redirect_stdout=False, redirect_stderr=False,
        )
        self._bar.add_task(self.what, total=self.total, completed=self.done, status=self.status())
        self._restore_handlers = _log_above(console)
        self._bar.start()


class _AboveBar(logging.Handler):
    """Stands in for a terminal handler while a bar is live: prints its records above the bar, except the periodic
    progress lines, which the bar shows."""

    def __init__(self, replaced: logging.Handler, console: Console) -> None:
        super().__init__(replaced.level)
        self.replaced = replaced
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, PERIODIC, False) or not self.replaced.filter(record):
            return
        self.console.print(self.replaced.format(record), markup=False, highlight=False, soft_wrap=True)


def _writes_to_terminal(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return not isinstance(handler, logging.FileHandler) and stream is not None and stream.isatty()


def _log_above(console: Console) -> Callable[[], None]:
    """Route the root logger's terminal handlers through `console` (see `_AboveBar`); returns the undo."""
    root = logging.getLogger()
    original = list(root.handlers)
    root.handlers = [_AboveBar(h, console) if _writes_to_terminal(h) else h for h in original]

    def restore() -> None:
        root.handlers = original

    return restore
