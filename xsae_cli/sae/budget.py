"""What a run costs on disk, from the formula the harvest cache follows, checked before the harvest.

A cached harvest stores every kept token's activation at every hook: ``tokens x sum(d_in) x bytes
per element`` plus safetensors headers (a few hundred bytes per shard of 65,536 rows). For the 7B
DDP recipe (50M tokens, d_in 4096) that is 819 GB in float32 and 410 GB in bfloat16; streaming
writes nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from xsae_cli.core.errors import XsaeError

__all__ = ["CACHE_DTYPES", "cache_bytes", "cache_dtype_for", "check_free_space", "human_bytes"]

CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32")
SHARD_HEADER_BYTES = 512  # a safetensors header per shard (JSON with one entry per hook), rounded up


def cache_dtype_for(choice: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a cache is stored in: the choice, or ``auto``: the model's own (bf16 for a bf16 model)."""
    if choice == "auto":
        return model_dtype if model_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
    if choice not in CACHE_DTYPES:
        raise XsaeError(f"unknown cache dtype '{choice}'", f"use one of: {', '.join(CACHE_DTYPES)}")
    return getattr(torch, choice)


def cache_bytes(tokens: int, d_in: Mapping[str, int], dtype: torch.dtype, shard_tokens: int = 65536) -> int:
    """Bytes on disk of a cache of ``tokens`` rows at hooks of widths ``d_in`` stored in ``dtype``."""
    item = torch.empty((), dtype=dtype).element_size()
    shards = -(-int(tokens) // shard_tokens)
    return int(tokens) * sum(int(d) for d in d_in.values()) * item + shards * SHARD_HEADER_BYTES


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(path: str | Path, needed: int, what: str = "the activation cache") -> int:
    """Refuse (one line, both figures) when ``needed`` bytes will not fit where ``path`` will be; return the free bytes."""
    free = int(shutil.disk_usage(_existing(Path(path))).free)
    if needed > free:
        raise XsaeError(
            f"{what} needs {needed:,} bytes ({human_bytes(needed)}) but {_existing(Path(path))} has {free:,} bytes ({human_bytes(free)}) free",
            "free disk space, point XSAE_CACHE at a larger disk, pass --cache-dtype bfloat16, or stream (--no-cache)",
        )
    return free


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
