"""`xsae zoo`: catalogue models and stream their weights."""

from __future__ import annotations

import typer

app = typer.Typer(help="Catalogue models (HF folders, safetensors, GGUF, PyTorch checkpoints, hub ids) and stream their weights.", no_args_is_help=True)
