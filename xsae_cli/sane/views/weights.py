"""The weights as stored: every floating-point tensor of the files, in file order (no symmetry removed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xsae_cli.sane.views import View, ViewOutput, register_view


def weights_view(resolved: Any, warn: Callable[[str], None] | None = None) -> tuple[ViewOutput | None, str]:
    from xsae_cli.zoo.weights import iter_weights, tensor_index

    return (tensor_index(resolved), iter_weights(resolved), {"view": "weights", "applied": False}), ""


register_view(View("weights", weights_view, help="as stored", on_fallback="tokenised as stored, so its permuted copies will not be recognised"))
