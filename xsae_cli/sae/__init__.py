"""Sparse autoencoders: architectures, PEFT-style injection, training, metrics and file formats.

Exports resolve lazily, so `from xsae_cli.sae import create_sae` does not import peft and
transformers; the PEFT names register xsae's tuner with PEFT on first access.
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
    "BatchTopKSaeConfig": "peft",
    "JumpReluSaeConfig": "peft",
    "PeftSaeModel": "peft",
    "ReluSaeConfig": "peft",
    "SaeAdapterConfig": "peft",
    "SaeLayer": "peft",
    "SaeTuner": "peft",
    "TopKSaeConfig": "peft",
    "get_peft_sae_model": "peft",
    "TrainSettings": "train",
    "SaeTrainer": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xsae_cli.sae' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"xsae_cli.sae.{module}"), name)
    globals()[name] = value
    return value
