"""Text for the restoration model: documents with damage marks, a character vocabulary, simulated damage.

A :class:`Doc` is a string plus a per-character ``damaged`` flag. Damaged characters reach the
model as the mask token and are never training targets: what an editor restored inside ``[...]``
is a conjecture, not evidence. Simulated damage (masked spans of 1-10 characters) is drawn only
over undamaged characters, and only those become targets.

Readers: ORACC/CDLI ATF (``.atf``), and every plain source :func:`xsae_cli.data.corpus.load_texts`
reads (``builtin``, ``.txt``, ``.jsonl``, ``.parquet``, datasets folders), taken literally: plain
text has no damage markup, since brackets and ``x`` are ordinary characters there.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xsae_cli.core.errors import XsaeError

PAD, UNK, MASK = "<pad>", "<unk>", "<mask>"
SPECIALS = (PAD, UNK, MASK)
IGNORE = -100
ATF_SUFFIXES = (".atf",)


@dataclass
class Doc:
    """One text; ``damaged[i]`` is True where character i is lost or only restored by an editor."""

    text: str
    damaged: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.damaged:
            self.damaged = [False] * len(self.text)
        if len(self.damaged) != len(self.text):
            raise ValueError("damaged flags must match the text length")

    def __len__(self) -> int:
        return len(self.text)


# ------------------------------------------------------------------------------------ vocabulary


def describe_chars(chars: Iterable[str]) -> str:
    """'Ω' (U+03A9 GREEK CAPITAL LETTER OMEGA), ...: names a user can search for."""
    out = []
    for c in chars:
        name = unicodedata.name(c, "")
        out.append(f"{c!r} (U+{ord(c):04X}{' ' + name if name else ''})")
    return ", ".join(out)


class Vocab:
    """Characters of a corpus (Unicode, cuneiform signs included) after three special tokens."""

    kind = "chars"

    def __init__(self, chars: Sequence[str]) -> None:
        self.itos = list(SPECIALS) + [c for c in chars if c not in SPECIALS]
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.mask_id = 0, 1, 2

    @classmethod
    def build(cls, docs: Iterable[Doc], min_count: int = 1) -> Vocab:
        counts: Counter[str] = Counter()
        for d in docs:
            counts.update(c for c, dmg in zip(d.text, d.damaged) if not dmg)
        chars = sorted(c for c, n in counts.items() if n >= min_count)
        if not chars:
            raise XsaeError("the corpus has no undamaged characters to build a vocabulary from", "give a corpus with legible text")
        return cls(chars)

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def special_ids(self) -> list[int]:
        return [self.pad_id, self.unk_id, self.mask_id]

    def char(self, i: int) -> str:
        return self.itos[i] if 0 <= i < len(self.itos) else "\ufffd"

    def index(self, c: str) -> int | None:
        i = self.stoi.get(c)
        return None if i is None or i < len(SPECIALS) else i

    def encode(self, text: str, damaged: Sequence[bool] | None = None, unknown: dict[str, int] | None = None) -> list[int]:
        """Ids; damaged positions become the mask id, characters outside the vocabulary the unknown id
        (counted in ``unknown`` so the caller can name them)."""
        out = []
        for i, c in enumerate(text):
            if damaged is not None and damaged[i]:
                out.append(self.mask_id)
                continue
            j = self.index(c)
            if j is None:
                j = self.unk_id
                if unknown is not None:
                    unknown[c] = unknown.get(c, 0) + 1
            out.append(j)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.char(int(i)) if int(i) not in self.special_ids else "_" for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "specials": list(SPECIALS), "chars": self.itos[len(SPECIALS) :]}

    def save(self, path: Path) -> None:
        from xsae_cli.core.io import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @staticmethod
    def from_dict(data: Any, where: str = "vocabulary") -> Vocab:
        if not isinstance(data, dict) or "kind" not in data:
            raise XsaeError(f"{where} is not an xsae vocabulary", "use the vocab.json written by `xsae restore train`")
        if data["kind"] == "codepoint":
            return CodepointVocab(int(data["size"]))
        if data["kind"] != "chars" or not isinstance(data.get("chars"), list) or list(data.get("specials", [])) != list(SPECIALS):
            raise XsaeError(f"{where} is not an xsae character vocabulary", "use the vocab.json written by `xsae restore train`")
        return Vocab(data["chars"])

    @staticmethod
    def load(path: Any) -> Vocab:
        from xsae_cli.core.io import read_json

        return Vocab.from_dict(read_json(path, "vocabulary"), str(path))


class CodepointVocab(Vocab):
    """The original code's ids: a character's Unicode code point (its data had ``ord(ch)`` ids).

    It masked spans with ``#`` and padded with a space (attention mask 0), so those are the mask
    and pad ids here; a character beyond ``vocab_size`` maps to ``x`` (ATF's illegible sign).
    """

    kind = "codepoint"

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.pad_id, self.mask_id = ord(" "), ord("#")
        self.unk_id = ord("x") if ord("x") < self.size else 0
        self.itos = []
        self.stoi = {}

    def __len__(self) -> int:
        return self.size

    @property
    def special_ids(self) -> list[int]:
        return [self.mask_id]

    def char(self, i: int) -> str:
        return chr(i) if 0 <= i < self.size else "\ufffd"

    def index(self, c: str) -> int | None:
        i = ord(c)
        return i if i < self.size and i != self.mask_id else None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size}


def candidate_ids(vocab: Vocab) -> torch.Tensor:
    """Ids a restoration may contain: printable characters (specials, controls and the mask excluded)."""
    special = set(vocab.special_ids)
    ids = [i for i in range(len(vocab)) if i not in special and (vocab.char(i).isprintable() or vocab.char(i) == "\n")]
    return torch.tensor(ids, dtype=torch.long)


def warn_unknown(unknown: dict[str, int], warn: Callable[[str], None] | None, where: str = "the text") -> None:
    if unknown and warn is not None:
        shown = sorted(unknown, key=lambda c: -unknown[c])
        more = f" and {len(shown) - 12} more" if len(shown) > 12 else ""
        warn(f"{where} has characters outside the model's vocabulary, read as unknown: {describe_chars(shown[:12])}{more}")


# ------------------------------------------------------------------------------------ ATF reader

_LABEL_RE = re.compile(r"^([0-9A-Za-z'+]+(?:\s+[0-9A-Za-z'+]+)?)\.\s*(.*)$")
_SEPARATORS = set(" -.+:{}\n")
_FLAGS = set("!?*")


class _AtfLine:
    """Turns one ATF text line into characters with damage flags; bracket state spans lines."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.open_at: int | None = None  # line number where a '[' is still open
        self.half_open = False
        self.supplied = 0

    def parse(self, content: str, lineno: int) -> tuple[list[str], list[bool]]:
        chars: list[str] = []
        dmg: list[bool] = []
        i = 0
        n = len(content)

        def damaged_now() -> bool:
            return self.open_at is not None or self.half_open or self.supplied > 0

        while i < n:
            c = content[i]
            if c == "[":
                if self.open_at is not None:
                    raise XsaeError(f"{self.where} line {lineno}: '[' inside a '[' opened on line {self.open_at}", "close the first bracket with ']' before opening another")
                self.open_at = lineno
            elif c == "]":
                if self.open_at is None:
                    raise XsaeError(f"{self.where} line {lineno}: ']' without a matching '['", "add the opening '[' or remove the ']'")
                self.open_at = None
            elif c == "⸢":
                self.half_open = True
            elif c == "⸣":
                self.half_open = False
            elif c == "<":
                self.supplied += 1
            elif c == ">":
                if self.supplied == 0:
                    raise XsaeError(f"{self.where} line {lineno}: '>' without a matching '<'", "balance the editorial angle brackets")
                self.supplied -= 1
            elif c == "#":
                # The sign just written is damaged: back up to the previous separator.
                j = len(chars) - 1
                while j >= 0 and chars[j] not in _SEPARATORS:
                    dmg[j] = True
                    j -= 1
            elif c in _FLAGS:
                pass
            elif content.startswith("...", i) or c == "…":
                chars.extend("...")
                dmg.extend([True] * 3)
                i += 3 if c == "." else 1
                continue
            elif c in "xX" and (not chars or chars[-1] in _SEPARATORS) and (i + 1 >= n or content[i + 1] in _SEPARATORS | set("#!?*]⸣>")):
                chars.append(c)
                dmg.append(True)
            elif c.isspace():
                if chars and chars[-1] != " ":
                    chars.append(" ")
                    dmg.append(damaged_now())
            else:
                chars.append(c)
                dmg.append(damaged_now())
            i += 1
        while chars and chars[-1] == " ":
            chars.pop()
            dmg.pop()
        return chars, dmg


def parse_atf(text: str, where: str = "ATF") -> list[Doc]:
    """ORACC/CDLI ATF -> one :class:`Doc` per text (``&`` line), lines joined by newlines.

    ``[...]`` and other bracketed text, ``x`` (illegible sign), signs flagged ``#`` and half-bracketed
    ``⸢...⸣`` signs are damaged; ``<...>`` (supplied by the editor) is treated the same way. ``!``, ``?``
    and ``*`` flags are dropped. Comment, protocol (``#``), structure (``@``), state (``$``) and
    parallel (``==``, ``//``) lines carry no text. A line that fits none of these names itself in the error.
    """
    docs: list[Doc] = []
    chars: list[str] = []
    dmg: list[bool] = []
    state = _AtfLine(where)
    last_text_line = False

    def flush(lineno: int) -> None:
        nonlocal chars, dmg
        if state.open_at is not None:
            raise XsaeError(f"{where} line {state.open_at}: '[' is never closed (the text ends on line {lineno})", "add the closing ']'")
        if any(not d for d in dmg):
            docs.append(Doc("".join(chars), list(dmg)))
        chars, dmg = [], []
        state.half_open = False
        state.supplied = 0

    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for lineno, raw in enumerate(lines, start=1):
        line = raw.rstrip()
        if not line.strip():
            last_text_line = False
            continue
        first = line[0]
        if first == "&":
            flush(lineno)
            last_text_line = False
            continue
        if first in "#@$>" or line.startswith(("==", "//", "||", "<<")):
            last_text_line = False
            continue
        if first in " \t":
            if not last_text_line:
                raise XsaeError(f"{where} line {lineno}: an indented continuation line follows no text line", "start text lines with a line number such as '1.'")
            content = line.strip()
        else:
            m = _LABEL_RE.match(line)
            if not m or not m.group(2).strip():
                raise XsaeError(
                    f"{where} line {lineno}: not a valid ATF line: {line[:60]!r}",
                    "text lines start with a line number such as '1.' or '1'.'; '#' starts a comment, '@' a structure line, '$' a state line, '&' a new text",
                )
            content = m.group(2)
            if chars:
                chars.append("\n")
                dmg.append(state.open_at is not None)
        c, d = state.parse(content, lineno)
        if chars and chars[-1] != "\n" and c:
            chars.append(" ")
            dmg.append(state.open_at is not None)
        chars.extend(c)
        dmg.extend(d)
        last_text_line = True
    flush(len(lines))
    return docs


def read_atf(path: Path) -> list[Doc]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise XsaeError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})", "re-encode it as UTF-8") from exc
    return parse_atf(text, str(path))


