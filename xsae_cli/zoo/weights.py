"""Stream a model's tensors one at a time, without building the model.

Safetensors are memory-mapped (only the tensor being yielded is paged in); GGUF tensors are
dequantised one by one from a memory-mapped reader; PyTorch checkpoints are opened with
``weights_only=True`` and ``mmap=True`` so tensors stay on disk until touched. Peak memory is
therefore about one tensor plus a fixed overhead, whatever the model's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import check_safetensors, safe_torch_load
from xsae_cli.zoo.sources import ResolvedModel

NESTED_STATE_KEYS = ("model_state_dict", "state_dict", "model")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def tensor_index(resolved: ResolvedModel) -> list[TensorInfo]:
    """Names, shapes and dtypes of every tensor, read from headers only where the format allows."""
    out: list[TensorInfo] = []
    for f in resolved.weight_files:
        suffix = f.suffix.lower()
        if suffix == ".safetensors":
            header = check_safetensors(f)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                out.append(TensorInfo(name, tuple(meta["shape"]), _ST_DTYPES.get(meta["dtype"], meta["dtype"].lower()), f.name))
        elif suffix == ".gguf":
            for name, t in _gguf_tensors(f):
                out.append(TensorInfo(name, tuple(int(s) for s in reversed(list(t.shape))), "float32", f.name))
        else:
            for name, t in _pt_items(f):
                out.append(TensorInfo(name, tuple(t.shape), str(t.dtype).replace("torch.", ""), f.name))
    return out


def iter_weights(resolved: ResolvedModel) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, tensor)`` for every tensor of the model, one at a time, in file order."""
    for f in resolved.weight_files:
        suffix = f.suffix.lower()
        if suffix == ".safetensors":
            yield from _iter_safetensors(f)
        elif suffix == ".gguf":
            yield from _iter_gguf(f)
        else:
            for name, t in _pt_items(f):
                yield name, t


_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _iter_safetensors(path: Path) -> Iterator[tuple[str, Any]]:
    """One private memory map per tensor, released when the consumer drops the tensor.

    ``safe_open`` maps the whole file, so every page ever touched stays resident until the file
    is closed: streaming a 7B model would grow RSS to the model's size. Mapping each tensor's
    byte range on its own keeps peak memory at about one tensor.
    """
    import mmap

    import torch

    header = check_safetensors(path)
    data_start = 8 + int.from_bytes(path.open("rb").read(8), "little")
    items = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
    gran = mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as fh:
        for name, meta in items:
            begin, end = meta["data_offsets"]
            dtype = getattr(torch, _TORCH_DTYPES.get(meta["dtype"], "")) if meta["dtype"] in _TORCH_DTYPES else None
            if dtype is None:
                raise XsaeError(f"{path}: tensor {name} has dtype {meta['dtype']}, which xsae cannot stream", "convert the file to float32/16 or bfloat16")
            shape = tuple(meta["shape"])
            if end == begin:
                yield name, torch.empty(shape, dtype=dtype)
                continue
            start = data_start + begin
            aligned = start - start % gran
            mm = mmap.mmap(fh.fileno(), length=end - begin + (start - aligned), offset=aligned, access=mmap.ACCESS_COPY)
            flat = torch.frombuffer(mm, dtype=dtype, offset=start - aligned, count=(end - begin) // dtype.itemsize)
            yield name, flat.view(shape)
            del flat, mm


def _gguf_tensors(path: Path) -> list[tuple[str, Any]]:
    import gguf

    from xsae_cli.zoo.sources import check_gguf

    check_gguf(path)
    reader = gguf.GGUFReader(str(path))
    return [(t.name, t) for t in reader.tensors]


def _iter_gguf(path: Path) -> Iterator[tuple[str, Any]]:
    """GGUF tensors under their GGUF names (``blk.N.attn_q.weight``), dequantised to float32."""
    import gguf
    import numpy as np
    import torch

    for name, t in _gguf_tensors(path):
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        yield name, torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))


def _pt_items(path: Path) -> list[tuple[str, Any]]:
    import torch

    obj = safe_torch_load(path, mmap=True)
    if isinstance(obj, dict):
        for key in NESTED_STATE_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise XsaeError(f"{path} holds a {type(obj).__name__}, not a state dict", "save model.state_dict() (or {'model_state_dict': ...})")
    items = [(k, v) for k, v in obj.items() if isinstance(v, torch.Tensor)]
    if not items:
        raise XsaeError(f"{path} holds no tensors", "save model.state_dict() (or {'model_state_dict': ...})")
    return items


def pt_checkpoint_config(path: Path) -> dict[str, Any] | None:
    """The ``config`` a ``{"model_state_dict", "config"}`` checkpoint carries, if any."""
    obj = safe_torch_load(path, mmap=True)
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        return obj["config"]
    return None
