"""Pairing two tokenizers through character offsets: shared token ends, windows, splits, bad tokenizers."""

from __future__ import annotations

import re

import pytest
import torch

from xsae_cli.align.pairing import (
    cut_windows,
    harvest_paired,
    pair_corpus,
    shared_ends,
    split_three,
    token_ends,
)
from xsae_cli.core.errors import XsaeError

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was not amused, said the dog.",
    "Assert statements are a convenient way to insert debugging assertions into a program.",
    "A dictionary maps hashable keys to arbitrary values; keys must be immutable.",
    "Generators yield values lazily, one at a time, which saves memory for long sequences.",
    "The with statement wraps a block with methods defined by a context manager.",
    "Exceptions propagate up the call stack until a matching except clause handles them.",
    "List comprehensions build lists from iterables with an optional condition clause.",
    "Decorators take a function and return another function that usually wraps it.",
    "Modules are imported once per interpreter session and cached in sys.modules.",
    "Slicing a sequence returns a new sequence holding the selected items in order.",
]


def test_token_ends_keep_the_last_token_ending_at_a_character() -> None:
    # A byte-level BPE splits a multi-byte character into two tokens with the same offsets: only the
    # second has seen the whole character. Special ids and empty spans never count.
    ids = [5, 6, 7, 8, 0]
    offsets = [(0, 3), (3, 4), (3, 4), (4, 9), (9, 9)]
    assert token_ends(ids, offsets, special={0}) == {3: 0, 4: 2, 9: 3}


def test_shared_ends_and_windows() -> None:
    a = {3: 0, 5: 1, 8: 2, 12: 3}
    b = {3: 0, 8: 1, 10: 2, 12: 3}
    shared = shared_ends(a, b)
    assert shared == [(3, 0, 0), (8, 2, 1), (12, 3, 3)]
    wins, skipped = cut_windows(0, shared, budget_a=3, budget_b=3)
    assert skipped == 0
    # The first window holds A tokens 0..2 and B tokens 0..1; the next starts after the shared end at 8.
    assert [(w.a, w.b, w.pairs) for w in wins] == [((0, 3), (0, 2), [(0, 0), (2, 1)]), ((3, 4), (2, 4), [(0, 1)])]
    # A stretch longer than a window on one side is skipped, never cut in the middle.
    wins, skipped = cut_windows(0, [(3, 0, 0), (50, 9, 1)], budget_a=4, budget_b=4)
    assert skipped == 1 and [w.pairs for w in wins] == [[(0, 0)]]


def _letters(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def test_pairs_mark_the_same_text_on_both_sides(bpe_tokenizer, bert_tokenizer) -> None:
    corpus = pair_corpus(TEXTS, bpe_tokenizer, bert_tokenizer, names=("bpe", "bert"), context_size=16, val_fraction=0.2, test_fraction=0.2)
    stats = corpus.stats()
    assert stats["documents"] == len(TEXTS)
    assert 0.3 < stats["kept_a"] <= 1 and 0.8 < stats["kept_b"] <= 1  # BERT's words mostly end where a BPE token does
    checked = 0
    for split in corpus.splits.values():
        a, b = split.a, split.b
        assert a.input_ids.shape[1] == b.input_ids.shape[1] == 16
        for w, pa, pb in split.pairs.tolist():
            assert not a.special_mask[w, pa] and not b.special_mask[w, pb]  # BOS/CLS/EOS/SEP never paired
            # Everything read up to the pair is the same text on both sides (BERT drops spaces and case).
            left_a = bpe_tokenizer.decode(a.input_ids[w, 1 : pa + 1].tolist())
            left_b = bert_tokenizer.decode(b.input_ids[w, 1 : pb + 1].tolist())
            assert _letters(left_a) == _letters(left_b), (left_a, left_b)
            checked += 1
        # Both sides of a window start with their begin token and hold the same characters.
        assert int(a.input_ids[0, 0]) == bpe_tokenizer.bos_token_id and int(b.input_ids[0, 0]) == bert_tokenizer.cls_token_id
    assert checked == stats["pairs"] > 50


def test_split_is_by_document_and_covers_the_corpus() -> None:
    docs = [f"document number {i}" for i in range(50)]
    parts = split_three(docs, 0.1, 0.2, seed=3)
    sets = {k: set(v) for k, v in parts.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(docs)
    assert (len(parts["val"]), len(parts["test"])) == (5, 10)
    assert split_three(docs, 0.1, 0.2, seed=3) == parts  # deterministic
    with pytest.raises(XsaeError, match="sum below 1"):
        split_three(docs, 0.5, 0.6, seed=0)


class _SlowTokenizer:
    is_fast = False


def test_slow_tokenizer_is_refused_naming_the_model(bert_tokenizer) -> None:
    with pytest.raises(XsaeError, match="my-slow-model.*not a fast tokenizer"):
        pair_corpus(TEXTS, bert_tokenizer, _SlowTokenizer(), names=("minilm", "my-slow-model"))


def test_chats_are_refused(bpe_tokenizer, bert_tokenizer) -> None:
    rows = list(TEXTS) + [[{"role": "user", "content": "hi"}]]
    with pytest.raises(XsaeError, match="chat"):
        pair_corpus(rows, bpe_tokenizer, bert_tokenizer)


def test_harvest_returns_rows_in_pair_order(bpe_tokenizer, bert_tokenizer) -> None:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=bpe_tokenizer.vocab_size, n_positions=32, n_embd=16, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0)).eval()
    corpus = pair_corpus(TEXTS, bpe_tokenizer, bert_tokenizer, context_size=16)
    split = corpus.splits["train"]
    pos = split.pairs[:, :2]
    h = harvest_paired(model, bpe_tokenizer, ["h.1"], split.a, pos, keep_content=True, batch_contexts=3)
    rows = h.paired["h.1"]
    assert rows.shape == (split.n_pairs, 16)
    with torch.no_grad():  # the same rows straight from the model, one window at a time
        for r in (0, split.n_pairs // 2, split.n_pairs - 1):
            w, p = pos[r].tolist()
            n = int(split.a.attention_mask[w].sum())
            hidden = model(input_ids=split.a.input_ids[w : w + 1, :n], output_hidden_states=True).hidden_states[2]  # output of block h.1 (the last entry has ln_f applied)
            assert torch.allclose(rows[r], hidden[0, p], atol=1e-5)
    assert h.content["h.1"].shape[0] == int((~split.a.special_mask).sum())
    assert h.tokens == int(split.a.attention_mask.sum())