def parse_inline(text: str) -> Doc:
    """One line of transliteration with ATF damage marks (no line number), e.g. for `predict` contexts."""
    chars, dmg = _AtfLine("text").parse(text, 1)
    return Doc("".join(chars), dmg)


# ------------------------------------------------------------------------------------ corpora


def _row_text(row: Any) -> str:
    if isinstance(row, str):
        return row
    return "\n".join(str(m.get("content", "")) for m in row if isinstance(m, dict))


def load_docs(sources: Sequence[str] | str | None) -> list[Doc]:
    """Documents of every source in order; ``None`` or ``"builtin"`` is the built-in corpus."""
    from xsae_cli.data.corpus import BUILTIN, load_texts

    if sources is None or isinstance(sources, str):
        sources = [sources or BUILTIN]
    if not sources:
        sources = [BUILTIN]
    docs: list[Doc] = []
    for src in sources:
        path = Path(src)
        if src != BUILTIN and path.is_file() and path.suffix.lower() in ATF_SUFFIXES:
            found = read_atf(path)
        elif src != BUILTIN and path.is_dir() and any(path.rglob("*.atf")):
            found = [d for f in sorted(path.rglob("*.atf")) for d in read_atf(f)]
        else:
            found = [Doc(_row_text(r)) for r in load_texts(src)]
        found = [d for d in found if len(d)]
        if not found:
            raise XsaeError(f"corpus {src} holds no text", "point at a source with non-empty documents")
        docs.extend(found)
    return docs


