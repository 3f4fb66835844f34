"""What a terminal, a pipe and --help show: the source's words, natural widths, status lines."""

from __future__ import annotations

import io
import re
import time

import pytest
from rich.console import Console

from tests.conftest import run_xsae
from xsae_cli.core import console as out


def test_help_keeps_bracketed_words_shows_defaults_and_no_flag_placeholder() -> None:
    viz = run_xsae("viz", "cluster", "--help")
    assert viz.returncode == 0, viz.stderr
    assert "[viz] format" in viz.stdout  # was eaten as a rich tag: "else  format"
    restore = run_xsae("restore", "predict", "--help")
    assert "[x] one lost sign" in restore.stdout
    train = run_xsae("sane", "train", "--help")
    assert re.search(r"--epochs\s+<int>.*\[default: 10\]", train.stdout), train.stdout
    assert "(10)" not in train.stdout
    root = run_xsae("--help")
    json_line = next(line for line in root.stdout.splitlines() if "--json" in line)
    assert "<bool>" not in json_line and "Machine-readable" in json_line
    assert "<int>" in next(line for line in root.stdout.splitlines() if "--seed" in line)


def test_a_pipe_gets_natural_width_and_a_terminal_an_ellipsis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert out._width(io.StringIO()) == out.NATURAL_WIDTH
    rows = [["LlamaForCausalLM", "a long description of a model that would wrap at 80 columns " * 2, "100000/100000"]]
    piped = io.StringIO()
    Console(file=piped, width=out._width(piped)).print(out.table("models", ["architecture", "note", "tokens"], rows))
    body = [line for line in piped.getvalue().splitlines() if "LlamaForCausalLM" in line]
    assert len(body) == 1 and "100000/100000" in body[0] and len(body[0]) > 80
    narrow = io.StringIO()
    Console(file=narrow, width=50).print(out.table("models", ["architecture", "note", "tokens"], rows))
    lines = narrow.getvalue().splitlines()
    assert all(len(line) <= 50 for line in lines)
    assert sum("…" in line for line in lines) >= 1
    assert len([line for line in lines if "│" in line]) == 1  # the one row stays one line: nothing wrapped


def test_progress_off_a_terminal_prints_status_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr(out, "err_console", Console(file=buf, width=out.NATURAL_WIDTH))
    monkeypatch.setattr(out, "STATUS_EVERY_S", 0.0)
    monkeypatch.setattr(out.state, "json", False)
    with out.progress() as bar:
        assert isinstance(bar, out.StatusLines)
        bar.every = 0.0
        task = bar.add_task("training SAE", total=100000, unit="tokens")
        for _ in range(4):
            bar.advance(task, 25000)
    lines = buf.getvalue().splitlines()
    assert lines[-1].startswith("training SAE: 100,000/100,000 tokens (100%)"), lines
    assert any("25,000/100,000 tokens (25%)" in line for line in lines)
    assert "\x1b" not in buf.getvalue() and "━" not in buf.getvalue()  # no bar, no cursor codes


def test_status_is_silent_when_quick_and_says_so_when_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr(out, "err_console", Console(file=buf, width=out.NATURAL_WIDTH))
    monkeypatch.setattr(out.state, "json", False)
    with out.status("loading model demo"):
        pass
    assert buf.getvalue() == ""
    monkeypatch.setattr(out, "SLOW_S", 0.01)
    with out.status("loading model demo"):
        time.sleep(0.2)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "loading model demo ..."
    assert re.fullmatch(r"loading model demo: done in \d+\.\d s", lines[1])
