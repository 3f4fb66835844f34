"""Console output shared by every command: rich on a terminal, JSON with ``--json``.

Progress bars go to stderr so that ``--json`` output on stdout stays machine-readable.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

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
console = Console()
err_console = Console(stderr=True)


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
    t = Table(title=title, header_style="bold cyan")
    for i, c in enumerate(columns):
        t.add_column(c, no_wrap=i == 0, overflow="fold")
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


@contextmanager
def progress(transient: bool = False, disable: bool = False) -> Iterator[Progress]:
    """A rich progress bar with rate and ETA on stderr; pass ``unit=`` to ``add_task``."""
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
    with Progress(*columns, console=err_console, transient=transient, disable=disable or state.json) as bar:
        yield bar


def rate_text(done: float, seconds: float, unit: str) -> str:
    if seconds <= 0:
        return ""
    r = done / seconds
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if r >= scale:
            return f"{r / scale:.2f}{suffix} {unit}/s"
    return f"{r:.1f} {unit}/s"
