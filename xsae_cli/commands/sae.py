"""`xsae sae`: Sparse autoencoders on any module of any model: train, evaluate, export."""

from __future__ import annotations

import typer

app = typer.Typer(help="Sparse autoencoders on any module of any model: train, evaluate, export.", no_args_is_help=True)
