"""Text sources -> documents -> fixed-length token contexts.

Every group that runs text through a model (SAE training, alignment, restoration) starts here, so a
corpus means the same thing everywhere:

* :func:`load_texts` reads documents from the built-in corpus (``"builtin"``: CPython's pydoc topics
  plus standard-library docstrings, no download), a ``.txt`` / ``.jsonl`` / ``.parquet`` file, a
  folder of such files, or a Hugging Face ``datasets`` folder written by ``save_to_disk``. A row
  may hold a chat (``messages``: a list of ``{role, content}``) instead of text.
* :func:`render_texts` turns chats into text with the tokenizer's own chat template, the way chat
  models see their data.
* :func:`split_documents` holds documents out *before* tokenising, so that evaluation never sees a
  context that shares a document with training.
* :func:`tokenize_contexts` packs (or pads) documents into ``[n, context_size]`` token ids and marks
  every BOS / EOS / pad / special position, which activation harvesting drops.

Everything is deterministic: the same source, tokenizer and arguments give the same tensors.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import random
import re
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar, Union

import torch

from xsae_cli.core.errors import XsaeError

#: A document: plain text, or a chat as a list of ``{"role": ..., "content": ...}`` messages.
Row = Union[str, list[dict[str, Any]]]  # noqa: UP007 (a run-time alias; Python 3.10 evaluates it)

BUILTIN = "builtin"
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")

# Standard-library modules whose docstrings join pydoc's topics in the built-in corpus. A fixed
# list (not pkgutil discovery) keeps the corpus identical across machines with the same Python;
# every module here imports without side effects (no GUI, no network, no ``this``).
_BUILTIN_MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "bz2",
    "calendar",
    "cmath",
    "codecs",
    "collections",
    "collections.abc",
    "colorsys",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email.message",
    "email.parser",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "graphlib",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "html.parser",
    "http.client",
    "http.cookies",
    "http.server",
    "imaplib",
    "importlib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "keyword",
    "linecache",
    "locale",
    "logging",
    "logging.handlers",
    "lzma",
    "mailbox",
    "math",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "os",
    "os.path",
    "pathlib",
    "pickle",
    "pickletools",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "profile",
    "pstats",
    "queue",
    "quopri",
    "random",
    "re",
    "reprlib",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "statistics",
    "string",
    "stringprep",
    "struct",
    "subprocess",
    "symtable",
    "sys",
    "tabnanny",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "token",
    "tokenize",
    "trace",
    "traceback",
    "tracemalloc",
    "types",
    "typing",
    "unicodedata",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
    "zlib",
    "zoneinfo",
)
_MIN_DOC_CHARS = 80  # shorter docstrings ("Return self+value.") are boilerplate, not prose


# --------------------------------------------------------------------------------------- loading


def load_texts(source: str, *, text_field: str = "text", limit: int | None = None) -> list[Row]:
    """Read the documents of ``source``, in a fixed order.

    ``source`` is ``"builtin"``, a file (``.txt``, ``.jsonl``, ``.parquet``), a folder written by
    ``datasets.Dataset.save_to_disk``, or a folder of supported files (read in sorted path order).

    * ``.txt``: documents are separated by blank lines (one or more empty lines). One file would
      otherwise be one document, which cannot be split into train and held-out sets; paragraphs
      are the natural unit of most plain-text dumps. Put a whole document per file without blank
      lines if you want one document per file.
    * ``.jsonl`` / ``.parquet`` / ``datasets``: one document per row, from ``text_field``; a row
      without it but with ``messages`` (a list of ``{role, content}``) is a chat, rendered later
      by :func:`render_texts`.

    ``limit`` keeps the first ``limit`` documents. Empty documents are skipped.
    """
    if limit is not None and limit <= 0:
        raise XsaeError(f"corpus limit must be positive, got {limit}", "pass a positive --limit or none")
    rows: list[Row]
    if source.strip().lower() == BUILTIN:
        rows = list(builtin_texts()[: limit if limit is not None else None])
        where = "the built-in corpus"
    else:
        path = Path(source).expanduser()
        where = str(path)
        if not path.exists():
            raise XsaeError(
                f"corpus not found: {path}",
                f"pass '{BUILTIN}' or an existing .txt, .jsonl or .parquet file, or a datasets folder",
            )
        if path.is_dir():
            rows = _read_dir(path, text_field, limit)
        else:
            rows = _read_file(path, text_field, limit)
    if not rows:
        raise XsaeError(f"corpus {where} holds no text", "point at a source with non-empty documents")
    return rows


def _read_dir(path: Path, text_field: str, limit: int | None) -> list[Row]:
    if any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return _read_datasets_folder(path, text_field, limit)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise XsaeError(
            f"folder {path} holds no .txt, .jsonl or .parquet files and is not a datasets folder",
            "point at a file, a folder of such files, or a folder written by Dataset.save_to_disk",
        )
    rows: list[Row] = []
    for f in files:
        rows.extend(_read_file(f, text_field, None if limit is None else limit - len(rows)))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def _read_file(path: Path, text_field: str, limit: int | None) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        rows: list[Row] = list(split_paragraphs(_read_utf8(path)))
    elif suffix == ".jsonl":
        rows = _read_jsonl(path, text_field, limit)
    elif suffix == ".parquet":
        rows = _read_parquet(path, text_field, limit)
    else:
        raise XsaeError(
            f"unsupported corpus file {path} (extension '{path.suffix or 'none'}')",
            "use a .txt, .jsonl or .parquet file, a datasets folder, or 'builtin'",
        )
    return rows[:limit] if limit is not None else rows


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise XsaeError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})", "re-encode it as UTF-8") from exc


def split_paragraphs(text: str) -> list[str]:
    """Split text at blank lines into stripped, non-empty documents."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _read_jsonl(path: Path, text_field: str, limit: int | None) -> list[Row]:
    rows: list[Row] = []
    for lineno, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise XsaeError(f"{where} is not valid JSON ({exc.msg})", "fix or remove that line") from exc
        if not isinstance(record, dict):
            raise XsaeError(f"{where} is a JSON {type(record).__name__}, not an object", f"write one object with a '{text_field}' field per line")
        row = _row_from_record(record, text_field, where)
        if _nonempty(row):
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _read_parquet(path: Path, text_field: str, limit: int | None) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise XsaeError(f"cannot read parquet file {path}: {str(exc).splitlines()[0]}", "re-create it or point at the right file") from exc
    names = pf.schema_arrow.names
    column = _pick_column(names, text_field, str(path))
    rows: list[Row] = []
    index = 0
    for batch in pf.iter_batches(columns=[column], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row = _row_from_value(value, column, f"{path} row {index}")
            index += 1
            if _nonempty(row):
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    return rows
    return rows


def _read_datasets_folder(path: Path, text_field: str, limit: int | None) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise XsaeError(f"cannot load datasets folder {path}: {str(exc).splitlines()[0]}", "re-save it with Dataset.save_to_disk") from exc
    if isinstance(ds, datasets.DatasetDict):
        splits = sorted(ds.keys())
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise XsaeError(
                f"datasets folder {path} holds splits {', '.join(splits)} and none is 'train'",
                "save the split you want on its own: ds['<split>'].save_to_disk(folder)",
            )
    column = _pick_column(list(ds.column_names), text_field, str(path))
    n = len(ds)
    rows: list[Row] = []
    for start in range(0, n, 4096):
        for i, value in enumerate(ds[start : start + 4096][column]):
            row = _row_from_value(value, column, f"{path} row {start + i}")
            if _nonempty(row):
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    return rows
    return rows


def _pick_column(names: Sequence[str], text_field: str, where: str) -> str:
    if text_field in names:
        return text_field
    if "messages" in names:
        return "messages"
    raise XsaeError(
        f"{where} has no '{text_field}' column (columns: {', '.join(names) or 'none'})",
        "pass --text-field with the column holding the text, or give rows a 'messages' chat column",
    )


def _row_from_record(record: dict[str, Any], text_field: str, where: str) -> Row:
    if text_field in record:
        return _row_from_value(record[text_field], text_field, where)
    if "messages" in record:
        return _row_from_value(record["messages"], "messages", where)
    fields = ", ".join(sorted(record)) or "none"
    raise XsaeError(
        f"{where} has no '{text_field}' field (fields: {fields})",
        "pass --text-field with the field holding the text, or give each row a 'messages' chat",
    )


def _row_from_value(value: Any, column: str, where: str) -> Row:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise XsaeError(
        f"{where}: '{column}' holds {type(value).__name__}, not text or a list of {{role, content}} messages",
        'give each row a text string or a chat as [{"role": ..., "content": ...}, ...]',
    )


def _nonempty(row: Row) -> bool:
    return bool(row.strip()) if isinstance(row, str) else bool(row)


# --------------------------------------------------------------------------------------- builtin


@lru_cache(maxsize=1)
def builtin_texts() -> tuple[str, ...]:
    """The built-in corpus: pydoc topics (sorted by name) then standard-library docstrings.

    About 460 KB of pydoc prose plus docstrings, with no download. Docstrings are deduplicated and
    come in the fixed order of :data:`_BUILTIN_MODULES` and sorted member names, so the corpus is
    identical on every machine with the same Python version.
    """
    from pydoc_data.topics import topics

    seen: set[str] = set()
    docs: list[str] = []

    def add(text: str | None) -> None:
        if not isinstance(text, str):
            return
        text = inspect.cleandoc(text).strip()
        if len(text) >= _MIN_DOC_CHARS and text not in seen:
            seen.add(text)
            docs.append(text)

    for key in sorted(topics):
        add(topics[key])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.io, ...) warn when touched
        for modname in _BUILTIN_MODULES:
            _add_module_docs(modname, add)
    return tuple(docs)


