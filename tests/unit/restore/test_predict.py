"""Gap parsing and beam search, on a stub model whose probabilities are known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xsae_cli.core.errors import XsaeError
from xsae_cli.restore.data import Vocab
from xsae_cli.restore.model import RestorationConfig
from xsae_cli.restore.predict import find_gaps, restore_text

VOCAB = Vocab(list("abc- "))


class Stub(nn.Module):
    """Prefers 'b' right after a 'b' or after 'a', 'a' elsewhere; fixed logits otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.config = RestorationConfig(vocab_size=len(VOCAB), max_position=64, d_model=8, n_heads=2, d_ff=8, n_layers=1)
        self.calls = 0

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        a, b = VOCAB.index("a"), VOCAB.index("b")
        logits = torch.zeros(*ids.shape, len(VOCAB))
        logits[..., a] = 2.0
        prev = torch.cat([torch.full_like(ids[:, :1], -1), ids[:, :-1]], 1)
        after = (prev == b) | (prev == a)
        logits[..., b] += 3.0 * after
        return logits


def test_gaps_and_their_lengths() -> None:
    gaps = find_gaps("a-na [...] be-li2 [x] [x x] [...]", 1, 6)
    assert [g.source for g in gaps] == ["[...]", "[x]", "[x x]", "[...]"]
    assert gaps[0].lengths == list(range(1, 7))
    assert gaps[1].lengths == [1, 2, 3] and gaps[2].lengths == list(range(2, 8))
    with pytest.raises(XsaeError):
        find_gaps("[...]", 3, 2)


def test_beam_search_scores_are_chain_probabilities() -> None:
    model = Stub()
    res = restore_text(model, VOCAB, "ab-[...]-ca", beam=3, top=50, min_len=1, max_len=3)
    (gap,) = res["gaps"]
    cands = gap["candidates"]
    assert {c["length"] for c in cands} == {1, 2, 3}
    assert model.calls == 3  # one forward pass per character step, all lengths batched
    # Ranked by mean log-probability per character, p is exp(total).
    assert [c["logp_per_char"] for c in cands] == sorted((c["logp_per_char"] for c in cands), reverse=True)
    for c in cands:
        assert math.isclose(c["p"], math.exp(c["logp"]), rel_tol=1e-9)
        assert math.isclose(c["p_char"], math.exp(c["logp"] / c["length"]), rel_tol=1e-9)
    # After '-' the stub prefers 'a' (p = e^2/(e^2+4)), then 'b' after 'a' (e^3... over real chars).
    z1 = math.exp(2) + 4  # five real characters: a has logit 2, the rest 0
    z2 = math.exp(2) + math.exp(3) + 3
    best2 = next(c for c in cands if c["length"] == 2)
    assert best2["text"] == "ab"
    assert math.isclose(best2["logp"], (2 - math.log(z1)) + (3 - math.log(z2)), rel_tol=1e-5)
    assert res["restored"].startswith("ab-[") and res["restored"].endswith("]-ca")


def test_unknown_characters_are_named() -> None:
    warned: list[str] = []
    res = restore_text(Stub(), VOCAB, "aΩ [x] b", beam=2, top=2, warn=warned.append)
    assert res["unknown_chars"] == ["Ω"] and "U+03A9" in warned[0]


def test_text_without_gap_is_a_user_error() -> None:
    with pytest.raises(XsaeError, match="no gap"):
        restore_text(Stub(), VOCAB, "a-na be-li2")
