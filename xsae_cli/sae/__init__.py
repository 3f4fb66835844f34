"""Sparse autoencoders: architectures, PEFT-style injection, training, metrics and file formats.

Exports resolve lazily, so `from xsae_cli.sae import create_sae` does not import peft and
transformers; the PEFT names register xsae's tuner with PEFT on first access. The
per-architecture adapter configs (``TopKSaeConfig``, ...) and ``ARCHITECTURES`` come from the
architecture registry, so they include architectures registered later.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ARCHITECTURES": "models",
    "SaeConfig": "models",
    "SparseAutoencoder": "models",
    "create_sae": "models",
    "FORMATS": "formats",
    "detect_format": "formats",
    "export_sae": "formats",
    "load_sae": "formats",
    "load_sae_dir": "formats",
    "save_sae": "formats",
    "register_sae_class": "registry",
    "ExtraTensor": "registry",
    "PeftSaeModel": "peft",
    "SaeAdapterConfig": "peft",
    "SaeLayer": "peft",
    "SaeTuner": "peft",
    "get_peft_sae_model": "peft",
    "sae_adapter_config_class": "peft",
    "SaeTrainSettings": "settings",
    "SaeTrainer": "train",
}

__all__ = sorted(_EXPORTS)


_LIVE = {"ARCHITECTURES"}  # read from the registry on every access


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name) or ("peft" if name.endswith("SaeConfig") else None)
    if module is None:
        raise AttributeError(f"module 'xsae_cli.sae' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"xsae_cli.sae.{module}"), name)
    if name not in _LIVE:
        globals()[name] = value
    return value
