"""Progress of the long stages, and where a stage was when Ctrl-C stopped it.

`StageProgress` is the one reporter of every long stage (fine-tuning's two phases, DPO, RFT's reward model and
policy, sampling, synthesis, judging, the evaluation's classifier runs):

- on a terminal, a rich bar: description, bar, done/total, the latest metrics (loss, cost), elapsed time, ETA;
- anywhere else (CI, a log file, nohup), one plain line on stderr at every multiple of `every` steps, on the
  first and the last step, and whenever a minute passed without one, e.g.
  ``dpo round 0 step 40/128 loss 0.6812 2.1 s/step eta 3m12s``.
  `every` defaults to a twentieth of the total; the environment variable MAGIC_PROGRESS_EVERY sets it.

The reporter also knows where its stage is. While it runs it is registered as active; when Ctrl-C stops the
command, `interrupted()` (called by the CLI) closes the bars and returns one line naming the stage, the step or
item reached and what a rerun does (resume from the last checkpoint, skip the finished images).
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from magic_align.errors import MagicError

EVERY_VARIABLE = "MAGIC_PROGRESS_EVERY"
SILENCE_SECONDS = 60.0  # a plain line at least this often, however slow the steps
RERUN = "rerun the same command to continue"

Item = TypeVar("Item")

_active: list["StageProgress"] = []  # started and not finished, innermost last
_stopped: list["StageProgress"] = []  # the reporter an exception (Ctrl-C) just ended, if any


class ProgressSettingError(MagicError, ValueError):
    """MAGIC_PROGRESS_EVERY is not a positive whole number."""


def compact_duration(seconds: float) -> str:
    """45s, 3m12s, 2h05m: the short form of progress lines (the report writes "3 min 12 s")."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_metrics(metrics: dict[str, float | str]) -> str:
    """'loss 0.6812 cost $0.0123': floats with four significant digits, strings as given."""
    parts = []
    for name, value in metrics.items():
        text = value if isinstance(value, str) else ("nan" if math.isnan(value) else f"{value:.4g}")
        parts.append(f"{name} {text}")
    return " ".join(parts)


