"""Interventions: readouts with and without an LM head, token overlap across tokenizers, latent choice."""

from __future__ import annotations

import torch

from xsae_cli.align.interventions import (
    READOUT_LENS,
    READOUT_LM,
    Readout,
    normalise_token,
    overlap,
    pick_latents,
    transfer_latents,
)
from xsae_cli.align.pairing import pair_corpus


def test_token_text_is_compared_across_tokenizers() -> None:
    assert normalise_token("Ġworld") == normalise_token(" World") == normalise_token("##world") == normalise_token("▁world") == "world"
    assert overlap([" the", "Cat", "##s"], ["the", "dog", "s"]) == 2 / 3
    assert overlap(["", " "], ["a"]) == 0.0


def test_pick_latents_spreads_over_frequencies() -> None:
    codes = torch.zeros(1000, 10)
    for j, f in enumerate([0.0, 0.001, 0.01, 0.05, 0.1, 0.2, 0.25, 0.5, 0.9, 0.02]):
        codes[: int(f * 1000), j] = 1.0
    chosen = pick_latents(codes, 3)
    assert len(chosen) == 3 and set(chosen) <= {2, 3, 4, 5, 6, 9}  # only latents firing on 0.5%-30% of rows
    assert chosen[0] == 6  # the most frequent eligible one first


def _models(bpe_tokenizer):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=bpe_tokenizer.vocab_size, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)).eval()
    enc = BertModel(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)).eval()
    return lm, enc


def test_readouts_and_a_transfer(bpe_tokenizer, bert_tokenizer) -> None:
    lm, enc = _models(bpe_tokenizer)
    texts = ["The quick brown fox jumps over the lazy dog and runs far away from here."] * 6
    corpus = pair_corpus(texts, bpe_tokenizer, bert_tokenizer, context_size=24)
    split = corpus.splits["test"]
    src = Readout(lm, bpe_tokenizer, split.a)
    tgt = Readout(enc, bert_tokenizer, split.b)
    assert src.kind == READOUT_LM and tgt.kind == READOUT_LENS
    zero = src.effect("transformer.h.0", torch.zeros(16), top=5)
    assert abs(zero["kl"]) < 1e-6 and len(zero["promoted"]) == 5
    direction = torch.randn(16, generator=torch.Generator().manual_seed(3))  # not all-ones: LayerNorm removes that
    push = src.effect("transformer.h.0", 20.0 * direction, top=5)
    assert push["kl"] > 1e-3 > abs(zero["kl"]) * 1000  # a random-init LM is near uniform, so KLs are small
    lens = tgt.effect("encoder.layer.0", 5.0 * direction, top=5)
    assert lens["kl"] is None and len(lens["promoted"]) == 5  # no LM head: no KL, embedding-lens tokens
    dirs = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    result = transfer_latents(src, tgt, "transformer.h.0", "encoder.layer.0", dirs, dirs.flip(1), [3, 7], [0.1, 0.05], strength=0.5, norm_source=4.0, norm_target=4.0, top=5)
    assert [r["latent"] for r in result["latents"]] == [3, 7]
    assert result["kl"] is None and result["readout_target"] == READOUT_LENS
    assert all(0.0 <= r["overlap"] <= 1.0 and r["kl_source"] is not None for r in result["latents"])
