"""Align's mappers as a registry: one module per mapper in this package, each ending with its
registration line, ``register_mapper(MyMapper)``.

A mapper learns ``y ~ f(x)`` from paired rows of two models (activations or SAE codes): it is
fit on train rows, may use the validation rows to choose a penalty or stop early, and is scored
by the protocol on test rows it never saw. Built in: ``procrustes`` and ``ridge`` (linear) and
``mlp`` (a 3-layer MLP; called ``hypernet`` in 0.1, a name still accepted). What the
protocol reads from a mapper is all here: :class:`Mapper` (``fit``), :class:`FittedMap`
(``predict``, ``direction``, ``info``), and whether it is ``linear`` (an intervention maps a
latent's direction through the linear part of a map, so only linear mappers can carry one).
The CLI's choices, the report's definitions and the intervention check read this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.plugins import load_package_modules


class FittedMap(Protocol):
    """A fitted map. ``info`` lands in the report's ``fit`` column (numbers and small lists)."""

    info: dict[str, Any]

    def predict(self, x: Any) -> Any:
        """``[n, d_x]`` -> ``[n, d_y]``, in the target's own units."""

    def direction(self, v: Any) -> Any:
        """Where a direction (a difference of two x) goes; for a linear map its linear part."""


class Mapper(Protocol):
    """What ``register_mapper`` takes: a class with a ``name``, ``linear``, ``describes`` and ``fit``."""

    name: str
    linear: bool
    describes: str

    def fit(self, x: Any, y: Any, x_val: Any = None, y_val: Any = None) -> FittedMap:
        """Fit on train rows; ``x_val``/``y_val`` (may be None or empty) choose penalties or the epoch."""


@dataclass(frozen=True)
class MapperEntry:
    """One registered mapper. ``build(space, spec)`` makes a fresh instance for one fit: ``space``
    is ``"acts"`` or ``"codes"``, ``spec`` the run's settings (a :class:`TransferSpec`)."""

    name: str
    cls: type
    build: Callable[[str, Any], Any]
    linear: bool
    describes: str
    default: bool


MAPPERS: dict[str, MapperEntry] = {}
#: Old names still accepted, with the note a user sees (the CHANGELOG says when they go).
ALIASES: dict[str, tuple[str, str]] = {}


def register_mapper(
    cls: type,
    build: Callable[[str, Any], Any] | None = None,
    *,
    aliases: dict[str, str] | None = None,
    default: bool = True,
) -> type:
    """Make ``cls`` a mapper under ``cls.name``; ``build`` defaults to ``cls()``.

    ``aliases`` maps an old name to the note printed when it is used; ``default`` says whether
    a run without ``--mappers`` fits it.
    """
    name = getattr(cls, "name", "")
    if not name or not isinstance(getattr(cls, "linear", None), bool):
        raise ValueError(f"{cls.__name__} needs a class attribute name (str) and linear (bool) to be a mapper")
    if name in MAPPERS and MAPPERS[name].cls is not cls:
        raise ValueError(f"a mapper named {name!r} is already registered ({MAPPERS[name].cls.__name__})")
    linear: bool = cls.linear  # type: ignore[attr-defined]  # checked above
    describes = getattr(cls, "describes", "") or (cls.__doc__ or "").strip().splitlines()[0]
    MAPPERS[name] = MapperEntry(name, cls, build or (lambda space, spec: cls()), linear, describes, default)
    for old, note in (aliases or {}).items():
        ALIASES[old] = (name, note)
    return cls


def _ordered() -> list[MapperEntry]:
    """Linear mappers first (the cheap references), then the rest, each in registration order."""
    _load_builtin()
    return sorted(MAPPERS.values(), key=lambda e: not e.linear)


def mapper_names() -> list[str]:
    return [e.name for e in _ordered()]


def default_mappers() -> list[str]:
    """What a run fits when ``--mappers`` is not given."""
    return [e.name for e in _ordered() if e.default]


def canonical(name: str, warn: Callable[[str], None] | None = None) -> str:
    """The registered name for ``name`` (an old alias says so through ``warn``); unknown names refused."""
    _load_builtin()
    if name in MAPPERS:
        return name
    if name in ALIASES:
        new, note = ALIASES[name]
        if warn is not None:
            warn(note)
        return new
    import difflib

    close = difflib.get_close_matches(name, [*MAPPERS, *ALIASES], n=1)
    hint = ""
    if close:
        hint = f"did you mean '{close[0]}'? " if close[0] in MAPPERS else f"did you mean '{ALIASES[close[0]][0]}' (formerly '{close[0]}')? "
    raise XsaeError(f"unknown mapper '{name}'", f"{hint}use some of {', '.join(mapper_names())}")


def mapper_entry(name: str) -> MapperEntry:
    return MAPPERS[canonical(name)]


def make_mapper(name: str, space: str, spec: Any) -> Any:
    """A fresh mapper ``name`` for one fit in ``space`` (``acts`` or ``codes``) under ``spec``."""
    return mapper_entry(name).build(space, spec)


def linear_mappers() -> list[str]:
    return [e.name for e in _ordered() if e.linear]


def mapper_notes() -> dict[str, str]:
    """Each mapper's one-line definition, for the report's notes."""
    return {e.name: e.describes for e in _ordered()}


def _load_builtin() -> None:
    load_package_modules(__name__, __path__)  # each mapper module registers itself: none is listed by hand
