"""What SANE tokenises from a model, its *view*: a registry with one registration line per view.

A view turns a resolved zoo model into ``(index, stream, info)``: the header-only tensor list
(names, shapes, dtypes; what the chunk count is computed from), the ``(name, tensor)`` stream that
is chunked, and a dict recorded in the cache manifest. A view that cannot read a model (no config,
a family without known tensor roles) returns ``(None, why)`` and the model falls back to the
view's ``fallback`` (circuits -> canonical -> weights), with one warning naming why.

A view's ``revision`` goes into the coordinate scheme id (``sane/tokenizer.py``): bumping it when
the view's output changes keeps old caches from being reused and old checkpoints from being read
with the new tokens.

Adding a view is one file in this folder that ends with its registration::

    register_view(View("myview", build, revision=1, fallback="weights", help="what it reads"))

The folder is listed when the registry is first asked, so no other file changes: ``--view``,
``[sane] view``, the CLI help, the cache and checkpoints all read the registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from xsae_cli.core.errors import XsaeError

ViewOutput = tuple[list[Any], Iterator[tuple[str, Any]], dict[str, Any]]
Build = Callable[[Any, Callable[[str], None] | None], tuple[ViewOutput | None, str]]


@dataclass(frozen=True)
class View:
    """One view: ``build(resolved, warn) -> ((index, stream, info), "")`` or ``(None, why)``."""

    name: str
    build: Build
    revision: int = 1
    fallback: str | None = None  # the view a model this one cannot read is tokenised with
    help: str = ""  # what it reads, for the CLI help
    on_fallback: str = ""  # how a fallback *to* this view is described in the warning


_VIEWS: dict[str, View] = {}
_discovered = False


def register_view(view: View) -> View:
    if view.name in _VIEWS and _VIEWS[view.name].build is not view.build:
        raise ValueError(f"SANE view '{view.name}' is registered twice")
    _VIEWS[view.name] = view
    return view


def _discover() -> None:
    """Import every module of this package once: each registers its view."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def views() -> dict[str, View]:
    _discover()
    return dict(_VIEWS)


def _chain(name: str) -> list[str]:
    seen = [name]
    while (v := _VIEWS.get(seen[-1])) is not None and v.fallback and v.fallback not in seen:
        seen.append(v.fallback)
    return seen


def view_names() -> tuple[str, ...]:
    """Registered views, the most derived first (the longest fallback chain), then by name."""
    _discover()
    return tuple(sorted(_VIEWS, key=lambda n: (-len(_chain(n)), n)))


def get_view(name: str) -> View:
    _discover()
    if name not in _VIEWS:
        raise XsaeError(f"unknown view '{name}'", f"use --view {' | '.join(view_names())}")
    return _VIEWS[name]


def revision(name: str) -> int:
    """The view's output revision (1 for a name no view has: ids of unknown views stay stable)."""
    _discover()
    view = _VIEWS.get(name)
    return view.revision if view is not None else 1


def view_help() -> str:
    """One line for ``--view``: every view with what it reads."""
    names = view_names()
    parts = [f"{n} ({_VIEWS[n].help})" if _VIEWS[n].help else n for n in names]
    listed = ", ".join(parts[:-1]) + f" or {parts[-1]}" if len(parts) > 1 else "".join(parts)
    return f"What is tokenised: {listed}. Default from [sane] view."


def produce(name: str, resolved: Any, warn: Callable[[str], None] | None = None, strict: bool = False) -> ViewOutput:
    """``(index, stream, info)`` of ``resolved`` under view ``name``, falling back along the chain
    (``strict``: a model the view cannot read is an error naming why, instead of a fallback)."""
    view = get_view(name)
    reasons: list[str] = []
    while True:
        got, why = view.build(resolved, warn)
        if got is not None:
            if reasons:
                got[2].setdefault("reason", reasons[-1])
            return got
        if view.fallback is None:
            raise XsaeError(f"the {view.name} view cannot read {getattr(resolved, 'source', resolved)} ({why})", "choose another --view")
        target = get_view(view.fallback)
        if strict:
            raise XsaeError(f"no {view.name} view for {getattr(resolved, 'source', resolved)} ({why})", f"drop --strict to tokenise it with its {target.name} view")
        reasons.append(why)
        if warn is not None:
            warn(f"no {view.name} view for {getattr(resolved, 'source', resolved)} ({why}): {target.on_fallback or f'trying its {target.name} view'}")
        view = target
