"""Progress of long commands, on a terminal and in plain logs.

On a terminal, rich's live bar. Anywhere else (stderr redirected to a file, a pipe, CI) a live bar
shows nothing, so :class:`PlainProgress` writes plain lines instead: one at a task's first update,
then one at most every ``interval`` seconds while it runs (count, elapsed time, estimate of the time
left), and one when it completes. A task that fails before its first update writes nothing, so an
error stays the only line. Both offer the part of rich's ``Progress`` interface the commands use
(``add_task``, ``update``, ``advance``, use as a context manager), so a command is written once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def clock_text(seconds: float) -> str:
    """Seconds as ``m:ss`` (``h:mm:ss`` from one hour)."""
    whole = max(int(round(seconds)), 0)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(description: str, completed: float, total: float | None, elapsed: float) -> str:
    """One plain progress line, e.g. ``evaluating: 4/16 (25%), 0:20 elapsed, about 1:00 left``."""
    if total is None or total <= 0:
        return f"{description}: {completed:g}, {clock_text(elapsed)} elapsed"
    if completed >= total:
        return f"{description}: {completed:g}/{total:g} done in {clock_text(elapsed)}"
    line = f"{description}: {completed:g}/{total:g} ({100 * completed / total:.0f}%), {clock_text(elapsed)} elapsed"
    if completed > 0:
        line += f", about {clock_text(elapsed * (total - completed) / completed)} left"
    return line


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    started: float
    last_line: float | None = None
    finished: bool = False


class PlainProgress:
    """Progress as plain lines on ``stream``: once a task has run ``interval`` seconds of
    ``clock``, then at most every ``interval`` seconds, at once when a task that has shown a line
    enters a new phase (description), and when its count reaches its total. Work that fails before
    its first interval leaves stderr to its one error line."""

    def __init__(self, stream: TextIO, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self.tasks: list[_Task] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.flush()

    def _write(self, task: _Task, now: float) -> None:
        self.stream.write(progress_line(task.description, task.completed, task.total, now - task.started) + "\n")
        self.stream.flush()
        task.last_line = now

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_: Any) -> int:
        self.tasks.append(_Task(description, total, completed, self.clock()))
        return len(self.tasks) - 1

    def update(
        self,
        task_id: int,
        *,
        total: float | None = None,
        completed: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        **_: Any,
    ) -> None:
        task = self.tasks[task_id]
        now = self.clock()
        new_phase = description is not None and description != task.description
        if new_phase:  # a task may go through several phases, each counted to its own total
            task.description = description
            task.finished = False
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if task.finished:
            return
        if task.total is not None and task.completed >= task.total:
            task.finished = True
            self._write(task, now)
        elif (new_phase and task.last_line is not None) or now - (task.last_line if task.last_line is not None else task.started) >= self.interval:
            self._write(task, now)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)


def progress_display(console: Console, interval: float = 10.0) -> Progress | PlainProgress:
    """rich's live bar when ``console`` is a terminal, else :class:`PlainProgress` on its stream."""
    if console.is_terminal:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
    return PlainProgress(console.file, interval)


@contextlib.contextmanager
def status(console: Console, message: str) -> Iterator[None]:
    """rich's spinner with ``message`` on a terminal; elsewhere the message as one plain line."""
    if console.is_terminal:
        with console.status(message):
            yield
        return
    console.file.write(message + "\n")
    console.file.flush()
    yield
