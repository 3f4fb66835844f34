"""The model catalogue: one SQLite file under XSAE_HOME.

SQLite gives atomic, durable writes for free: a crash or ``kill -9`` in the middle of an
``add`` leaves the catalogue as it was before it, never half-written.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xsae_cli.core.config import xsae_home
from xsae_cli.core.errors import XsaeError
from xsae_cli.zoo.anatomy import Blocks, config_blocks, config_value
from xsae_cli.zoo.sources import ResolvedModel, file_sha256, resolve, sources
from xsae_cli.zoo.weights import tensor_index

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    source TEXT NOT NULL,
    path TEXT NOT NULL,
    architecture TEXT,
    model_type TEXT,
    family TEXT,
    params INTEGER,
    layers INTEGER,
    hidden INTEGER,
    dtype TEXT,
    bytes INTEGER,
    sha256 TEXT,
    added REAL,
    extra TEXT
)
"""


@dataclass
class ModelEntry:
    name: str
    kind: str
    source: str
    path: str
    architecture: str | None = None
    model_type: str | None = None
    family: str | None = None
    params: int | None = None
    layers: int | None = None
    hidden: int | None = None
    dtype: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    added: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Registry:
    """Catalogue of models, keyed by a short lowercase name."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = Path(home) if home else xsae_home()
        self.path = self.home / "zoo.sqlite"

    def _connect(self) -> sqlite3.Connection:
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path, timeout=30)
            conn.execute(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise XsaeError(f"the zoo catalogue {self.path} is unreadable ({exc})", "move it aside and re-add models with `xsae zoo add` / `xsae zoo demo`") from exc
        return conn

    def put(self, entry: ModelEntry) -> None:
        row = entry.to_dict()
        row["extra"] = json.dumps(row["extra"])
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        conn = self._connect()
        try:
            with conn:  # one transaction: all of the row or none of it
                conn.execute(f"INSERT OR REPLACE INTO models ({cols}) VALUES ({marks})", list(row.values()))
        finally:
            conn.close()

    def get(self, name: str) -> ModelEntry:
        entry = self.find(name)
        if entry is None:
            import difflib

            names = self.names()
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            known = f"known models: {', '.join(names)}" if names else "the catalogue is empty: run `xsae zoo demo` or `xsae zoo add SOURCE`"
            raise XsaeError(f"unknown model '{name}'", hint + known)
        return entry

    def find(self, name: str) -> ModelEntry | None:
        conn = self._connect()
        try:
            conn.row_factory = sqlite3.Row
            row = conn.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
        finally:
            conn.close()
        return _entry(row) if row else None

    def names(self) -> list[str]:
        return [e.name for e in self.list()]

    def list(self) -> list[ModelEntry]:
        conn = self._connect()
        try:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT * FROM models ORDER BY name").fetchall()
        finally:
            conn.close()
        return [_entry(r) for r in rows]

    def remove(self, name: str) -> ModelEntry:
        entry = self.get(name)
        conn = self._connect()
        try:
            with conn:
                conn.execute("DELETE FROM models WHERE name = ?", (name,))
        finally:
            conn.close()
        return entry

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.list())


def _entry(row: sqlite3.Row) -> ModelEntry:
    data = dict(row)
    data["extra"] = json.loads(data.get("extra") or "{}")
    return ModelEntry(**data)


def default_name(source: str) -> str:
    stem = Path(source.rstrip("/")).name
    for suffix in (x for s in sources() for x in s.suffixes):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    name = re.sub(r"[^a-z0-9_.\-]+", "-", stem.lower()).strip("-.")
    return name or "model"


def describe(resolved: ResolvedModel, name: str, family: str | None = None) -> ModelEntry:
    """Read architecture, size and identity of a resolved model from headers and config only."""
    handler = resolved.handler
    index = tensor_index(resolved)
    config = dict(handler.config(resolved) or {})
    archs = config.get("architectures") or []
    layers = config_blocks(config) or Blocks.from_names(t.name for t in index).n_blocks or None
    hidden = config_value(config, "hidden")
    dtypes = Counter(t.dtype for t in index)
    id_files = handler.identity_files(resolved)
    weight_bytes = sum(p.stat().st_size for p in id_files)
    return ModelEntry(
        name=name,
        kind=resolved.kind,
        source=resolved.source,
        path=handler.catalogue_path(resolved),
        architecture=archs[0] if archs else config.get("architecture") or None,
        model_type=config.get("model_type"),
        family=family or config.get("model_type"),
        params=sum(t.numel for t in index),
        layers=layers,
        hidden=hidden,
        dtype=dtypes.most_common(1)[0][0] if dtypes else None,
        bytes=weight_bytes,
        sha256=file_sha256(list(id_files)),
        added=time.time(),
        extra={"tensors": len(index), **handler.catalogue_extra(resolved)},
    )


def add_model(
    source: str,
    *,
    name: str | None = None,
    force: bool = False,
    family: str | None = None,
    registry: Registry | None = None,
    offline: bool = False,
    revision: str = "main",
) -> ModelEntry:
    """Resolve ``source``, describe it and catalogue it under ``name``."""
    registry = registry or Registry()
    name = (name or default_name(source)).lower()
    if not NAME_RE.match(name):
        raise XsaeError(f"bad model name '{name}'", "use lowercase letters, digits, '-', '_' and '.'")
    existing = registry.find(name)
    if existing is not None and not force:
        raise XsaeError(f"a model named '{name}' is already in the zoo (from {existing.source})", "pass --force to replace it or --name to pick another name")
    resolved = resolve(source, offline=offline, revision=revision)
    entry = describe(resolved, name, family)
    registry.put(entry)
    return entry


def resolve_entry(name_or_source: str, registry: Registry | None = None) -> ResolvedModel:
    """A catalogued name, or else anything :func:`resolve` understands."""
    registry = registry or Registry()
    entry = registry.find(name_or_source.lower())
    if entry is not None:
        return resolve(entry.path, kind=entry.kind)
    if Path(name_or_source).expanduser().exists() or "/" in name_or_source:
        return resolve(name_or_source)
    registry.get(name_or_source)  # raises the "unknown model" error with suggestions
    raise AssertionError("unreachable")
