"""A PyTorch checkpoint (``.pt``/``.pth``/``.bin``/``.ckpt``): a state dict, or one nested under
``model_state_dict``/``state_dict``/``model`` beside a ``config``.

Always read with ``weights_only=True`` (:func:`core.io.safe_torch_load`): a file whose unpickling
needs code is refused, never run. ``mmap=True`` keeps tensors on disk until touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import safe_torch_load
from xsae_cli.zoo.sources import ResolvedModel, Source, TensorInfo, register_source

NESTED_STATE_KEYS = ("model_state_dict", "state_dict", "model")


class TorchCheckpoint(Source):
    kind = "pt"
    describes = "a .pt/.pth/.bin/.ckpt PyTorch checkpoint"
    suffixes = (".pt", ".pth", ".bin", ".ckpt")

    def read_index(self, file: Path) -> list[TensorInfo]:
        return [TensorInfo(name, tuple(t.shape), str(t.dtype).replace("torch.", ""), file.name, t.numel() * t.element_size()) for name, t in state_items(file)]

    def read_weights(self, file: Path) -> Iterator[tuple[str, Any]]:
        yield from state_items(file)

    def config(self, resolved: ResolvedModel) -> dict[str, Any] | None:
        """The ``config`` a ``{"model_state_dict", "config"}`` checkpoint carries, if any."""
        obj = safe_torch_load(resolved.path, mmap=True)
        return obj["config"] if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None


def state_items(path: Path) -> list[tuple[str, Any]]:
    """``(name, tensor)`` of the checkpoint's state dict, refused when it holds none."""
    obj = safe_torch_load(path, mmap=True)  # first: a file that is no checkpoint is refused without importing torch
    import torch

    if isinstance(obj, dict):
        for key in NESTED_STATE_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise XsaeError(f"{path} holds a {type(obj).__name__}, not a state dict", "save model.state_dict() (or {'model_state_dict': ...})")
    items = [(str(k), v) for k, v in obj.items() if isinstance(v, torch.Tensor)]
    if not items:
        raise XsaeError(f"{path} holds no tensors", "save model.state_dict() (or {'model_state_dict': ...})")
    return items


register_source(TorchCheckpoint())
