"""Tokenised models cached on disk as memory-mapped ``.npy`` shards; window sampling.

A model's chunks live under ``XSAE_CACHE/sane/<sha256[:16]>-c<chunk_size>-<scheme_id>/``: one
``.npy`` per per-chunk array plus ``manifest.json`` (the tensor table). The arrays are written
by appending one tensor's chunks at a time to files whose ``.npy`` header is written first (the
total chunk count is known from the header-only tensor index), so tokenising holds at most one
tensor and its chunks in RAM, whatever the model's size. Reading memory-maps them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xsae_cli.core.config import xsae_cache
from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import atomic_dir, atomic_write_json, read_json
from xsae_cli.sane.tokenizer import (
    EPS,
    KIND_ID,
    N_STATS,
    CoordScheme,
    model_chunk_count,
    tokenize_stream,
)

CACHE_VERSION = 2
ARRAYS: dict[str, tuple[str, tuple[int, ...]]] = {
    # name: (dtype, trailing shape). Only values and the owning tensor are stored per chunk; depth,
    # position, kind, fill and scale are rebuilt from the tensor table when a window is read.
    "values": ("float16", ()),  # trailing shape filled with (chunk_size,)
    "tensor_id": ("int32", ()),
}
# Tensor kinds whose rows may be permuted as a weight-space symmetry (neurons, heads, residual coords).
PERMUTABLE_KINDS = {KIND_ID[k] for k in ("attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "mlp_up", "mlp_gate", "mlp_down")}


def sane_cache_dir() -> Path:
    return xsae_cache() / "sane"


@dataclass(frozen=True)
class ModelSource:
    """A model to tokenise: its name, resolved files and the sha256 of its weights."""

    name: str
    resolved: Any
    sha256: str


def model_source(name: str) -> ModelSource:
    """A catalogued zoo name (sha256 from the catalogue) or a path (sha256 computed now)."""
    from xsae_cli.zoo.registry import Registry, resolve_entry
    from xsae_cli.zoo.sources import file_sha256

    registry = Registry()
    entry = registry.find(name.lower())
    resolved = resolve_entry(name, registry)
    sha = entry.sha256 if entry is not None and entry.sha256 else file_sha256(list(resolved.weight_files))
    return ModelSource(entry.name if entry is not None else name, resolved, sha)


class _NpyAppender:
    """Write a ``.npy`` header for a known final shape, then append rows."""

    def __init__(self, path: Path, dtype: str, shape: tuple[int, ...], durable: bool = False) -> None:
        self.path = path
        self.durable = durable
        self.dtype = np.dtype(dtype)
        self.shape = shape
        self.rows = 0
        self.fh = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.fh, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape})

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if arr.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.path.name}: row shape {arr.shape[1:]} != {self.shape[1:]}")
        self.fh.write(arr.reshape(-1).view(np.uint8).tobytes())
        self.rows += arr.shape[0]

    def close(self) -> None:
        self.fh.flush()
        if self.durable:
            os.fsync(self.fh.fileno())
        self.fh.close()
        if self.rows != self.shape[0]:
            raise RuntimeError(f"{self.path.name}: wrote {self.rows} rows, header says {self.shape[0]}")


def config_digest(resolved: Any) -> str:
    """Ten hex digits of the model's config (``config.json`` or what its checkpoint carries), or ""
    without one. The config decides the chunks as much as the weights do: the derived views read the
    anatomy (family, head split, tying) from it, so a changed config must not be served the old cache."""
    config = getattr(resolved, "config", None)
    if not config:
        return ""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def cache_key(sha256: str, chunk_size: int, scheme: CoordScheme, config: str = "") -> str:
    """The cache folder of a model: its weights' sha256, its config's digest, the chunk size and
    the coordinate scheme (view, view revision, anatomy settings)."""
    cfg = f"-k{config}" if config else ""
    return f"{sha256[:16]}{cfg}-c{chunk_size}-{scheme.scheme_id}-v{CACHE_VERSION}"


def model_view(resolved: Any, scheme: CoordScheme, warn: Callable[[str], None] | None = None, strict: bool = False) -> tuple[list[Any], Iterator[tuple[str, Any]], dict[str, Any]]:
    """``(index, stream, info)`` of what is tokenised under the scheme's view (:mod:`views`); a model
    the view cannot read falls back along its chain (circuits -> canonical -> weights) with a warning."""
    from xsae_cli.sane.views import produce

    return produce(scheme.view, resolved, warn, strict=strict)


def tokenize_to_cache(
    source: ModelSource,
    chunk_size: int = 64,
    scheme: CoordScheme = CoordScheme(),
    cache_dir: Path | None = None,
    force: bool = False,
    warn: Callable[[str], None] | None = None,
    on_tensor: Callable[[int, int], None] | None = None,
    durable: bool = False,
    strict: bool = False,
) -> Path:
    """Tokenise ``source`` into its cache folder (once); return the folder (``strict``: a model
    the view cannot read is refused instead of falling back).

    ``on_tensor(chunks_done, bytes_read)`` is called after each tensor (for progress bars).
    The folder appears only when complete (built under a temporary name), so an interrupted or
    killed run leaves no partial cache. The arrays are not fsynced unless ``durable`` (it would
    double the time; the cache is derived data that ``--force`` rebuilds after a power loss).
    """
    root = Path(cache_dir) if cache_dir else sane_cache_dir()
    target = root / cache_key(source.sha256, chunk_size, scheme, config_digest(source.resolved))
    if (target / "manifest.json").exists() and not force:
        return target
    t0 = time.perf_counter()
    index, weights, view = model_view(source.resolved, scheme, warn, strict=strict)
    total = model_chunk_count(index, chunk_size)
    if total == 0:
        raise XsaeError(f"model '{source.name}' has no floating-point tensors to tokenise", "check that the files hold weights")
    tensors: list[dict[str, Any]] = []
    with atomic_dir(target, force=True) as tmp:
        writers = {k: _NpyAppender(tmp / f"{k}.npy", dt, (total, chunk_size) if k == "values" else (total, *trail), durable) for k, (dt, trail) in ARRAYS.items()}
        start = 0
        bytes_read = 0
        try:
            for tid, block in enumerate(tokenize_stream(index, weights, chunk_size, scheme, warn=warn)):
                writers["values"].append(block.values)
                writers["tensor_id"].append(np.full(block.n, tid, dtype=np.int32))
                shape = block.shape
                row_chunks = shape[-1] // chunk_size if len(shape) == 2 and shape[-1] % chunk_size == 0 else 0
                tensors.append(
                    {
                        "name": block.name,
                        "start": start,
                        "n_chunks": block.n,
                        "shape": list(shape),
                        "kind": int(block.kind[0]),
                        "depth": float(block.depth[0]),
                        "mean": block.mean,
                        "std": block.std,
                        "numel": int(np.prod(shape, dtype=np.int64)) if shape else 1,
                        "row_chunks": row_chunks,
                    }
                )
                start += block.n
                numel = 1
                for s in shape:
                    numel *= s
                bytes_read += numel * 4
                del block
                if on_tensor is not None:
                    on_tensor(start, bytes_read)
        finally:
            for w in writers.values():
                try:
                    w.close()
                except RuntimeError:
                    if start == total:
                        raise
        if start != total:
            raise XsaeError(f"model '{source.name}': streamed {start} chunks but its index promises {total}", "the weight files may have changed while reading; run again")
        atomic_write_json(
            tmp / "manifest.json",
            {
                "cache_version": CACHE_VERSION,
                "model": source.name,
                "sha256": source.sha256,
                "chunk_size": chunk_size,
                "scheme": scheme.scheme_id,
                "coord_scheme": scheme.record(chunk_size),
                "n_chunks": total,
                "n_tensors": len(tensors),
                "view": view,
                "seconds": time.perf_counter() - t0,
                "tensors": tensors,
            },
        )
    return target


class TokenizedModel:
    """A cached model, memory-mapped: windows are read without loading the whole model."""

    def __init__(self, folder: Path, name: str | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = read_json(self.folder / "manifest.json", "SANE cache manifest")
        self.name = name or self.manifest["model"]
        self.chunk_size = int(self.manifest["chunk_size"])
        self.scheme = self.manifest["scheme"]
        record = self.manifest.get("coord_scheme")  # caches written before schemes were stored as data: from the id
        self.coord_scheme = CoordScheme.from_record(record) if isinstance(record, dict) else CoordScheme.from_id(self.scheme)
        self.n_chunks = int(self.manifest["n_chunks"])
        self.arrays = {k: np.load(self.folder / f"{k}.npy", mmap_mode="r") for k in ARRAYS}
        t = self.manifest["tensors"]
        self.t_start = np.array([x["start"] for x in t], dtype=np.int64)
        self.t_n = np.array([x["n_chunks"] for x in t], dtype=np.int64)
        self.t_numel = np.array([x["numel"] for x in t], dtype=np.int64)
        self.t_rows = np.array([x["row_chunks"] for x in t], dtype=np.int64)
        self.t_kind = np.array([x["kind"] for x in t], dtype=np.int64)
        self.t_depth = np.array([x["depth"] for x in t], dtype=np.float32)
        self.t_stats = np.array([[x["mean"], math.log10(x["std"] + EPS), math.log10(max(x["numel"], 1))] for x in t], dtype=np.float32).reshape(-1, N_STATS)

    def n_windows(self, window_size: int) -> int:
        return -(-self.n_chunks // window_size)

    def window(self, start: int, size: int) -> dict[str, np.ndarray]:
        """Chunks ``[start, start + size)``; past the end is zero padding with ``mask`` False."""
        end = min(start + size, self.n_chunks)
        n = max(end - start, 0)
        c = self.chunk_size
        values = np.zeros((size, c), dtype=np.float32)
        values[:n] = self.arrays["values"][start:end]
        tid = np.zeros(size, dtype=np.int64)
        tid[:n] = self.arrays["tensor_id"][start:end]
        mask = np.zeros(size, dtype=bool)
        mask[:n] = True
        index = np.arange(start, start + size, dtype=np.int64)
        local = index - self.t_start[tid]
        t_n = self.t_n[tid]
        last_fill = self.t_numel[tid] - (t_n - 1) * c
        return {
            "values": values,
            "valid": np.where(mask, np.where(local == t_n - 1, last_fill, c), 0).astype(np.int16),
            "depth": np.where(mask, self.t_depth[tid], 0).astype(np.float32),
            "pos": np.where(mask, (local + 0.5) / t_n, 0).astype(np.float32),
            "kind": np.where(mask, self.t_kind[tid], 0).astype(np.int8),
            "stats": np.where(mask[:, None], self.t_stats[tid], 0).astype(np.float32),
            "tensor_id": tid.astype(np.int32),
            "mask": mask,
            "index": index,
        }

    def cover_starts(self, window_size: int) -> list[int]:
        return list(range(0, self.n_chunks, window_size))


def load_or_tokenize(
    name: str,
    chunk_size: int = 64,
    scheme: CoordScheme = CoordScheme(),
    warn: Callable[[str], None] | None = None,
    on_tensor: Callable[[int, int], None] | None = None,
) -> TokenizedModel:
    src = model_source(name)
    folder = tokenize_to_cache(src, chunk_size, scheme, warn=warn, on_tensor=on_tensor)
    return TokenizedModel(folder, src.name)


def _complete_rows(win: dict[str, np.ndarray], model: TokenizedModel) -> Iterator[tuple[int, int, int, int]]:
    """For every permutable tensor in the window: (row length in chunks, window offset of the
    tensor's chunk 0, first and end row fully inside the window). Both permutations act on these."""
    idx = win["index"]
    mask = win["mask"]
    tid = win["tensor_id"].astype(np.int64)
    for t in np.unique(tid[mask]):
        rows = int(model.t_rows[t])
        if rows <= 0 or int(model.t_kind[t]) not in PERMUTABLE_KINDS:
            continue
        sel = np.nonzero(mask & (tid == t))[0]
        local = idx[sel] - model.t_start[t]
        first_row = -(-int(local[0]) // rows)
        last_row = (int(local[-1]) + 1) // rows  # exclusive: rows fully inside the window
        yield rows, int(sel[0] - local[0]), first_row, last_row


def permute_rows(win: dict[str, np.ndarray], model: TokenizedModel, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Permute whole weight rows (neurons, head dims, residual coords) of attention/MLP tensors.

    For every permutable tensor whose rows are whole chunks, the complete rows inside the window
    are shuffled among themselves (values move; coordinates stay with the slot), mimicking the
    function-preserving permutation symmetry of weight space on the part of the tensor seen.
    """
    values = win["values"]
    out = values.copy()
    for rows, base, first_row, last_row in _complete_rows(win, model):
        n_rows = last_row - first_row
        if n_rows < 2:
            continue
        perm = rng.permutation(n_rows)
        src = (first_row + perm)[:, None] * rows + np.arange(rows)[None, :]
        dst = (first_row + np.arange(n_rows))[:, None] * rows + np.arange(rows)[None, :]
        out[base + dst.reshape(-1)] = values[base + src.reshape(-1)]
    return dict(win, values=out)


def permute_columns(win: dict[str, np.ndarray], model: TokenizedModel, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Permute the input coordinates of attention/MLP tensors: one shared shuffle of the columns of
    all complete rows of a tensor inside the window (the other half of the permutation symmetry:
    a neuron or residual-stream permutation of the layer before moves a weight matrix's columns)."""
    values = win["values"]
    out = values.copy()
    c = model.chunk_size
    for rows, base, first_row, last_row in _complete_rows(win, model):
        if last_row <= first_row:
            continue
        lo, hi = base + first_row * rows, base + last_row * rows
        block = values[lo:hi].reshape(last_row - first_row, rows * c)
        out[lo:hi] = block[:, rng.permutation(rows * c)].reshape(-1, c)
    return dict(win, values=out)


class WindowSampler:
    """Random windows of ``window_size`` chunks; models drawn uniformly so big ones don't dominate."""

    def __init__(self, models: list[TokenizedModel], window_size: int) -> None:
        if not models:
            raise XsaeError("no models to sample windows from", "name at least one model")
        self.models = models
        self.window_size = window_size

    def sample(self, rng: np.random.Generator) -> tuple[int, dict[str, np.ndarray]]:
        m = int(rng.integers(len(self.models)))
        model = self.models[m]
        hi = max(model.n_chunks - self.window_size, 0)
        start = int(rng.integers(hi + 1))
        return m, model.window(start, self.window_size)

    def batches(self, rng: np.random.Generator, batch_size: int, n_batches: int) -> Iterator[list[tuple[int, dict[str, np.ndarray]]]]:
        for _ in range(n_batches):
            yield [self.sample(rng) for _ in range(batch_size)]


def collate(windows: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    import torch

    keys = ("values", "valid", "depth", "pos", "kind", "stats", "mask")
    out = {}
    for k in keys:
        arr = np.stack([w[k] for w in windows])
        t = torch.from_numpy(arr)
        if k == "kind":
            t = t.long()
        elif k == "valid":
            t = t.float()
        out[k] = t
    return out
