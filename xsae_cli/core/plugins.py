"""Registries that fill themselves: every module of a package is imported once, in name order.

The zoo's sources and align's mappers each live one per module in their package, ending with
their registration line; nothing lists them by hand, so adding one is adding its file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable

_LOADED: set[str] = set()


def load_package_modules(package: str, path: Iterable[str]) -> None:
    """Import every module of ``package`` (its ``__path__`` is ``path``) the first time this is called for it."""
    if package in _LOADED:
        return
    _LOADED.add(package)
    for mod in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        importlib.import_module(f"{package}.{mod.name}")