# ------------------------------------------------------------------------------------ tensors


@dataclass
class Encoded:
    """Documents as id arrays plus damage flags, ready for window sampling."""

    ids: list[np.ndarray]
    damaged: list[np.ndarray]

    @classmethod
    def from_docs(cls, docs: Sequence[Doc], vocab: Vocab) -> tuple[Encoded, dict[str, int]]:
        unknown: dict[str, int] = {}
        ids, dmg = [], []
        for d in docs:
            ids.append(np.asarray(vocab.encode(d.text, d.damaged, unknown), dtype=np.int64))
            dmg.append(np.asarray(d.damaged, dtype=bool))
        return cls(ids, dmg), unknown

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(x) for x in self.ids], dtype=np.int64)

    def n_chars(self) -> int:
        return int(self.lengths.sum())


def sample_windows(enc: Encoded, n: int, seq_len: int, rng: np.random.Generator, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` random windows (documents drawn in proportion to length): ids, attention mask, damaged."""
    lengths = enc.lengths
    weights = lengths / lengths.sum()
    docs = rng.choice(len(lengths), size=n, p=weights)
    ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    attn = np.zeros((n, seq_len), dtype=np.int64)
    dmg = np.zeros((n, seq_len), dtype=bool)
    for r, d in enumerate(docs):
        length = int(lengths[d])
        start = int(rng.integers(0, max(1, length - seq_len + 1)))
        piece = enc.ids[d][start : start + seq_len]
        ids[r, : len(piece)] = piece
        attn[r, : len(piece)] = 1
        dmg[r, : len(piece)] = enc.damaged[d][start : start + seq_len]
    return ids, attn, dmg


def tile_windows(enc: Encoded, seq_len: int, pad_id: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Consecutive non-overlapping windows over every document, in order (evaluation, SAE samples)."""
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    for ids, dmg in zip(enc.ids, enc.damaged):
        for start in range(0, len(ids), seq_len):
            rows.append((ids[start : start + seq_len], dmg[start : start + seq_len]))
            if limit is not None and len(rows) >= limit:
                break
        if limit is not None and len(rows) >= limit:
            break
    out_ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    attn = np.zeros((len(rows), seq_len), dtype=np.int64)
    out_dmg = np.zeros((len(rows), seq_len), dtype=bool)
    for r, (a, b) in enumerate(rows):
        out_ids[r, : len(a)] = a
        attn[r, : len(a)] = 1
        out_dmg[r, : len(a)] = b
    return out_ids, attn, out_dmg


def mask_spans(
    ids: np.ndarray,
    attn: np.ndarray,
    damaged: np.ndarray,
    rng: np.random.Generator,
    mask_id: int,
    ratio: tuple[float, float] = (0.15, 0.25),
    span: tuple[int, int] = (1, 10),
) -> tuple[np.ndarray, np.ndarray]:
    """Simulated damage: spans of ``span`` characters masked until ``ratio`` of each row's legible text is.

    Returns (input ids, labels); labels hold the true id at simulated gaps and ``IGNORE`` elsewhere,
    so real damage and padding are never targets. Real damage is masked in the input as well.
    """
    inputs = ids.copy()
    labels = np.full_like(ids, IGNORE)
    legible = (attn > 0) & ~damaged
    inputs[damaged & (attn > 0)] = mask_id
    for r in range(ids.shape[0]):
        valid = np.flatnonzero(legible[r])
        if len(valid) == 0:
            continue
        target = max(1, int(len(valid) * rng.uniform(*ratio)))
        masked = 0
        tries = 0
        length = int(attn[r].sum())
        while masked < target and tries < 4 * target + 10:
            tries += 1
            width = int(rng.integers(span[0], span[1] + 1))
            start = int(rng.integers(0, max(1, length - width + 1)))
            sl = slice(start, start + width)
            hit = legible[r, sl] & (labels[r, sl] == IGNORE)
            if not hit.any():
                continue
            cols = np.flatnonzero(hit) + start
            labels[r, cols] = ids[r, cols]
            inputs[r, cols] = mask_id
            masked += len(cols)
    return inputs, labels
