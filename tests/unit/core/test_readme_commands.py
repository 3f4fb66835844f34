"""Every `xsae` command in README.md parses as written: the command exists, every flag is known,
values have the right types and no required option is missing (the "A real-model result" command
once lacked its required --out). Parsing only, in-process: nothing is run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from xsae_cli.cli import app

README = Path(__file__).resolve().parents[3] / "README.md"


def _synopsis(line: str) -> bool:
    """A usage synopsis (`xsae zoo list | info NAME`, `[--fetch]`), not a command to run."""
    bare = re.sub(r'"[^"]*"', '""', line)  # a quoted argument may hold brackets: "a-na [...] qi2-bi2-ma"
    bare = bare.split("--model")[0]  # model ids hold capitals: mistralai/Mistral-7B-v0.1
    return bool(re.search(r"[\[|<]|\.\.\.|\b[A-Z]{2,}\b", bare))


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    found: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        block = re.sub(r"\\[ \t]*\n[ \t]*", " ", block)  # a command continued over lines with a backslash is one command
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("xsae ") and not _synopsis(line):
                found.append(line)
    # commands quoted in a table row (recipes, the migration table): `xsae sae train ... --out runs/x`
    for row in (r for r in text.splitlines() if r.startswith("|")):
        for span in re.findall(r"`(xsae [^`]+)`", row):
            if not _synopsis(span):
                found.append(span)
    # eager flags act while parsing (--install-completion writes to the shell's rc file): not parsed here
    eager = ("--install-completion", "--show-completion", "--version", "--help", " -h")
    return sorted({line for line in found if not any(e in line for e in eager)})


def _parse(line: str) -> None:
    args = shlex.split(line)[1:]
    root = typer.main.get_command(app)
    ctx = root.make_context("xsae", list(args), resilient_parsing=False)
    cmd, rest = root, _rest(ctx)
    while hasattr(cmd, "get_command") and rest:
        sub = cmd.get_command(ctx, rest[0])
        assert sub is not None, f"{line}: no command {rest[0]!r}"
        ctx = sub.make_context(rest[0], rest[1:], parent=ctx)
        cmd, rest = sub, _rest(ctx) if hasattr(sub, "get_command") else []


def _rest(ctx: Any) -> list[str]:
    protected = getattr(ctx, "_protected_args", None)
    if protected is None:
        protected = getattr(ctx, "protected_args", [])
    return [*protected, *ctx.args]


COMMANDS = readme_commands()


def test_the_readme_has_commands() -> None:
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_parses(line: str) -> None:
    try:
        _parse(line)
    except Exception as exc:  # typer vendors click: its UsageError is not click's
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        pytest.fail(f"{line}\n  {type(exc).__name__}: {message}")
