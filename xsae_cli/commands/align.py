"""`xsae align`: Map SAE feature spaces between two models, with held-out metrics and nulls."""

from __future__ import annotations

import typer

app = typer.Typer(help="Map SAE feature spaces between two models, with held-out metrics and nulls.", no_args_is_help=True)
