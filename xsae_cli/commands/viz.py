"""`xsae viz`: Plots and offline HTML dashboards from the files the other groups write."""

from __future__ import annotations

import typer

app = typer.Typer(help="Plots and offline HTML dashboards from the files the other groups write.", no_args_is_help=True)