def _add_module_docs(modname: str, add: Any) -> None:
    """Feed the docstrings of ``modname``, its public classes, functions and methods to ``add``."""
    try:
        module = importlib.import_module(modname)
    except Exception:  # a module missing on this platform (zoneinfo without tzdata, ...) is skipped
        return
    add(module.__doc__)
    members = vars(module)
    for name in sorted(members):
        obj = members[name]
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != modname:
            continue  # re-exported from elsewhere; its own module (if listed) contributes it
        add(obj.__doc__)
        if inspect.isclass(obj):
            attrs = vars(obj)
            for attr in sorted(attrs):
                member = attrs[attr]
                if attr.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isroutine(member) or isinstance(member, property):
                    add(member.__doc__)


# --------------------------------------------------------------------------------------- chat


def render_texts(rows: Sequence[Row], tokenizer: Any) -> list[str]:
    """Plain text for every row; chats go through ``tokenizer.apply_chat_template``.

    Users of chat models train and evaluate on text formatted the way the model saw it, role
    markers and all, so chats are rendered with the model's own template rather than joined.
    """
    out: list[str] = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            out.append(row)
            continue
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise XsaeError(
                f"row {i} is a chat but the tokenizer of {name} has no chat template",
                "use a chat model's tokenizer, or give rows plain text in the text field",
            )
        out.append(tokenizer.apply_chat_template(row, tokenize=False))
    return out


