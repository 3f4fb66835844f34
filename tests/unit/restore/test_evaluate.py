"""The character n-gram baseline and the accuracy measure."""

from __future__ import annotations

import numpy as np
import torch

from xsae_cli.restore.data import Vocab
from xsae_cli.restore.evaluate import CharNgram, ngram_scores, topk_accuracy


def test_ngram_is_a_distribution_and_learns_continuations() -> None:
    texts = ["a-na be-li2-ia qi2-bi2-ma"] * 5
    vocab = Vocab(sorted(set("".join(texts))))
    lm = CharNgram(texts, vocab, order=4)
    p = lm.probs("qi2-b")
    assert abs(p.sum() - 1) < 1e-9 and (p[vocab.special_ids] == 0).all()
    assert vocab.char(int(p.argmax())) == "i"
    assert lm.probs("zzz").sum() > 0.999  # unseen context backs off to the unigram


def test_bidirectional_baseline_fills_a_gap() -> None:
    texts = ["um-ma ARAD-ka-a-ma"] * 4
    vocab = Vocab(sorted(set("".join(texts))))
    fwd, bwd = CharNgram(texts, vocab, 5), CharNgram([t[::-1] for t in texts], vocab, 5)
    ids = np.array([vocab.encode(texts[0])])
    labels = np.full_like(ids, -100)
    inputs = ids.copy()
    labels[0, 6:10], inputs[0, 6:10] = ids[0, 6:10], vocab.mask_id  # "ARAD"
    scores, truth = ngram_scores(fwd, bwd, vocab, inputs, labels, np.ones_like(ids))
    assert scores.shape == (4, len(vocab)) and list(truth) == list(ids[0, 6:10])
    assert topk_accuracy(torch.from_numpy(scores), torch.from_numpy(truth))["top1"] == 1.0


def test_topk_accuracy_counts_hits() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(scores, torch.tensor([1, 1, 0]), ks=(1, 2))
    assert acc == {"top1": 1 / 3, "top2": 2 / 3}
