"""Streaming, distributed harvest: every rank runs the model on its own shard of the corpus.

Under a launcher the model forward, not the SAE step, dominates SAE training on a large model
(a 7B model hooked at layer 16 of 32: ~6.5 GFLOP per token to the hook, against ~0.6 GFLOP per
token for a TopK step at 4096 x 65536), so every rank loads the model on its own device, reads a
disjoint shard of the training documents and trains on what it harvests; gradients are averaged
across ranks as for a cached harvest. Nothing is written to disk.

Sharding is by document, before tokenising: the training documents (what is left after the
seeded held-out split) are cut into ``world`` contiguous ranges, rank ``r`` taking
``[r * n // world, (r + 1) * n // world)``. The shards are disjoint and their union is what a
single process reads; they depend only on the seed (through the split) and the world size.

Each rank's stream is an endless sequence of passes over its shard (pass ``e`` shuffled with seed
``seed + 1000 * rank + e``), cut into full batches of ``batch_size`` rows, so every rank runs the
same number of steps and no rank leaves an all-reduce early. Resume is exact: after ``T`` global
tokens each rank is ``T / world`` rows into its own deterministic stream; the checkpoint records
every rank's position (pass, rows into the pass, rows in all) and a resumed stream replays to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.sae.pipeline import Batch, skip_rows

__all__ = ["StreamingActivations", "check_shards", "shard_range"]


def shard_range(n_documents: int, rank: int, world: int) -> tuple[int, int]:
    """The training documents ``[start, end)`` rank ``rank`` of ``world`` reads."""
    return rank * n_documents // world, (rank + 1) * n_documents // world


def check_shards(n_documents: int, world: int) -> None:
    """Refuse a launch in which some rank would read no document (before any model is loaded)."""
    if n_documents < world:
        raise XsaeError(
            f"the corpus has {n_documents} training document(s) for {world} ranks: {world - n_documents} rank(s) would see no documents",
            "use a larger corpus (at least one training document per rank) or fewer processes",
        )


@dataclass
class StreamingActivations:
    """One rank's endless, resumable activation stream over its shard of the corpus.

    ``store_for(seed)`` gives an :class:`~xsae_cli.data.activations.ActivationStore` over this
    rank's contexts shuffled with ``seed``; every pass builds one and takes its batches.
    """

    hooks: list[str]
    widths: dict[str, int]
    store_for: Callable[[int], Any]
    batch_tokens: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    documents: tuple[int, int] = (0, 0)
    contexts: int = 0
    position: dict[str, int] = field(default_factory=lambda: {"pass": 0, "rows_in_pass": 0, "rows": 0})
    totals: dict[str, float] = field(default_factory=lambda: {"tokens_seen": 0, "tokens_kept": 0, "dropped_special": 0, "forwards": 0, "seconds": 0.0})

    @property
    def d_in(self) -> dict[str, int]:
        return dict(self.widths)

    def _passes(self) -> Iterator[Batch]:
        epoch = 0
        while True:
            store = self.store_for(self.seed + 1000 * self.rank + epoch)
            rows_in_pass = 0
            counted: dict[str, int] = {}
            t0 = time.perf_counter()
            for batch in store.batches(self.batch_tokens):
                n = int(next(iter(batch.values())).shape[0])
                if n < self.batch_tokens:  # a pass's tail: every rank's batches stay full
                    break
                rows_in_pass += n
                self.position = {"pass": epoch, "rows_in_pass": rows_in_pass, "rows": self.position["rows"] + n}
                self._count(store, counted, time.perf_counter() - t0)
                yield batch
                t0 = time.perf_counter()
            self._count(store, counted, time.perf_counter() - t0)
            if rows_in_pass == 0:
                raise XsaeError(
                    f"rank {self.rank}'s shard (documents {self.documents[0]}-{self.documents[1]}) gives fewer than {self.batch_tokens} token activations",
                    "use a larger corpus, fewer processes or a smaller --batch-size",
                )
            epoch += 1

    def _count(self, store: Any, counted: dict[str, int], seconds: float) -> None:
        """Add what ``store`` harvested since the last count of this pass to the rank's totals."""
        for key in ("tokens_seen", "tokens_kept", "dropped_special", "forwards"):
            value = int(getattr(store.stats, key))
            self.totals[key] += value - counted.get(key, 0)
            counted[key] = value
        self.totals["seconds"] += seconds

    def batches(self, skip_tokens: int) -> Iterator[Batch]:
        """This rank's stream after ``skip_tokens`` global tokens (``skip_tokens / world`` of its own rows)."""
        self.position = {"pass": 0, "rows_in_pass": 0, "rows": 0}
        return skip_rows(self._passes(), skip_tokens // self.world)

    def report(self) -> dict[str, Any]:
        """This rank's line of ``harvest_per_rank`` in metrics.json."""
        return {
            "rank": self.rank,
            "documents": list(self.documents),
            "n_documents": self.documents[1] - self.documents[0],
            "contexts": self.contexts,
            "tokens_seen": int(self.totals["tokens_seen"]),
            "tokens_kept": int(self.totals["tokens_kept"]),
            "forwards": int(self.totals["forwards"]),
            "seconds": round(float(self.totals["seconds"]), 3),
            "position": dict(self.position),
        }


def gather(obj: Any, world: int) -> list[Any]:
    """Every rank's ``obj`` on every rank (``[obj]`` when alone)."""
    if world <= 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out
