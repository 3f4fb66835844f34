"""The SAE architectures behind one import: ``from xsae_cli.sae.models import SaeConfig, create_sae``.

Kept as the one place to import SAEs from; the code lives in small modules named for what they
hold: :mod:`~xsae_cli.sae.base` (config, base class, factory), :mod:`~xsae_cli.sae.kernels` (the
sparse products of the TopK family), :mod:`~xsae_cli.sae.registry` (what each architecture
declares) and :mod:`~xsae_cli.sae.architectures` (one file per architecture). ``ARCHITECTURES``
and ``BF16_SELECTION_ARCHES`` are read from the registry on each access, so an architecture
registered later (a plugin, a test) is in them; so are the architecture classes (``TopKSae``...).
"""

from __future__ import annotations

from typing import Any

from xsae_cli.sae.base import (
    BF16_ENCODER_ENV,
    BF16_MODES,
    NORMALIZATIONS,
    PARAM_DTYPES,
    SaeConfig,
    SparseAutoencoder,
    TrainOutput,
    bf16_encoder_default,
    bf16_encoder_is_fast,
    create_sae,
    flatten_tokens,
    geometric_median,
)
from xsae_cli.sae.kernels import (
    SPARSE_BACKEND_ENV,
    SPARSE_BACKENDS,
    GatherLinear,
    Pattern,
    SparseDecode,
    global_topk,
    sparse_backend,
)
from xsae_cli.sae.registry import (
    ArchSpec,
    ExtraTensor,
    arch_names,
    check_arch,
    get_arch,
    register_sae_class,
    specs,
)

# The names these had when they lived in this module (tests and benchmarks use them).
_Pattern = Pattern
_GatherLinear = GatherLinear
_SparseDecode = SparseDecode
_global_topk = global_topk
_sparse_backend = sparse_backend
_flatten = flatten_tokens


def __getattr__(name: str) -> Any:
    if name == "ARCHITECTURES":
        return arch_names()
    if name == "BF16_SELECTION_ARCHES":
        return tuple(n for n, s in specs().items() if s.bf16_selection)
    for spec in specs().values():
        if spec.cls.__name__ == name:
            return spec.cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BF16_ENCODER_ENV",
    "BF16_MODES",
    "NORMALIZATIONS",
    "PARAM_DTYPES",
    "SPARSE_BACKENDS",
    "SPARSE_BACKEND_ENV",
    "ArchSpec",
    "ExtraTensor",
    "SaeConfig",
    "SparseAutoencoder",
    "TrainOutput",
    "arch_names",
    "bf16_encoder_default",
    "bf16_encoder_is_fast",
    "check_arch",
    "create_sae",
    "geometric_median",
    "get_arch",
    "register_sae_class",
]
