"""What a run costs on disk, from the formula the harvest cache follows, checked before the harvest.

A cached harvest stores every kept token's activation at every hook: ``tokens x sum(d_in) x bytes
per element`` plus safetensors headers (a few hundred bytes per shard of 65,536 rows). For the 7B
DDP recipe (50M tokens, d_in 4096) that is 819 GB in float32 and 410 GB in bfloat16; streaming
writes nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from xsae_cli.core.errors import XsaeError

__all__ = ["CACHE_DTYPES", "RecipeBudget", "budget_line", "cache_bytes", "cache_dtype_for", "check_free_space", "human_bytes", "recipe_budget"]

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


@dataclass(frozen=True)
class RecipeBudget:
    """A launch's GPU memory on its busiest rank and its disk, in bytes, by part."""

    model: int  # the base model's weights held by that rank
    sae: int  # SAE weights, gradients and optimizer state held by that rank (fp32)
    working: int  # the shuffle buffer and one batch's dense codes
    disk: int  # the activation cache (0 when streaming)

    @property
    def gpu_per_rank(self) -> int:
        return self.model + self.sae + self.working


def recipe_budget(
    *,
    params: float,
    model_bytes: int,
    d_in: int,
    expansion: int,
    batch: int,
    tokens: int,
    world: int,
    zero_stage: int = 0,
    optimizer_states: int = 1,
    streaming: bool = True,
    model_split: bool = False,
    cache_item_bytes: int = 2,
) -> RecipeBudget:
    """GPU memory per rank and disk of ``xsae sae train`` under a launcher, from the sizes it is given.

    Model: ``params x model_bytes`` on every rank when streaming, divided by ``world`` when it is
    split over the GPUs (``model_split``: --device-map or ZeRO-3 partitioning). SAE: fp32 weights
    ``2 d_in d_sae + d_sae + d_in``, as many gradients, ``optimizer_states`` copies of optimizer state
    (2 for Adam, 1 for schedule-free signum); ZeRO-1 splits the optimizer state over the ranks, ZeRO-2
    the gradients too, ZeRO-3 the weights too. Working memory: the shuffle buffer (up to 1.5 x 65,536
    rows of ``d_in`` fp32 when streaming) plus ~3 fp32 ``batch x d_sae`` tensors (pre-activations,
    their gradient, the codes). The forward's own transient memory (one batch of contexts) is not counted.
    Disk: a cached harvest's :func:`cache_bytes` in ``cache_item_bytes`` per element, 0 when streaming.
    """
    d_sae = d_in * expansion
    weights = (2 * d_in * d_sae + d_sae + d_in) * 4
    grads, states = weights, optimizer_states * weights
    if zero_stage >= 1:
        states //= world
    if zero_stage >= 2:
        grads //= world
    if zero_stage >= 3:
        weights //= world
    model = int(params * model_bytes / (world if model_split else 1))
    buffer = int(1.5 * min(65536, -(-tokens // world)) * d_in * 4) if streaming else 0
    working = buffer + 3 * batch * d_sae * 4
    disk = 0 if streaming else cache_bytes(tokens, {"hook": d_in}, {1: torch.uint8, 2: torch.bfloat16, 4: torch.float32}[cache_item_bytes])
    return RecipeBudget(model, weights + grads + states, working, disk)


def budget_line(b: RecipeBudget) -> str:
    """The header line a recipe states its budget in (tests/e2e/test_recipes.py checks it against the formula)."""
    return (
        f"# Budget (xsae_cli/sae/budget.py recipe_budget): GPU memory per rank {human_bytes(b.gpu_per_rank)} "
        f"(model {human_bytes(b.model)} + SAE {human_bytes(b.sae)} + working {human_bytes(b.working)}), disk {human_bytes(b.disk)}"
    )
