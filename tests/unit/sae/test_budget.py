"""The disk a cached harvest needs: the formula, the dtype choice, and the refusal when it will not fit."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest
import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.sae import budget
from xsae_cli.sae.budget import cache_bytes, cache_dtype_for, check_free_space


def test_the_formula_gives_the_issues_figures_and_halves_in_bf16() -> None:
    f32 = cache_bytes(50_000_000, {"model.layers.16": 4096}, torch.float32)
    bf16 = cache_bytes(50_000_000, {"model.layers.16": 4096}, torch.bfloat16)
    assert 819e9 < f32 < 820e9  # the 7B DDP recipe's 50M tokens x 4096 in float32: ~820 GB
    assert abs(f32 - 2 * bf16) < 1e6
    assert cache_bytes(10, {"a": 3, "b": 5}, torch.float16) == 10 * 8 * 2 + 512


def test_auto_is_the_models_dtype() -> None:
    assert cache_dtype_for("auto", torch.bfloat16) is torch.bfloat16
    assert cache_dtype_for("auto", torch.float32) is torch.float32
    assert cache_dtype_for("float16", torch.float32) is torch.float16


def test_a_cache_that_will_not_fit_is_refused_with_both_figures(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(budget.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 123_456, 123_456))
    assert check_free_space(tmp_path / "not" / "yet", 1000) == 123_456  # a folder not made yet: its parent's disk
    with pytest.raises(XsaeError, match=r"needs 2,000,000 bytes \(2.0 MB\) but .* has 123,456 bytes \(123.5 KB\) free"):
        check_free_space(tmp_path / "cache", 2_000_000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_formula_matches_a_real_harvest_on_disk(tiny_gpt2_dir: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    from transformers import GPT2LMHeadModel

    from xsae_cli.data.activations import ActivationStore, ShardedActivations
    from xsae_cli.data.corpus import TokenContexts

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    ids = torch.randint(1, 100, (40, 32), generator=torch.Generator().manual_seed(0))
    ctx = TokenContexts(ids, torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool), True, 40)
    store = ActivationStore(model, None, ["transformer.h.0", "transformer.h.1"], ctx, dtype=dtype, drop_special=False, shuffle=False)
    out = store.save_shards(tmp_path / "cache", shard_tokens=300)
    shards = ShardedActivations(out)
    on_disk = sum(f.stat().st_size for f in out.glob("shard_*.safetensors"))
    formula = cache_bytes(len(shards), shards.d_in, dtype, shard_tokens=300)
    payload = len(shards) * 32 * dtype.itemsize
    assert len(shards) == 1280 and payload <= on_disk <= formula  # headers within the allowance
    assert formula - on_disk < 5 * budget.SHARD_HEADER_BYTES
    assert next(iter(shards.load().values())).dtype == dtype
