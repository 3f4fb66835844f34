"""The stream plumbing of a run: token counts, resume skipping, rank sharding, passes over a harvest."""

import itertools

import pytest
import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.sae.pipeline import CachedActivations, hook_dirname, rank_share, skip_rows
from xsae_cli.sae.settings import parse_tokens


def _stream(n_batches: int, size: int = 4):
    for i in range(n_batches):
        yield {"h": torch.arange(i * size, (i + 1) * size)}


def test_parse_tokens() -> None:
    assert parse_tokens("2M") == 2_000_000 and parse_tokens("500k") == 500_000 and parse_tokens("1.5B") == 1_500_000_000
    assert parse_tokens("1234") == 1234 and parse_tokens(77) == 77
    with pytest.raises(XsaeError, match="bad token count"):
        parse_tokens("two million")


def test_skip_drops_exactly_the_tokens_already_seen() -> None:
    rows = torch.cat([b["h"] for b in skip_rows(_stream(5), 6)])
    assert rows.tolist() == list(range(6, 20))


def test_shard_gives_each_rank_whole_groups() -> None:
    r0 = [b["h"][0].item() for b in rank_share(_stream(7), 0, 2)]
    r1 = [b["h"][0].item() for b in rank_share(_stream(7), 1, 2)]
    assert r0 == [0, 8, 16] and r1 == [4, 12, 20]  # the 7th batch has no partner and is dropped
    assert [b["h"][0].item() for b in rank_share(_stream(3), 0, 1)] == [0, 4, 8]


class _FakeShards:
    hooks = ["h"]

    def __len__(self) -> int:
        return 8

    def batches(self, batch_tokens, max_tokens=None, *, seed=0):
        order = torch.randperm(8, generator=torch.Generator().manual_seed(seed))
        for i in range(0, 8, batch_tokens):
            yield {"h": order[i : i + batch_tokens]}


def test_epochs_repeat_the_harvest_reshuffled() -> None:
    batches = list(itertools.islice(CachedActivations(_FakeShards(), 4, seed=0).batches(0), 4))
    first = torch.cat([b["h"] for b in batches[:2]])
    second = torch.cat([b["h"] for b in batches[2:]])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(8))
    assert first.tolist() != second.tolist()


def test_hook_dirname_is_a_safe_folder_name() -> None:
    assert hook_dirname("model.layers.15") == "model.layers.15"
    assert hook_dirname("blocks/3:mlp") == "blocks_3_mlp"


def test_in_memory_rows_resume_where_the_stream_was() -> None:
    from xsae_cli.sae.pipeline import InMemoryActivations

    rows = {"h": torch.arange(10).float()[:, None]}
    src = InMemoryActivations(rows, 4, seed=3)
    whole = torch.cat([b["h"] for b in itertools.islice(src.batches(0), 9)])  # 3 batches a pass (4, 4, 2)
    resumed = torch.cat([b["h"] for b in itertools.islice(src.batches(14), 5)])
    assert torch.equal(resumed[:6], whole[14:20])
