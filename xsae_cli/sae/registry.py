"""The SAE architecture registry: one registration line per architecture, read by everything else.

An architecture is a :class:`~xsae_cli.sae.base.SparseAutoencoder` subclass plus what the rest of
xsae needs to know about it, declared once where the class is defined (SAELens's
``register_sae_class`` pattern)::

    register_sae_class("jumprelu", JumpReluSae, saelens="jumprelu", coefficients=("l0_coefficient",),
                       tensors={"threshold": ExtraTensor("parameter", init="jumprelu_init_threshold")})

The config validation (:func:`check_arch`: "this arch needs k"), the trainer (unit-norm decoder),
the bf16 training encoder default, the file formats (SAELens / sparsify names, the tensors to
write and require), the PEFT tuner (one config class per architecture) and the CLI's choices all
read it; none of them names an architecture. The built-in ones live one per file in
:mod:`xsae_cli.sae.architectures`, imported on the first lookup (any new file there is found
without being listed); code elsewhere (a plugin, a test) registers its own by calling
:func:`register_sae_class`.

This module imports neither torch nor the architectures at import time, so the CLI can read
names cheaply once they are loaded, and the base class can import it without a cycle.
"""

from __future__ import annotations

import importlib
import numbers
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from xsae_cli.core.errors import XsaeError

if TYPE_CHECKING:
    from xsae_cli.sae.base import SaeConfig, SparseAutoencoder

TENSOR_KINDS = ("parameter", "buffer")
#: The tensors every SAE has, named and shaped as SAELens names them; extra tensors come on top.
BASE_TENSORS: dict[str, tuple[str, ...]] = {"W_enc": ("d_in", "d_sae"), "b_enc": ("d_sae",), "W_dec": ("d_sae", "d_in"), "b_dec": ("d_in",)}


