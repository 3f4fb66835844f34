"""Top-1 / top-5 character accuracy on held-out masked spans, next to a character n-gram baseline.

The held-out documents are the ones training set aside (same corpus, fraction and seed), cut into
consecutive windows and masked with spans of 1-10 characters by a fixed seed, so every evaluation
of a run scores the same gaps. The model sees all gaps of a window at once and ranks characters
per masked position.

The baseline is an interpolated (Witten-Bell) character n-gram model counted on the *training*
split of the same text, in both directions. A gap is filled greedily left to right by the forward
model and right to left by the backward model; each masked position is then scored by
``log P_fwd(c | left) + log P_bwd(c | right)``, so the baseline also sees both sides of the gap.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.restore.data import (
    IGNORE,
    Encoded,
    Vocab,
    load_docs,
    mask_spans,
    tile_windows,
)


class CharNgram:
    """Interpolated Witten-Bell character n-gram model; probabilities as vectors over a vocabulary."""

    def __init__(self, texts: Sequence[str], vocab: Vocab, order: int = 6) -> None:
        self.order = order
        self.vocab = vocab
        self.V = len(vocab)
        self.tables: list[dict[str, tuple[np.ndarray, np.ndarray, float, int]]] = []
        for n in range(1, order + 1):
            grams: Counter[str] = Counter()
            for t in texts:
                grams.update(t[i : i + n] for i in range(len(t) - n + 1))
            by_ctx: dict[str, list[tuple[int, int]]] = defaultdict(list)
            for g, c in grams.items():
                j = vocab.index(g[-1])
                if j is not None:
                    by_ctx[g[:-1]].append((j, c))
            table = {}
            for ctx, pairs in by_ctx.items():
                ids = np.fromiter((p[0] for p in pairs), dtype=np.int64)
                counts = np.fromiter((p[1] for p in pairs), dtype=np.float64)
                table[ctx] = (ids, counts, float(counts.sum()), len(pairs))
            self.tables.append(table)
        uni = np.ones(self.V)  # add-one unigram floor: every character keeps some mass
        if "" in self.tables[0]:
            ids, counts, _, _ = self.tables[0][""]
            uni[ids] += counts
        for s in vocab.special_ids:
            uni[s] = 0.0
        self.unigram = uni / uni.sum()
        self._cache: dict[str, np.ndarray] = {}

    def probs(self, context: str) -> np.ndarray:
        """P(next char | context) over the vocabulary ids (uses the last order-1 characters)."""
        context = context[-(self.order - 1) :] if self.order > 1 else ""
        hit = self._cache.get(context)
        if hit is not None:
            return hit
        p = self.unigram
        for n in range(1, len(context) + 1):
            entry = self.tables[n].get(context[-n:])
            if entry is None:
                break
            ids, counts, total, types = entry
            lam = total / (total + types)
            q = (1 - lam) * p
            q[ids] += lam * counts / total
            p = q
        if len(self._cache) < 500_000:
            self._cache[context] = p
        return p


def _fill(model: CharNgram, context: str, n: int) -> list[np.ndarray]:
    """Greedy fill of ``n`` positions after ``context``: the distribution at each step."""
    out = []
    for _ in range(n):
        p = model.probs(context)
        out.append(p)
        context += model.vocab.char(int(p.argmax()))
    return out


def ngram_scores(fwd: CharNgram, bwd: CharNgram, vocab: Vocab, inputs: np.ndarray, labels: np.ndarray, attn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-scores ``[n_masked, V]`` and true ids for every masked position, gap by gap."""
    rows, truth = [], []
    for r in range(inputs.shape[0]):
        length = int(attn[r].sum())
        text = [vocab.char(int(i)) if int(i) not in vocab.special_ids else "\x00" for i in inputs[r, :length]]
        target = labels[r, :length] != IGNORE
        j = 0
        while j < length:
            if not target[j]:
                j += 1
                continue
            k = j
            while k < length and target[k]:
                k += 1
            left = "".join(text[max(0, j - fwd.order) : j]).split("\x00")[-1]
            right = "".join(reversed(text[k : k + bwd.order])).split("\x00")[-1]
            f = _fill(fwd, left, k - j)
            b = _fill(bwd, right, k - j)[::-1]
            for m in range(k - j):
                rows.append(np.log(f[m] + 1e-12) + np.log(b[m] + 1e-12))
                truth.append(int(labels[r, j + m]))
            j = k
    if not rows:
        return np.zeros((0, len(vocab))), np.zeros(0, dtype=np.int64)
    return np.stack(rows), np.asarray(truth)


