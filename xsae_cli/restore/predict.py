"""Fill the gaps of a damaged line: beam search over each gap's characters, over a range of lengths.

Gaps: ``[...]`` (or ``[…]``) is a gap of unknown length, searched over ``min_len..max_len``
characters; ``[x]``, ``[x x]``, ``[x-x]`` is that many lost signs, searched over ``n..3n+(n-1)``
characters, i.e. ``n..4n-1`` (ATF signs are mostly one to three letters, and n signs need n-1
separators). Other
damage marks in the line (``x``, ``#``, editorial brackets) are shown to the model as masks.

For one length L, the gap gets L mask tokens and is filled left to right: at step j the model sees
the j characters chosen so far and masks after them, and each beam extends with its ``beam``
likeliest characters; a string's log-probability is the sum of its steps (the chain rule over the
model's conditionals). Sums over different lengths are not comparable (longer strings multiply
more factors below one), so candidates of all lengths are **ranked by the mean log-probability per
character** (the geometric-mean character probability, ``p_char``); ``p`` is the probability of the
whole string given its length. While one gap is restored, the others stay masked (three masks for
``[...]``, ``3n-1`` for n signs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.restore.data import candidate_ids, parse_inline, warn_unknown

GAP_RE = re.compile(r"\[\s*(?:\.\.\.|…)\s*\]|\[\s*([xX](?:[\s.\-]+[xX])*)\s*\]")


@dataclass
class Gap:
    start: int  # offset in the input text
    source: str  # as written, e.g. "[...]"
    lengths: list[int]
    nominal: int  # masks shown while another gap is restored


@dataclass
class Piece:
    ids: list[int]
    gap: Gap | None = None


#: Gaps restored per call: each is its own beam search over up to --max-len positions, so a text with
#: thousands of gaps would run for hours; longer texts are split into lines by the caller.
MAX_GAPS = 256
#: Characters of input text per call (a line of a tablet is tens to hundreds).
MAX_TEXT = 100_000


def check_text(text: str, min_len: int = 1, max_len: int = 10) -> list[Gap]:
    """The gaps of ``text``, refusing a text without any, or one too large to restore in one call
    (before any model load)."""
    if len(text) > MAX_TEXT:
        raise XsaeError(f"the text has {len(text):,} characters; restore predict takes at most {MAX_TEXT:,} per call", "split it into lines and restore each")
    gaps = find_gaps(text, min_len, max_len)
    if not gaps:
        raise XsaeError(f"no gap in {text!r}", "mark a gap as [...] (unknown length) or [x] (one lost sign)")
    if len(gaps) > MAX_GAPS:
        raise XsaeError(f"the text has {len(gaps):,} gaps; restore predict restores at most {MAX_GAPS} per call", "split it into lines and restore each")
    return gaps


def find_gaps(text: str, min_len: int = 1, max_len: int = 10) -> list[Gap]:
    if min_len < 1 or max_len < min_len:
        raise XsaeError(f"bad gap lengths {min_len}..{max_len}", "use 1 <= --min-len <= --max-len")
    gaps = []
    for m in GAP_RE.finditer(text):
        if m.group(1):
            n = len(re.findall(r"[xX]", m.group(1)))
            gaps.append(Gap(m.start(), m.group(0), list(range(n, 4 * n)), 3 * n - 1))
        else:
            gaps.append(Gap(m.start(), m.group(0), list(range(min_len, max_len + 1)), 3))
    return gaps


def _pieces(text: str, gaps: list[Gap], vocab: Any, unknown: dict[str, int]) -> list[Piece]:
    pieces: list[Piece] = []
    pos = 0
    for g in [*gaps, None]:
        end = g.start if g is not None else len(text)
        chunk = text[pos:end]
        if chunk:
            doc = parse_inline(chunk)
            pieces.append(Piece(vocab.encode(doc.text, doc.damaged, unknown)))
        if g is not None:
            pieces.append(Piece([], g))
            pos = g.start + len(g.source)
    return pieces


@torch.no_grad()
def restore_text(
    model: Any,
    vocab: Any,
    text: str,
    *,
    beam: int = 8,
    top: int = 5,
    min_len: int = 1,
    max_len: int = 10,
    device: Any = "cpu",
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Ranked restorations of every gap in ``text`` (see the module docstring for the scoring)."""
    if beam < 1 or top < 1:
        raise XsaeError("--beam and --top must be at least 1", "e.g. --beam 8 --top 5")
    gaps = check_text(text, min_len, max_len)
    unknown: dict[str, int] = {}
    pieces = _pieces(text, gaps, vocab, unknown)
    warn_unknown(unknown, warn)
    model = model.to(device).eval()
    cands = candidate_ids(vocab).to(device)
    limit = model.config.max_position
    results: list[dict[str, Any]] = []
    for gi, gap in enumerate(gaps):
        left: list[int] = []
        right: list[int] = []
        seen = False
        for p in pieces:
            ids = p.ids if p.gap is None else ([] if p.gap is gap else [vocab.mask_id] * p.gap.nominal)
            if p.gap is gap:
                seen = True
            elif seen:
                right.extend(ids)
            else:
                left.extend(ids)
        contexts = {}
        for length in gap.lengths:
            budget = limit - length
            if budget < 0:
                continue
            keep_left = min(len(left), max(budget // 2, budget - len(right)))
            keep_right = min(len(right), budget - keep_left)
            contexts[length] = (left[len(left) - keep_left :], right[:keep_right])
        found = _beam_search(model, vocab, contexts, cands, beam, device)
        found.sort(key=lambda c: -c["logp_per_char"])
        results.append({"gap": gi, "source": gap.source, "offset": gap.start, "lengths": [gap.lengths[0], gap.lengths[-1]], "candidates": found[:top]})
    restored = text
    for r in sorted(results, key=lambda r: -r["offset"]):
        if r["candidates"]:
            best = r["candidates"][0]["text"]
            restored = restored[: r["offset"]] + "[" + best + "]" + restored[r["offset"] + len(r["source"]) :]
    return {
        "text": text,
        "restored": restored,
        "gaps": results,
        "unknown_chars": sorted(unknown),
        "scoring": "ranked by mean log-probability per character across lengths; p = chain probability of the string given its length",
    }


def _beam_search(model: Any, vocab: Any, contexts: dict[int, tuple[list[int], list[int]]], cands: torch.Tensor, width: int, device: Any) -> list[dict[str, Any]]:
    """Beam search for every gap length at once: one forward pass per character step.

    Rows for all (length, beam) pairs share a batch, right-padded (padding is masked out of
    attention, and right padding leaves every position where it was).
    """
    beams: dict[int, list[tuple[list[int], float]]] = {length: [([], 0.0)] for length in contexts}
    bases = {length: left + [vocab.mask_id] * length + right for length, (left, right) in contexts.items()}
    for j in range(max(contexts, default=0)):
        rows, owners = [], []
        for length, bl in beams.items():
            if j >= length:
                continue
            g0 = len(contexts[length][0])
            for b, (chosen, _) in enumerate(bl):
                seq = list(bases[length])
                seq[g0 : g0 + j] = chosen
                rows.append(seq)
                owners.append((length, b, g0 + j))
        width_max = max(len(r) for r in rows)
        x = torch.full((len(rows), width_max), vocab.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width_max), dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        logits = model(x.to(device), mask.to(device))
        at = torch.tensor([o[2] for o in owners], device=device)
        logp = torch.log_softmax(logits[torch.arange(len(rows), device=device), at][:, cands].float(), dim=-1).cpu()  # over real characters
        for length in list(beams):
            if j >= length:
                continue
            idx = [i for i, o in enumerate(owners) if o[0] == length]
            total = logp[idx] + torch.tensor([s for _, s in beams[length]])[:, None]
            k = min(width, total.numel())
            vals, flat = total.view(-1).topk(k)
            bl = beams[length]
            beams[length] = [(bl[int(f) // len(cands)][0] + [int(cands[int(f) % len(cands)])], float(v)) for v, f in zip(vals, flat)]
    return [
        {"text": "".join(vocab.char(i) for i in ids), "length": length, "logp": s, "p": math.exp(s), "logp_per_char": s / length, "p_char": math.exp(s / length)}
        for length, bl in beams.items()
        for ids, s in bl
    ]