# --------------------------------------------------------------------------------------- split


_Doc = TypeVar("_Doc")


def split_documents(texts: Sequence[_Doc], held_out_fraction: float, seed: int = 0) -> tuple[list[_Doc], list[_Doc]]:
    """Split documents into (train, held_out) at random, each keeping the corpus order.

    Split by document, before tokenising: contexts packed from one document never land on both
    sides, so held-out metrics measure generalisation. ``round(fraction * n)`` documents are held
    out, at least one when the fraction is positive. The same seed gives the same split.
    """
    if not 0.0 <= held_out_fraction < 1.0:
        raise XsaeError(f"held-out fraction must be in [0, 1), got {held_out_fraction}", "pass e.g. 0.1")
    n = len(texts)
    if held_out_fraction == 0.0:
        return list(texts), []
    n_held = max(1, round(held_out_fraction * n))
    if n_held >= n:
        raise XsaeError(
            f"cannot hold out {held_out_fraction:.0%} of a corpus of {n} document(s) and keep any for training",
            "use a larger corpus or a smaller held-out fraction",
        )
    held = set(random.Random(seed).sample(range(n), n_held))
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


# --------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class TokenContexts:
    """Fixed-length token contexts, ready for a model.

    ``input_ids`` and ``attention_mask`` are ``[n, context_size]`` int64 (mask 1 = a real token,
    0 = padding). ``special_mask`` is ``[n, context_size]`` bool, True at BOS, EOS, separators,
    padding and every other special token: their activations are outliers (attention sinks), so
    harvesting drops them.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    special_mask: torch.Tensor
    packed: bool
    n_documents: int
    n_truncated: int = 0  # documents cut to fit (unpacked only)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def context_size(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) token positions."""
        return int(self.attention_mask.sum())

    @property
    def n_content_tokens(self) -> int:
        """Positions that are neither padding nor special: what harvesting keeps by default."""
        return int((~self.special_mask).sum())

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> TokenContexts:
        """A subset of the contexts (same metadata)."""
        return TokenContexts(
            self.input_ids[index],
            self.attention_mask[index],
            self.special_mask[index],
            self.packed,
            self.n_documents,
            self.n_truncated,
            dict(self.meta),
        )


