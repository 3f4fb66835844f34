"""Streaming harvest: document shards, the refusal of empty ranks, and an exactly resumable stream."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.sae.streaming import StreamingActivations, check_shards, shard_range


@pytest.mark.parametrize("n, world", [(1, 1), (7, 2), (8, 3), (1535, 8), (5, 5)])
def test_shards_are_disjoint_and_cover_the_documents(n: int, world: int) -> None:
    ranges = [shard_range(n, r, world) for r in range(world)]
    docs = [d for a, b in ranges for d in range(a, b)]
    assert docs == list(range(n))  # disjoint, in order, and their union is what one process reads
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_a_launch_with_an_empty_rank_is_refused_with_the_counts() -> None:
    check_shards(2, 2)
    with pytest.raises(XsaeError, match=r"3 training document.*for 4 ranks: 1 rank"):
        check_shards(3, 4)


class _Stats:
    tokens_seen = tokens_kept = dropped_special = forwards = 0


class _Store:
    """A stand-in store: rows 0..n-1 shuffled by the seed, in batches."""

    def __init__(self, seed: int, n: int = 50) -> None:
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).float()
        self.stats = _Stats()

    def batches(self, size: int) -> Any:
        for s in range(0, len(self.order), size):
            self.stats.tokens_kept += len(self.order[s : s + size])
            yield {"h": self.order[s : s + size, None]}


def _rows(source: StreamingActivations, skip: int, count: int) -> list[float]:
    out: list[float] = []
    for batch in source.batches(skip):
        out += batch["h"][:, 0].tolist()
        if len(out) >= count:
            break
    return out[:count]


def test_the_stream_passes_again_in_full_batches_and_resumes_at_its_position() -> None:
    src = StreamingActivations(["h"], {"h": 1}, _Store, batch_tokens=8, seed=3, rank=1, world=2)
    full = _rows(src, 0, 96)
    assert sorted(full[:48]) == sorted(_Store(1003).order[:48].tolist())  # pass 0: seed + 1000 * rank
    assert full[48:56] == _Store(1004).order[:8].tolist()  # the 2-row tail is dropped, pass 1 reshuffled
    # 40 global tokens = 20 of this rank's rows: a resumed stream continues exactly there
    assert _rows(src, 40, 76) == full[20:]
    assert src.position["pass"] == 1 and src.position["rows"] == 96
