"""Pair token positions of two tokenizers through character offsets, and harvest paired activations.

Two models with different tokenizers cut the same text into different tokens, so "row i of model A"
and "row i of model B" mean the same thing only if we make them. Here a position pair is kept where
*both* tokenizers end a token at the same character of the same document: at that point both models
have read exactly the same text (a causal model nothing more; a bidirectional one sees its whole
window anyway, and both windows hold the same characters). Where one tokenizer emits several tokens
that end at one character (a byte-level BPE splitting a multi-byte character), the last of them
stands for it, since only it has seen the whole character.

Documents are split into train / val / test *before* tokenising, so no document feeds both a fit
and its score. Each document is cut into windows at shared token boundaries, so a window holds the
same characters for both models; each window gets the same treatment on both sides: the model's own
begin token (BOS, or CLS) first and its end token (EOS, or SEP) last, and neither is ever paired.
Fast (Rust) tokenizers are required: only they give character offsets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.data.corpus import Row, TokenContexts, begin_end_pad, special_token_ids, split_documents

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------- tokenising


def check_fast(tokenizer: Any, model_name: str) -> None:
    """Refuse a tokenizer that cannot give character offsets (a "slow" Python tokenizer)."""
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        kind = type(tokenizer).__name__ if tokenizer is not None else "no tokenizer"
        raise XsaeError(
            f"the tokenizer of {model_name} ({kind}) is not a fast tokenizer and gives no character offsets, which pairing needs",
            "add a model folder with a tokenizer.json (convert it with transformers' AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained)",
        )


def encode_with_offsets(texts: Sequence[str], tokenizer: Any, model_name: str) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(token ids, character offsets) of every text, without special tokens."""
    check_fast(tokenizer, model_name)
    log = logging.getLogger("transformers.tokenization_utils_base")
    level = log.level
    log.setLevel(logging.ERROR)  # "sequence longer than the maximum": windows are cut below
    out: list[tuple[list[int], list[tuple[int, int]]]] = []
    try:
        for start in range(0, len(texts), 256):
            batch = list(texts[start : start + 256])
            enc = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            for ids, offs in zip(enc["input_ids"], enc["offset_mapping"]):
                out.append((list(ids), [(int(a), int(b)) for a, b in offs]))
    finally:
        log.setLevel(level)
    return out


def token_ends(ids: Sequence[int], offsets: Sequence[tuple[int, int]], special: set[int]) -> dict[int, int]:
    """{character where a token ends: index of the last token ending there}, special and empty tokens skipped."""
    ends: dict[int, int] = {}
    for i, (tid, (start, end)) in enumerate(zip(ids, offsets)):
        if end <= start or tid in special:
            continue
        ends[end] = i
    return ends


def shared_ends(ends_a: dict[int, int], ends_b: dict[int, int]) -> list[tuple[int, int, int]]:
    """(character, token index in A, token index in B) where both end a token, in text order.

    Keeps only pairs whose token indices increase on both sides (offsets of ordinary tokenizers
    always do; this guards against tokenizers with odd offset conventions).
    """
    out: list[tuple[int, int, int]] = []
    last_a = last_b = -1
    for c in sorted(ends_a.keys() & ends_b.keys()):
        ia, ib = ends_a[c], ends_b[c]
        if ia > last_a and ib > last_b:
            out.append((c, ia, ib))
            last_a, last_b = ia, ib
    return out


@dataclass
class Window:
    """A stretch of one document, as token ranges of both tokenizers, with its pairs."""

    doc: int
    a: tuple[int, int]  # token range [start, end) in A's encoding of the document
    b: tuple[int, int]
    pairs: list[tuple[int, int]]  # (index in A's range, index in B's range), content positions


def cut_windows(doc: int, shared: list[tuple[int, int, int]], budget_a: int, budget_b: int) -> tuple[list[Window], int]:
    """Cut a document at shared token ends into windows of at most ``budget`` content tokens per side.

    Returns the windows and the number of shared ends skipped because the text between two of
    them is longer than a window on one side (rare: a run of characters with no shared boundary).
    """
    windows: list[Window] = []
    start_a = start_b = 0
    last_a = last_b = -1
    pairs: list[tuple[int, int]] = []
    skipped = 0
    for _c, ia, ib in shared:
        if ia + 1 - start_a > budget_a or ib + 1 - start_b > budget_b:
            if pairs:
                windows.append(Window(doc, (start_a, last_a + 1), (start_b, last_b + 1), pairs))
            start_a, start_b, pairs = last_a + 1, last_b + 1, []
            if ia + 1 - start_a > budget_a or ib + 1 - start_b > budget_b:
                skipped += 1
                start_a, start_b = ia + 1, ib + 1
                last_a, last_b = ia, ib
                continue
        pairs.append((ia - start_a, ib - start_b))
        last_a, last_b = ia, ib
    if pairs:
        windows.append(Window(doc, (start_a, last_a + 1), (start_b, last_b + 1), pairs))
    return windows, skipped


# --------------------------------------------------------------------------------------- contexts