def default_every(total: int) -> int:
    """Steps between plain lines: MAGIC_PROGRESS_EVERY, or a twentieth of the total (at least 1)."""
    text = os.environ.get(EVERY_VARIABLE, "").strip()
    if text:
        try:
            every = int(text)
        except ValueError:
            every = 0
        if every < 1:
            raise ProgressSettingError(f"{EVERY_VARIABLE} = {text!r}: expected a whole number of steps, at least 1")
        return every
    return max(1, total // 20)


class StageProgress:
    """The progress of one long stage (or one phase of it): `total` steps or items of `unit`, `completed` of them
    already done before this call (a resumed run).

    Use it as a context manager (`with StageProgress(...) as progress:` ... `progress.advance(loss=...)`), or
    iterate `progress.steps(range(start, total))`, which starts it and finishes it at the end of the loop.
    `resume` says what a rerun does after Ctrl-C (a string, or a function asked at that moment, e.g. for the
    latest checkpoint). `enabled=False` shows nothing (other processes under `accelerate launch`) but still
    knows where the stage is. `on_interrupt` runs when Ctrl-C ends the `with` block, to store finished work.
    """

    def __init__(
        self,
        description: str,
        total: int,
        *,
        unit: str = "step",
        completed: int = 0,
        resume: str | Callable[[], str] = RERUN,
        enabled: bool = True,
        every: int | None = None,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_interrupt: Callable[[], None] | None = None,
    ) -> None:
        self.description = description
        self.total = max(0, int(total))
        self.unit = unit
        self.completed = min(int(completed), self.total) if self.total else int(completed)
        self.resume = resume
        self.enabled = enabled
        self.every = every if every is not None else default_every(self.total)
        if self.every < 1:
            raise ValueError(f"every must be at least 1, got {self.every}")
        self.console = console or Console(stderr=True)
        self.clock = clock
        self.on_interrupt = on_interrupt
        self.metrics: dict[str, float | str] = {}
        self._bar = None
        self._task = None
        self._started_at: float | None = None
        self._start_completed = self.completed
        self._printed_at: tuple[int, float] | None = None  # (completed, time) of the last plain line

    # ------------------------------------------------------------------------------------- life cycle
    def start(self) -> "StageProgress":
        if self._started_at is not None:
            return self
        self._started_at = self.clock()
        self._start_completed = self.completed
        self._printed_at = (self.completed, self._started_at)
        _stopped.clear()
        _active.append(self)
        if not self.enabled or self.total == 0:
            return self
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[metrics]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
            )
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.completed, metrics="")
            self._bar.start()
        elif self.completed:
            self._say(f"{self.description}: {self.completed}/{self.total} {self.unit}s already done, continuing")
        return self

    def finish(self) -> None:
        """The stage ended (or left the loop on purpose): close the bar, stop being the active stage."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self in _active:
            _active.remove(self)

    def __enter__(self) -> "StageProgress":
        return self.start()

    def __exit__(self, kind, error, traceback) -> bool:
        import asyncio  # here, not at the top: the command line imports this module and starts faster without it

        interrupted = kind is not None and issubclass(kind, (KeyboardInterrupt, asyncio.CancelledError))
        try:
            if interrupted and self.on_interrupt is not None:
                self.on_interrupt()
        finally:
            self.finish()
            if interrupted:  # asyncio turns Ctrl-C into a cancellation here and a KeyboardInterrupt later
                _stopped[:] = [self]
        return False

    def steps(self, items: Iterable[Item]) -> Iterator[Item]:
        """The items, with the reporter started before the first and finished after the last. Call `advance` in
        the loop body once a step is done, and `finish()` before leaving the loop early on purpose (break, return).

        A loop left any other way was left by an exception: Python closes this generator as that exception
        leaves the loop, before any handler runs, so the reporter is kept as the stopped stage for `interrupted`.
        """
        self.start()
        try:
            yield from items
        except GeneratorExit:
            if self in _active:
                _stopped[:] = [self]
            raise
        finally:
            self.finish()

    # ---------------------------------------------------------------------------------------- steps
    def advance(self, count: int = 1, **metrics: float | str) -> None:
        """`count` more steps (or items) done; `metrics` are the latest values to show (loss=..., cost=...)."""
        self.start()
        self.completed += count
        self.metrics.update(metrics)
        if not self.enabled or self.total == 0:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, metrics=format_metrics(self.metrics))
            return
        now = self.clock()
        last_completed, last_time = self._printed_at
        due = (
            self.completed // self.every > last_completed // self.every  # a multiple of `every` was passed
            or self.completed >= self.total
            or last_completed == self._start_completed  # the first line tells the speed early
            or now - last_time >= SILENCE_SECONDS
        )
        if due:
            self._printed_at = (self.completed, now)
            self._say(self.line(now))

    def line(self, now: float | None = None) -> str:
        """'dpo round 0 step 40/128 loss 0.6812 2.1 s/step eta 3m12s'."""
        now = self.clock() if now is None else now
        parts = [f"{self.description} {self.unit} {self.completed}/{self.total}"]
        if self.metrics:
            parts.append(format_metrics(self.metrics))
        done = self.completed - self._start_completed
        if done > 0 and self._started_at is not None:
            seconds = (now - self._started_at) / done
            if seconds >= 1 or seconds == 0:
                parts.append(f"{seconds:.1f} s/{self.unit}")
            else:
                parts.append(f"{1 / seconds:.1f} {self.unit}/s")
            if self.completed < self.total:
                parts.append(f"eta {compact_duration(seconds * (self.total - self.completed))}")
        return " ".join(parts)

    def _say(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    # ---------------------------------------------------------------------------------------- Ctrl-C
    def where(self) -> str:
        """'dpo round 0 stopped after step 3 of 4' / 'sampling round 0 stopped with 12 of 40 images done'."""
        if self.unit == "step" or self.unit == "epoch":
            if self.completed == 0:
                return f"{self.description} stopped before {self.unit} 1 of {self.total}"
            return f"{self.description} stopped after {self.unit} {self.completed} of {self.total}"
        return f"{self.description} stopped with {self.completed} of {self.total} {self.unit}s done"

    def stop_line(self) -> str:
        resume = self.resume() if callable(self.resume) else self.resume
        return f"{self.where()}; {resume}"


def interrupted() -> str | None:
    """Where Ctrl-C stopped the command: the line of the innermost stage still running (or the one whose `with`
    block it just ended), None when no stage had started. Closes every bar left open."""
    reporter = _active[-1] if _active else (_stopped[-1] if _stopped else None)
    text = reporter.stop_line() if reporter is not None else None
    forget()
    return text


def forget() -> None:
    """Close every bar left open and forget every stage (the start of a command)."""
    for reporter in list(_active):
        reporter.finish()
    _active.clear()
    _stopped.clear()
