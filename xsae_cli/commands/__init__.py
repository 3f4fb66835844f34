"""Thin Typer layers, one module per group: parse flags, call one service, print with rich."""