@dataclass(frozen=True)
class ExtraTensor:
    """A tensor an architecture has beyond ``W_enc, b_enc, W_dec, b_dec``; the base class creates it.

    ``kind``: ``"parameter"`` (trained by the optimizer) or ``"buffer"`` (state that follows
    training some other way, e.g. an EMA). ``shape``: sizes named by config fields (``"d_sae"``,
    ``"d_in"`` or an option). ``init``: a constant, or the name of the config field / option that
    holds the initial value. Both kinds are saved, loaded and checked by :mod:`xsae_cli.sae.formats`.
    """

    kind: str = "buffer"
    shape: tuple[str, ...] = ("d_sae",)
    init: float | str = 0.0

    def __post_init__(self) -> None:
        if self.kind not in TENSOR_KINDS:
            raise ValueError(f"tensor kind must be one of {TENSOR_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class ArchSpec:
    """What xsae knows about one SAE architecture (see :func:`register_sae_class` for the fields)."""

    name: str
    cls: type[SparseAutoencoder]
    uses_k: bool = False
    saelens: str = ""
    saelens_read: tuple[str, ...] = ()
    sparsify: str | None = None
    tensors: Mapping[str, ExtraTensor] = field(default_factory=dict)
    coefficients: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    unit_norm_decoder: bool = True
    bf16_selection: bool = False
    saelens_cfg: Callable[[SaeConfig], dict[str, Any]] | None = None
    saelens_import: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    saelens_export: Callable[[SaeConfig, dict[str, Any]], dict[str, Any]] | None = None
    validate: Callable[[SaeConfig], None] | None = None

    @property
    def title(self) -> str:
        """The class name without its ``Sae`` suffix (``TopKSae`` -> ``TopK``): names derived classes."""
        return self.cls.__name__.removesuffix("Sae") or self.cls.__name__

    def tensor_shapes(self, cfg: SaeConfig) -> dict[str, list[int]]:
        """Every tensor this architecture saves, with its shape under ``cfg`` (d_in, d_sae, options)."""
        shapes = {**BASE_TENSORS, **{name: t.shape for name, t in self.tensors.items()}}
        return {name: [int(cfg.setting(s)) for s in shape] for name, shape in shapes.items()}


_REGISTRY: dict[str, ArchSpec] = {}
_BUILTINS_LOADED = False


def register_sae_class(
    name: str,
    cls: type[SparseAutoencoder],
    *,
    uses_k: bool = False,
    saelens: str | None = None,
    saelens_read: tuple[str, ...] | None = None,
    sparsify: str | None = None,
    tensors: Mapping[str, ExtraTensor] | None = None,
    coefficients: tuple[str, ...] = (),
    options: Mapping[str, Any] | None = None,
    unit_norm_decoder: bool = True,
    bf16_selection: bool = False,
    saelens_cfg: Callable[[SaeConfig], dict[str, Any]] | None = None,
    saelens_import: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
    saelens_export: Callable[[SaeConfig, dict[str, Any]], dict[str, Any]] | None = None,
    validate: Callable[[SaeConfig], None] | None = None,
) -> ArchSpec:
    """Register an SAE architecture; returns its spec. Registering the same name twice is refused
    unless it is the same class again (a module imported twice).

    - ``uses_k``: needs ``k`` (active latents per token), validated ``1 <= k <= d_sae``.
    - ``saelens``: the SAELens ``architecture`` written to ``cfg.json`` (default: ``name``);
      ``saelens_read``: SAELens architectures read as this one when a file carries no xsae record
      (default: ``(saelens,)``); two architectures cannot read the same name.
    - ``sparsify``: sparsify's ``activation`` name if sparsify's layout can hold it, else None.
    - ``tensors``: extra tensors (:class:`ExtraTensor`) beyond W_enc, b_enc, W_dec, b_dec.
    - ``coefficients``: the config fields (or options) its loss reads, e.g. ``("l1_coefficient",)``;
      each must be a finite number >= 0.
    - ``options``: settings only this architecture has, ``{name: default}``, kept in
      ``SaeConfig.options`` (and settable flat: ``SaeConfig.from_dict({"name": ...})``).
    - ``unit_norm_decoder``: the trainer keeps decoder rows unit norm (False when the loss already
      makes the scale of a latent irrelevant, as ReLU's decoder-norm-weighted L1 does).
    - ``bf16_selection``: training may select latents with a bf16 matmul by default (the values
      are recomputed exactly afterwards); architectures that train on the values themselves leave it off.
    - ``saelens_cfg``: extra keys for SAELens's ``cfg.json`` (e.g. ``k``); ``saelens_import``:
      ``(raw cfg, tensors) -> tensors``, to convert a SAELens file of this architecture on load;
      ``saelens_export``: ``(cfg, tensors) -> tensors``, its inverse on save (SAELens's gated SAE
      calls its gate bias ``b_gate`` and has no ``b_enc``).
    - ``validate``: ``cfg -> None``, raising :class:`XsaeError` for a value only this architecture
      refuses (Matryoshka widths that do not increase); called by ``SaeConfig.validate``.
    """
    from xsae_cli.sae.base import SaeConfig, SparseAutoencoder

    if not name or name != name.strip() or any(c.isspace() for c in name):
        raise ValueError(f"an SAE architecture name must be a non-empty word, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, SparseAutoencoder)):
        raise TypeError(f"{cls!r} is not a SparseAutoencoder subclass")
    old = _REGISTRY.get(name)
    if old is not None:
        if old.cls.__qualname__ == cls.__qualname__ and old.cls.__module__ == cls.__module__:
            _REGISTRY.pop(name)  # the same class re-imported (importlib.reload): replace it
        else:
            raise ValueError(f"SAE architecture '{name}' is already registered ({old.cls.__name__})")
    saelens = saelens or name
    read = tuple(saelens_read) if saelens_read is not None else (saelens,)
    for other in _REGISTRY.values():
        shared = set(read) & set(other.saelens_read)
        if shared:
            raise ValueError(f"SAELens architecture {sorted(shared)} is already read as '{other.name}'")
    fields = {f for f in SaeConfig.__dataclass_fields__}
    options = dict(options or {})
    taken = sorted(set(options) & fields)
    if taken:
        raise ValueError(f"options {taken} of '{name}' are SaeConfig fields already")
    unknown = [c for c in coefficients if c not in fields and c not in options]
    if unknown:
        raise ValueError(f"coefficients {unknown} of '{name}' are neither SaeConfig fields nor its options")
    tensors = dict(tensors or {})
    twice = sorted(set(tensors) & set(BASE_TENSORS))
    if twice:
        raise ValueError(f"extra tensors {twice} of '{name}' clash with the base tensors")
    spec = ArchSpec(
        name=name,
        cls=cls,
        uses_k=uses_k,
        saelens=saelens,
        saelens_read=read,
        sparsify=sparsify,
        tensors=tensors,
        coefficients=tuple(coefficients),
        options=options,
        unit_norm_decoder=unit_norm_decoder,
        bf16_selection=bf16_selection,
        saelens_cfg=saelens_cfg,
        saelens_import=saelens_import,
        saelens_export=saelens_export,
        validate=validate,
    )
    _REGISTRY[name] = spec
    return spec


def unregister_sae_class(name: str) -> None:
    """Remove an architecture (for tests that register their own)."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    """Import every module of :mod:`xsae_cli.sae.architectures` (each registers itself)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    package = importlib.import_module("xsae_cli.sae.architectures")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def specs() -> dict[str, ArchSpec]:
    """Every registered architecture, ``{name: spec}`` in registration order."""
    _load_builtins()
    return dict(_REGISTRY)


def arch_names() -> tuple[str, ...]:
    return tuple(specs())


def get_arch(name: str, where: str = "") -> ArchSpec:
    """The spec of ``name``; an unknown name is an :class:`XsaeError` listing the registered ones."""
    spec = specs().get(name)
    if spec is None:
        place = f" in {where}" if where else ""
        raise XsaeError(f"unknown SAE architecture '{name}'{place}", f"use one of {', '.join(arch_names())}")
    return spec


def check_arch(name: str, *, k: Any = None, d_sae: Any = None, where: str = "") -> ArchSpec:
    """The one check of what an architecture asks of ``k``: known name, ``k >= 1`` when it uses k,
    ``k <= d_sae`` when both are known. Config, trainer settings and the PEFT tuner all call it."""
    spec = get_arch(name, where)
    if spec.uses_k:
        if k is None or isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0:
            got = "" if k is None else f" (got {k!r})"
            raise XsaeError(f"a {name} SAE needs k >= 1 active latents{got}", "set k to a positive integer (e.g. k = 32)")
        if d_sae is not None and int(k) > int(d_sae):
            raise XsaeError(f"k={k} is larger than d_sae={d_sae}", "lower k or widen the SAE")
    return spec


def from_saelens(architecture: str) -> ArchSpec | None:
    """The architecture that reads SAELens's ``architecture`` name, or None."""
    return next((s for s in specs().values() if architecture in s.saelens_read), None)


def from_sparsify(activation: str) -> ArchSpec | None:
    """The architecture stored under sparsify's ``activation`` name, or None."""
    return next((s for s in specs().values() if s.sparsify == activation), None)


def saelens_names() -> tuple[str, ...]:
    """SAELens architecture names xsae reads."""
    return tuple(n for s in specs().values() for n in s.saelens_read)


def sparsify_names() -> tuple[str, ...]:
    return tuple(s.sparsify for s in specs().values() if s.sparsify)


def describe() -> list[dict[str, Any]]:
    """One JSON-able row per registered architecture (what ``xsae sae archs`` shows)."""
    return [
        {
            "arch": s.name,
            "class": f"{s.cls.__module__}.{s.cls.__qualname__}",
            "uses_k": s.uses_k,
            "saelens": s.saelens,
            "saelens_read": list(s.saelens_read),
            "sparsify": s.sparsify,
            "tensors": {n: t.kind for n, t in s.tensors.items()},
            "coefficients": list(s.coefficients),
            "options": dict(s.options),
            "unit_norm_decoder": s.unit_norm_decoder,
            "bf16_selection": s.bf16_selection,
        }
        for s in specs().values()
    ]


__all__ = [
    "ArchSpec",
    "ExtraTensor",
    "arch_names",
    "check_arch",
    "describe",
    "from_saelens",
    "from_sparsify",
    "get_arch",
    "register_sae_class",
    "specs",
    "unregister_sae_class",
]
