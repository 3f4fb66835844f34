"""Stream a model's tensors one at a time, without building the model.

Every format is read by its source (:mod:`zoo.sources`): safetensors are memory-mapped (only the
tensor being yielded is paged in); GGUF tensors are dequantised one by one from a memory-mapped
reader; PyTorch checkpoints are opened with ``weights_only=True`` and ``mmap=True`` so tensors
stay on disk until touched. Peak memory is therefore about one tensor plus a fixed overhead,
whatever the model's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xsae_cli.zoo.sources import ResolvedModel


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its file describes it: no data read."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str
    nbytes: int | None = None  # bytes it takes in its file (quantised GGUF tensors: their packed size)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def tensor_index(resolved: ResolvedModel) -> list[TensorInfo]:
    """Names, shapes, dtypes and bytes of every tensor, read from headers only where the format allows."""
    return resolved.handler.tensor_index(resolved)


def iter_weights(resolved: ResolvedModel) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, tensor)`` for every tensor of the model, one at a time, in file order."""
    return resolved.handler.iter_weights(resolved)


def weight_rows(resolved: ResolvedModel, limit: int | None = None, stats: bool = False) -> list[dict[str, Any]]:
    """What ``xsae zoo weights`` shows: name, shape and dtype per tensor from the index alone, or,
    with ``stats``, every tensor streamed once with its mean and std (peak memory: one tensor)."""
    rows: list[dict[str, Any]] = []
    if not stats:
        for t in tensor_index(resolved)[:limit]:
            rows.append({"name": t.name, "shape": list(t.shape), "dtype": t.dtype})
        return rows
    for i, (name, t) in enumerate(iter_weights(resolved)):
        if limit is not None and i >= limit:
            break
        f = t.float()
        rows.append({"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "mean": float(f.mean()), "std": float(f.std()) if f.numel() > 1 else 0.0})
    return rows
