"""Console output shared by every command: rich on a terminal, JSON with ``--json``.

Progress bars go to stderr so that ``--json`` output on stdout stays machine-readable.

Off a terminal (a pipe, a log file, CI) nothing is squeezed: tables get their natural width (rich's
default for a non-terminal is 80 columns, which folded the align tables of a log and cut progress
totals to "100000/1..."), and a progress bar, which a log cannot redraw, becomes one status line per
task every ``STATUS_EVERY_S`` seconds plus a last line when the task ends. ``COLUMNS`` still wins
when set. On a narrow terminal a table cell is cut with an ellipsis, not wrapped word by word.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text


@dataclass
class OutputState:
    """Process-wide output switches, set once by the root CLI callback."""

    json: bool = False
    debug: bool = False
    stdout: Any = None  # where --json output goes: the real stdout, kept apart from library chatter


def enable_json() -> None:
    """Reserve stdout for ``emit``: anything else printed there (DeepSpeed's logger, a library's print)
    is sent to stderr, so ``--json`` output always parses."""
    if state.stdout is None:
        state.stdout = sys.stdout
        sys.stdout = sys.stderr
    state.json = True


state = OutputState()

NATURAL_WIDTH = 4000  # "no limit" for a stream that is not a terminal: a table is as wide as its cells
STATUS_EVERY_S = 15.0  # how often a progress task prints its status line off a terminal


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _width(stream: Any) -> int | None:
    """None (rich decides: the terminal's width, or ``COLUMNS``) on a terminal; natural width off one."""
    if os.environ.get("COLUMNS") or is_terminal(stream):
        return None
    return NATURAL_WIDTH


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    return str(obj)


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, default=_json_default, sort_keys=False)


def emit(data: Any, render: Any = None) -> None:
    """Print ``data`` as JSON under ``--json``, else call ``render(data)`` (or pretty-print it)."""
    if state.json:
        stream = state.stdout or sys.stdout
        stream.write(dumps(data) + "\n")
        stream.flush()
    elif render is not None:
        render(data)
    else:
        console.print(data)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A results table: cells on one line each; a terminal too narrow for them cuts them with "…"."""
    t = Table(title=title, header_style="bold cyan")
    for c in columns:
        t.add_column(c, no_wrap=True, overflow="ellipsis")
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    return t


def info(message: str) -> None:
    """A status line for humans; silent under ``--json`` so stdout stays parseable."""
    if not state.json:
        err_console.print(message)


def warn(message: str) -> None:
    """A warning line; the message is shown as written (a [section] name is not markup)."""
    from rich.markup import escape

    err_console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)


class RateColumn(ProgressColumn):
    """Items per second in the task's own unit (tokens/s, tensors/s, MB/s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("", style="progress.data.speed")
        unit = task.fields.get("unit", "it")
        return Text(rate_text(speed, 1.0, unit), style="progress.data.speed")


def status_text(task: Task) -> str:
    """One line for a progress task: ``training SAE: 50,000/100,000 tokens (50%), 12.3k tokens/s, 0:04 elapsed, eta 0:04``."""
    unit = task.fields.get("unit", "it")
    done = f"{task.completed:,.0f}"
    if task.total is not None:
        done += f"/{task.total:,.0f} {unit} ({100 * task.completed / task.total:.0f}%)" if task.total else f"/0 {unit}"
    else:
        done += f" {unit}"
    parts = [f"{task.description}: {done}"]
    speed = task.finished_speed or task.speed
    if speed:
        parts.append(rate_text(speed, 1.0, unit))
    parts.append(f"{_clock(task.finished_time if task.finished else task.elapsed)} elapsed")
    if not task.finished and task.time_remaining is not None:
        parts.append(f"eta {_clock(task.time_remaining)}")
    return ", ".join(parts)


def _clock(seconds: float | None) -> str:
    s = int(seconds or 0)
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class StatusLines(Progress):
    """A :class:`Progress` for a stream that is not a terminal: no live bar, one plain line per task
    every ``every`` seconds while it moves, and one when it completes (or the block ends)."""

    def __init__(self, *columns: Any, every: float = STATUS_EVERY_S, **kwargs: Any) -> None:
        kwargs["disable"] = True  # the live display; the tasks are still tracked
        super().__init__(*columns, **kwargs)
        self.every = every
        self._printed: dict[Any, float] = {}
        self._closed: set[Any] = set()

    def _line(self, task_id: Any) -> None:
        task = self._tasks[task_id]
        err_console.print(status_text(task), highlight=False, markup=False, soft_wrap=True)
        self._printed[task_id] = time.monotonic()

    def _maybe(self, task_id: Any) -> None:
        if task_id in self._closed:
            return
        task = self._tasks.get(task_id)
        if task is None:
            return
        if task.finished:
            self._line(task_id)
            self._closed.add(task_id)
        elif time.monotonic() - self._printed.get(task_id, 0.0) >= self.every:
            self._line(task_id)

    def add_task(self, *args: Any, **kwargs: Any) -> Any:
        task_id = super().add_task(*args, **kwargs)
        self._printed[task_id] = time.monotonic()  # the first line comes after `every` seconds of work
        return task_id

    def update(self, task_id: Any, *args: Any, **kwargs: Any) -> None:
        super().update(task_id, *args, **kwargs)
        self._maybe(task_id)

    def advance(self, task_id: Any, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe(task_id)

    def stop(self) -> None:
        for task_id in list(self._tasks):
            if task_id not in self._closed and self._tasks[task_id].completed:
                self._line(task_id)
                self._closed.add(task_id)
        super().stop()


@contextmanager
def progress(transient: bool = False, disable: bool = False) -> Iterator[Progress]:
    """A rich progress bar with rate and ETA on stderr; pass ``unit=`` to ``add_task``.

    Off a terminal the bar is :class:`StatusLines` (periodic one-line status) instead.
    """
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    quiet = disable or state.json
    if not quiet and not err_console.is_terminal:
        with StatusLines(*columns, console=err_console) as lines:
            yield lines
        return
    with Progress(*columns, console=err_console, transient=transient, disable=quiet) as bar:
        yield bar


SLOW_S = 3.0  # a step that takes longer than this is announced off a terminal


@contextmanager
def status(message: str) -> Iterator[None]:
    """A slow step with no measurable progress (loading a model, probing a device). On a terminal a
    spinner; off one, ``message ...`` once the step has run ``SLOW_S`` seconds, and its time when it
    ends. A quick step (or one that fails quickly) prints nothing, so a user error stays one line.
    Silent under ``--json``."""
    if state.json:
        yield
        return
    start = time.monotonic()
    live = bool(getattr(err_console, "_live_stack", None) or getattr(err_console, "_live", None))
    if err_console.is_terminal and not live:  # a spinner cannot sit inside another live display
        with err_console.status(escape_markup(message) + " ..."):
            yield
        if time.monotonic() - start >= SLOW_S:
            err_console.print(f"{escape_markup(message)}: done in {time.monotonic() - start:.1f} s", highlight=False)
        return
    announced = threading.Event()

    def announce() -> None:
        announced.set()
        err_console.print(f"{message} ...", highlight=False, markup=False, soft_wrap=True)

    timer = threading.Timer(SLOW_S, announce)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if announced.is_set():
        err_console.print(f"{message}: done in {time.monotonic() - start:.1f} s", highlight=False, markup=False, soft_wrap=True)


def escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def rate_text(done: float, seconds: float, unit: str) -> str:
    if seconds <= 0:
        return ""
    r = done / seconds
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if r >= scale:
            return f"{r / scale:.2f}{suffix} {unit}/s"
    return f"{r:.1f} {unit}/s"