def special_token_ids(tokenizer: Any) -> list[int]:
    """All ids the tokenizer calls special (BOS, EOS, pad, CLS, SEP, chat markers, ...)."""
    ids = set(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "cls_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            ids.add(value)
    return sorted(ids)


def begin_end_pad(tokenizer: Any) -> tuple[int | None, int | None, int]:
    """The begin (BOS, else CLS), end (EOS, else SEP) and pad ids a context gets: one rule for every group."""
    begin = getattr(tokenizer, "bos_token_id", None)
    if begin is None:
        begin = getattr(tokenizer, "cls_token_id", None)
    end = getattr(tokenizer, "eos_token_id", None)
    if end is None:
        end = getattr(tokenizer, "sep_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = end if end is not None else (begin if begin is not None else 0)
    return begin, end, int(pad)


def _encode(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of every text, without the tokenizer's own special tokens (we place them)."""
    import logging

    from xsae_cli.core.console import progress

    ids: list[list[int]] = []
    chunk = 512
    # Long documents trigger "sequence length is longer than the maximum" warnings; we cut
    # contexts ourselves, so silence that logger while encoding.
    log = logging.getLogger("transformers.tokenization_utils_base")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        # A bar (a rich live display) only for corpora big enough to wait for.
        with progress(transient=True) if len(texts) > 2000 else nullcontext() as bar:
            task = bar.add_task("tokenising", total=len(texts), unit="doc") if bar is not None else None
            for start in range(0, len(texts), chunk):
                batch = list(texts[start : start + chunk])
                ids.extend(list(x) for x in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"])
                if bar is not None and task is not None:
                    bar.advance(task, len(batch))
    finally:
        log.setLevel(level)
    return ids


def tokenize_contexts(
    texts: Sequence[str],
    tokenizer: Any,
    context_size: int,
    *,
    pack: bool = True,
    prepend_bos: bool = True,
) -> TokenContexts:
    """Tokenise documents into ``[n, context_size]`` contexts.

    ``pack=True`` concatenates documents into one stream, each followed by EOS (SEP for BERT-like
    tokenizers, BOS when there is neither), and cuts it into contexts: no padding is wasted, which
    is what SAE training wants. With ``prepend_bos`` every context starts with BOS (CLS), as the
    model saw in training; the last context is padded. ``pack=False`` gives one context per
    document: ``[BOS] tokens [EOS]``, truncated to ``context_size`` (counted in ``n_truncated``)
    or padded; per-document evaluation and sentence encoders want that.

    The tokenizer's own special tokens are not added (this function places BOS/EOS itself, once);
    a document that already starts with BOS (a chat template that writes it) gets no second one.
    """
    if context_size < 2:
        raise XsaeError(f"context size must be at least 2, got {context_size}", "pass e.g. --context-size 128")
    if isinstance(texts, str):
        texts = [texts]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise XsaeError(f"document {bad} is a {type(texts[bad]).__name__}, not text", "render chats first with render_texts(rows, tokenizer)")
    begin, end, pad = begin_end_pad(tokenizer)
    use_begin = begin if prepend_bos else None
    docs = [d for d in _encode(texts, tokenizer) if d]
    if not docs:
        raise XsaeError("the corpus tokenises to no tokens", "check the text field and the corpus contents")

    n_truncated = 0
    if pack:
        sep = end if end is not None else begin
        stream: list[int] = []
        for d in docs:
            stream.extend(d)
            if sep is not None:
                stream.append(sep)
        body = context_size - (1 if use_begin is not None else 0)
        n = math.ceil(len(stream) / body)
        flat = torch.full((n * body,), pad, dtype=torch.int64)
        flat[: len(stream)] = torch.tensor(stream, dtype=torch.int64)
        mask_flat = torch.zeros(n * body, dtype=torch.int64)
        mask_flat[: len(stream)] = 1
        input_ids, attention_mask = flat.view(n, body), mask_flat.view(n, body)
        if use_begin is not None:
            input_ids = torch.cat([torch.full((n, 1), use_begin, dtype=torch.int64), input_ids], dim=1)
            attention_mask = torch.cat([torch.ones((n, 1), dtype=torch.int64), attention_mask], dim=1)
    else:
        input_ids = torch.full((len(docs), context_size), pad, dtype=torch.int64)
        attention_mask = torch.zeros((len(docs), context_size), dtype=torch.int64)
        for i, d in enumerate(docs):
            seq = ([use_begin] if use_begin is not None and d[0] != use_begin else []) + d
            if end is not None:
                seq.append(end)
            if len(seq) > context_size:
                seq = seq[:context_size]
                n_truncated += 1
            input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            attention_mask[i, : len(seq)] = 1

    special = torch.tensor(special_token_ids(tokenizer) + [x for x in (begin, end) if x is not None], dtype=torch.int64)
    special_mask = torch.isin(input_ids, special) | (attention_mask == 0)
    meta = {
        "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        "bos_id": use_begin,
        "eos_id": end,
        "pad_id": pad,
    }
    return TokenContexts(input_ids, attention_mask, special_mask, pack, len(docs), n_truncated, meta)


def load_contexts(
    source: str,
    tokenizer: Any,
    context_size: int,
    *,
    text_field: str = "text",
    limit: int | None = None,
    pack: bool = True,
    prepend_bos: bool = True,
    held_out_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[TokenContexts, TokenContexts | None]:
    """Source -> (train contexts, held-out contexts or None): load, render chats, split, tokenise."""
    texts = render_texts(load_texts(source, text_field=text_field, limit=limit), tokenizer)
    train, held = split_documents(texts, held_out_fraction, seed)
    train_ctx = tokenize_contexts(train, tokenizer, context_size, pack=pack, prepend_bos=prepend_bos)
    held_ctx = tokenize_contexts(held, tokenizer, context_size, pack=pack, prepend_bos=prepend_bos) if held else None
    for c in (train_ctx, held_ctx):
        if c is not None:
            c.meta["corpus"] = source
    return train_ctx, held_ctx
