"""``--help`` shows what the source says.

Typer renders help with rich markup, so text in brackets that looks like a tag vanished: the source's
"Default from [sane] view." printed "Default from  view.". Help strings here are plain text, never
markup: :func:`honest_help` escapes every help string of the command being shown (once, at the only
place help is rendered, so nothing is escaped twice), writes a generated option's default as
``[default: 10]`` (Typer prints a string ``show_default`` as ``(10)``), and drops the ``<bool>`` value
placeholder of on/off flags, which take no value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.markup import escape


def _target(command: Any, argv: Sequence[str]) -> Any:
    cmd = command
    for token in argv:
        sub = getattr(cmd, "commands", {}).get(token)
        if sub is not None:
            cmd = sub
    return cmd


def _flag_aware_type(self: Any, ctx: Any) -> str | None:
    if getattr(self, "is_flag", False) and getattr(self, "is_bool_flag", False):
        return None  # an on/off flag takes no value: no <bool> placeholder
    return _typer_type(self, ctx)


import typer.core  # noqa: E402  (after the helpers it patches in)

_typer_type = typer.core.TyperOption.display_type_rich


def honest_help(command: Any, argv: Sequence[str]) -> None:
    """Make the help of the command ``argv`` names (and its subcommands' one-line summaries) plain text."""
    typer.core.TyperOption.display_type_rich = _flag_aware_type  # type: ignore[method-assign]
    cmd = _target(command, argv)
    if getattr(cmd, "_xsae_honest", False):
        return
    cmd._xsae_honest = True
    if cmd.help:
        cmd.help = escape(cmd.help)
    for sub in getattr(cmd, "commands", {}).values():
        if sub.help:
            sub.help = escape(sub.help)
        if sub.short_help:
            sub.short_help = escape(sub.short_help)
    for param in getattr(cmd, "params", []):
        text = getattr(param, "help", None) or ""
        text = escape(text)
        shown = getattr(param, "show_default", None)
        if isinstance(shown, str) and shown:
            text = (text + "  " if text else "") + escape(f"[default: {shown}]")
            param.show_default = False
        if hasattr(param, "help"):
            param.help = text or None
