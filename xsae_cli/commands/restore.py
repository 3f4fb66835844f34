"""`xsae restore`: Character-level restoration transformer for damaged texts, and SAEs on it."""

from __future__ import annotations

import typer

app = typer.Typer(help="Character-level restoration transformer for damaged texts, and SAEs on it.", no_args_is_help=True)
