"""`xsae sane`: Universal SANE: embed model weights, train the autoencoder, find lineage and neighbours."""

from __future__ import annotations

import typer

app = typer.Typer(help="Universal SANE: embed model weights, train the autoencoder, find lineage and neighbours.", no_args_is_help=True)