def topk_accuracy(scores: torch.Tensor, truth: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    if len(truth) == 0:
        return {f"top{k}": float("nan") for k in ks}
    top = scores.topk(max(ks), dim=-1).indices
    return {f"top{k}": float((top[:, :k] == truth[:, None]).any(-1).double().mean()) for k in ks}


def _model_scores(model: Any, inputs: np.ndarray, attn: np.ndarray, labels: np.ndarray, vocab: Vocab, device: Any, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    scores, truth = [], []
    banned = torch.tensor(vocab.special_ids, device=device)
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch):
            x = torch.from_numpy(inputs[i : i + batch]).to(device)
            a = torch.from_numpy(attn[i : i + batch]).to(device)
            y = torch.from_numpy(labels[i : i + batch]).to(device)
            logits = model(x, a).float()
            logits[..., banned] = -math.inf
            sel = y != IGNORE
            scores.append(logits[sel].cpu())
            truth.append(y[sel].cpu())
    return torch.cat(scores), torch.cat(truth)


def evaluate_model(
    model_path: str | Path,
    *,
    corpus: list[str] | None = None,
    windows: int = 200,
    seq_len: int | None = None,
    order: int = 6,
    held_out_fraction: float | None = None,
    seed: int | None = None,
    device: Any = "cpu",
) -> dict[str, Any]:
    """Score the model and the n-gram baseline on the same held-out masked spans."""
    from xsae_cli.core.hardware import package_versions
    from xsae_cli.data.corpus import split_documents
    from xsae_cli.restore.model import load_restoration

    loaded = load_restoration(model_path, device=device)
    model, vocab = loaded.model.eval(), loaded.vocab
    if not isinstance(vocab, Vocab) or vocab.kind != "chars":
        raise XsaeError("evaluate needs the vocabulary a model was trained with", "evaluate a model folder written by `xsae restore train`")
    trained = loaded.meta.get("settings", {})
    corpus = corpus or trained.get("corpus") or ["builtin"]
    frac = held_out_fraction if held_out_fraction is not None else trained.get("held_out_fraction", 0.05)
    seed = seed if seed is not None else trained.get("seed", 0)
    docs = load_docs(corpus)
    if len(docs) < 2:
        raise XsaeError(f"corpus {corpus} has {len(docs)} document(s): nothing to hold out", "use a corpus of several documents")
    train_docs, held_docs = split_documents(docs, frac, seed=seed)
    seq = seq_len or min(model.config.max_position, trained.get("seq_len") or model.config.max_position)
    enc, _ = Encoded.from_docs(held_docs, vocab)
    ids, attn, dmg = tile_windows(enc, seq, vocab.pad_id, limit=windows)
    inputs, labels = mask_spans(ids, attn, dmg, np.random.default_rng([seed, 12345]), vocab.mask_id)
    m_scores, m_truth = _model_scores(model, inputs, attn, labels, vocab, device)
    texts = ["".join(c for c, d in zip(doc.text, doc.damaged) if not d) for doc in train_docs]
    fwd = CharNgram(texts, vocab, order)
    bwd = CharNgram([t[::-1] for t in texts], vocab, order)
    n_scores, n_truth = ngram_scores(fwd, bwd, vocab, inputs, labels, attn)
    return {
        "model": str(model_path),
        "masked_chars": len(m_truth),
        "windows": int(ids.shape[0]),
        "seq_len": seq,
        "restoration_model": topk_accuracy(m_scores, m_truth),
        "ngram_baseline": {**topk_accuracy(torch.from_numpy(n_scores), torch.from_numpy(n_truth)), "order": order},
        "corpus": corpus,
        "held_out_docs": len(held_docs),
        "train_docs": len(train_docs),
        "held_out_fraction": frac,
        "seed": seed,
        "model_config": model.config.to_dict(),
        "versions": package_versions(),
    }