def _contexts(encoded: list[list[int]], windows: list[Window], side: str, tokenizer: Any, context_size: int) -> tuple[TokenContexts, int]:
    """Windows of one side as [n, context_size] contexts; returns them and the position offset of content."""
    begin, end, pad = begin_end_pad(tokenizer)
    offset = 1 if begin is not None else 0
    n = len(windows)
    ids = torch.full((n, context_size), pad, dtype=torch.int64)
    mask = torch.zeros((n, context_size), dtype=torch.int64)
    special = torch.ones((n, context_size), dtype=torch.bool)
    specials = set(special_token_ids(tokenizer))
    for w, win in enumerate(windows):
        s, e = getattr(win, side)
        body = encoded[win.doc][s:e]
        seq = ([begin] if begin is not None else []) + body + ([end] if end is not None else [])
        ids[w, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
        mask[w, : len(seq)] = 1
        special[w, offset : offset + len(body)] = torch.tensor([t in specials for t in body], dtype=torch.bool)
    meta = {"tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__, "bos_id": begin, "eos_id": end, "pad_id": pad}
    return TokenContexts(ids, mask, special, False, len({w.doc for w in windows}), 0, meta), offset


@dataclass
class PairedSplit:
    """One split: both sides' windows and the paired positions ``pairs [P, 3]`` = (window, pos A, pos B)."""

    name: str
    documents: int
    a: TokenContexts
    b: TokenContexts
    pairs: torch.Tensor
    content_a: int  # content (non-special) tokens of these documents, all of them, on each side
    content_b: int

    @property
    def n_pairs(self) -> int:
        return int(self.pairs.shape[0])


@dataclass
class PairedCorpus:
    """A corpus through two tokenizers: splits by document, windows, pairs and what pairing kept."""

    names: tuple[str, str]
    context_size: int
    splits: dict[str, PairedSplit]
    skipped_segments: int = 0
    seconds: float = 0.0
    examples: list[tuple[str, str]] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        """Counts per split and the fraction of each side's tokens that pairing kept."""
        per: dict[str, Any] = {}
        for name, s in self.splits.items():
            per[name] = {
                "documents": s.documents,
                "windows": len(s.a),
                "tokens_a": s.content_a,
                "tokens_b": s.content_b,
                "pairs": s.n_pairs,
                "kept_a": s.n_pairs / max(1, s.content_a),
                "kept_b": s.n_pairs / max(1, s.content_b),
            }
        tot_a = sum(s.content_a for s in self.splits.values())
        tot_b = sum(s.content_b for s in self.splits.values())
        pairs = sum(s.n_pairs for s in self.splits.values())
        return {
            "a": self.names[0],
            "b": self.names[1],
            "context_size": self.context_size,
            "documents": sum(s.documents for s in self.splits.values()),
            "tokens_a": tot_a,
            "tokens_b": tot_b,
            "pairs": pairs,
            "kept_a": pairs / max(1, tot_a),
            "kept_b": pairs / max(1, tot_b),
            "skipped_segments": self.skipped_segments,
            "seconds": round(self.seconds, 2),
            "splits": per,
            "examples": [list(e) for e in self.examples],
        }


def _plain_texts(rows: Sequence[Row]) -> list[str]:
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, str)), None)
    if bad is not None:
        raise XsaeError(
            f"document {bad} is a chat; alignment pairs plain text, and each model would render a chat with its own template",
            "give rows plain text in the text field",
        )
    return list(rows)  # type: ignore[arg-type]


def split_three(texts: Sequence[Row], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[Row]]:
    """train / val / test by document, through :func:`split_documents` (test first, then val)."""
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and val_fraction + test_fraction < 1):
        raise XsaeError(
            f"val and test fractions must be positive and sum below 1 (got {val_fraction} and {test_fraction})",
            "pass e.g. --val-fraction 0.1 --test-fraction 0.2",
        )
    if len(texts) < 3:
        raise XsaeError(f"the corpus holds {len(texts)} document(s); train, val and test need at least 3", "use a larger corpus")
    rest, test = split_documents(texts, test_fraction, seed)
    train, val = split_documents(rest, val_fraction / (1 - test_fraction), seed + 1)
    return {"train": train, "val": val, "test": test}


def pair_corpus(
    texts: Sequence[Row],
    tokenizer_a: Any,
    tokenizer_b: Any,
    *,
    names: tuple[str, str] = ("A", "B"),
    context_size: int = 128,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    n_examples: int = 12,
) -> PairedCorpus:
    """Split documents, tokenise them with both tokenizers and pair positions at shared token ends."""
    t0 = time.perf_counter()
    check_fast(tokenizer_a, names[0])
    check_fast(tokenizer_b, names[1])
    if context_size < 3:
        raise XsaeError(f"context size must be at least 3 (begin, a token, end), got {context_size}", "pass e.g. --context-size 128")
    plain = _plain_texts(texts)
    parts = split_three(plain, val_fraction, test_fraction, seed)
    spec_a, spec_b = set(special_token_ids(tokenizer_a)), set(special_token_ids(tokenizer_b))
    budgets = []
    for tok in (tokenizer_a, tokenizer_b):
        begin, end, _ = begin_end_pad(tok)
        budgets.append(context_size - (begin is not None) - (end is not None))
    splits: dict[str, PairedSplit] = {}
    skipped = 0
    examples: list[tuple[str, str]] = []
    for split in SPLITS:
        docs = [str(t) for t in parts[split]]
        enc_a = encode_with_offsets(docs, tokenizer_a, names[0])
        enc_b = encode_with_offsets(docs, tokenizer_b, names[1])
        windows: list[Window] = []
        content_a = content_b = 0
        for d, ((ids_a, off_a), (ids_b, off_b)) in enumerate(zip(enc_a, enc_b)):
            content_a += sum(1 for t in ids_a if t not in spec_a)
            content_b += sum(1 for t in ids_b if t not in spec_b)
            shared = shared_ends(token_ends(ids_a, off_a, spec_a), token_ends(ids_b, off_b, spec_b))
            wins, sk = cut_windows(d, shared, budgets[0], budgets[1])
            windows.extend(wins)
            skipped += sk
            if split == "test" and len(examples) < n_examples:
                for _c, ia, ib in shared[: n_examples - len(examples)]:
                    examples.append((tokenizer_a.decode([ids_a[ia]]), tokenizer_b.decode([ids_b[ib]])))
        ids_a_all = [e[0] for e in enc_a]
        ids_b_all = [e[0] for e in enc_b]
        ctx_a, shift_a = _contexts(ids_a_all, windows, "a", tokenizer_a, context_size)
        ctx_b, shift_b = _contexts(ids_b_all, windows, "b", tokenizer_b, context_size)
        rows = [(w, pa + shift_a, pb + shift_b) for w, win in enumerate(windows) for pa, pb in win.pairs]
        pairs = torch.tensor(rows, dtype=torch.int64) if rows else torch.zeros((0, 3), dtype=torch.int64)
        splits[split] = PairedSplit(split, len(docs), ctx_a, ctx_b, pairs, content_a, content_b)
    return PairedCorpus(names, context_size, splits, skipped, time.perf_counter() - t0, examples)


# --------------------------------------------------------------------------------------- activations


@dataclass
class Harvest:
    """Activations of one model over one split: paired rows in pair order, and (optionally) all content rows."""

    paired: dict[str, torch.Tensor]
    content: dict[str, torch.Tensor] | None
    tokens: int  # real (non-pad) positions run through the model
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@torch.no_grad()
def harvest_paired(
    model: Any,
    tokenizer: Any,
    hooks: Sequence[str],
    contexts: TokenContexts,
    positions: torch.Tensor,
    *,
    keep_content: bool = False,
    batch_contexts: int = 8,
    model_name: str | None = None,
    on_batch: Any = None,
) -> Harvest:
    """Hooked activations at ``positions [P, 2]`` = (window, position), rows in that order.

    Runs through :class:`ActivationStore`'s capture (all hooks in one forward, stopped after the
    last). Windows go in order of length so that batches carry little padding; each batch is cut
    to its longest window. ``keep_content`` also returns every content (non-special) position,
    which is what the SAEs train on.
    """
    from xsae_cli.data.activations import ActivationStore

    hooks = list(hooks)
    store = ActivationStore(model, tokenizer, hooks, contexts, batch_contexts=batch_contexts, shuffle=False, device="cpu", model_name=model_name)
    n = len(contexts)
    lengths = contexts.attention_mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    rows_of: list[list[int]] = [[] for _ in range(n)]
    for r, w in enumerate(positions[:, 0].tolist()):
        rows_of[w].append(r)
    paired: dict[str, torch.Tensor] = {}
    content: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    tokens = 0
    t0 = time.perf_counter()
    for s in range(0, n, batch_contexts):
        idx = order[s : s + batch_contexts]
        width = int(lengths[idx].max())
        ids = contexts.input_ids[idx, :width]
        att = contexts.attention_mask[idx, :width]
        acts = store.capture(ids, att)
        tokens += int(att.sum())
        rows = [r for w in idx.tolist() for r in rows_of[w]]
        local = {w: i for i, w in enumerate(idx.tolist())}
        if rows:
            sel = positions[rows]
            bi = torch.tensor([local[w] for w in sel[:, 0].tolist()], dtype=torch.int64)
            for h, t in acts.items():
                t = t.float().cpu()
                if h not in paired:
                    paired[h] = torch.zeros((positions.shape[0], t.shape[-1]), dtype=torch.float32)
                paired[h][torch.tensor(rows)] = t[bi, sel[:, 1]]
        if keep_content:
            keep = (~contexts.special_mask[idx, :width]).reshape(-1)
            for h, t in acts.items():
                content[h].append(t.float().cpu().reshape(-1, t.shape[-1])[keep])
        if on_batch is not None:
            on_batch(len(idx))
    seconds = time.perf_counter() - t0
    if not paired:  # no pairs at all: still give correctly shaped empty tensors
        widths = store.d_in
        paired = {h: torch.zeros((0, widths[h])) for h in hooks}
    cont = {h: torch.cat(v) for h, v in content.items()} if keep_content else None
    return Harvest(paired, cont, tokens, seconds)
