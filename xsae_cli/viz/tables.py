"""Tables from the JSON files runs leave behind, for groups viz knows and groups it does not.

A run's JSON is read by its shape, not by who wrote it, so a new group's ``report.json`` gets a
sensible page without viz learning its fields: top-level scalars become a summary; objects named
``config`` / ``settings`` / ``spec`` / ``model`` go to the config part and ``versions`` to the versions
part; an object of objects (``{"hook": {"fvu": ..}}``) or a list of objects (per-epoch history)
becomes one grid; anything else is flattened to dotted keys. Long vectors are summarised, never
dumped, and every table is capped, so a 512-float embedding or a 10,000-row result stays a line.
An explicit ``"tables"`` field (``{title: [row objects]}``, ``{title: {"columns", "rows"}}`` or a list
of ``{"title", "columns", "rows"}``) is shown as written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CONFIG_KEYS = {"config", "settings", "spec", "model", "args", "hparams", "hyperparameters", "cfg", "options", "params"}
VERSION_KEYS = {"versions", "version_info", "environment"}
MAX_ROWS = 200  # rows shown per table; the rest are counted in the table's note
MAX_COLUMNS = 16  # a grid wider than this is shown as key / value rows instead
SHORT_LIST = 8  # lists of scalars up to this long are shown inline, longer ones summarised
NARROW = 8  # a grid with at most this many fields keeps one row per entity
TRANSPOSE_AT = 6  # a wider grid of at most this many entities puts them in columns (one row per field)

Scalar = str | int | float | bool | None


@dataclass
class Table:
    """One table of a run's page: ``part`` is "metrics", "config" or "versions"."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    part: str = "metrics"
    source: str = ""
    note: str = ""

    def key(self) -> tuple[Any, ...]:
        """Identity for de-duplication (metrics.json repeats run.json's settings and versions)."""
        return (self.part, self.title, tuple(self.columns), tuple(tuple(map(repr, r)) for r in self.rows))


def is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def numeric_leaves(obj: Any, limit: int = 1) -> int:
    """How many numbers ``obj`` holds (stops counting at ``limit``)."""
    count = 0
    stack = [obj]
    while stack and count < limit:
        o = stack.pop()
        if is_number(o):
            count += 1
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return count


def _summarise_list(v: list[Any]) -> Scalar:
    if all(is_scalar(x) for x in v):
        if len(v) <= SHORT_LIST:
            return ", ".join("–" if x is None else str(x) for x in v) if v else "[]"
        kind = "numbers" if all(is_number(x) for x in v) else "values"
        return f"[{len(v):,} {kind}]"
    return f"[{len(v):,} items]"


def is_placeholder(v: Any) -> bool:
    """A summarised long list (``[512 numbers]``) rather than a value."""
    return isinstance(v, str) and v.startswith("[") and v.endswith("]") and (" numbers]" in v or " values]" in v or " items]" in v)


def flatten(obj: Any, prefix: str = "", depth: int = 8) -> dict[str, Scalar]:
    """Dotted keys to scalars; short scalar lists inline, long lists and deep parts summarised."""
    out: dict[str, Scalar] = {}
    if isinstance(obj, dict):
        if not obj and prefix:
            out[prefix] = "{}"
        for k, v in obj.items():
            name = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, (dict, list)) and depth > 0 and not (isinstance(v, list) and all(is_scalar(x) for x in v)):
                if isinstance(v, list):
                    out.update(flatten(dict(enumerate(v)), name, depth - 1) if len(v) <= MAX_ROWS else {name: _summarise_list(v)})
                else:
                    out.update(flatten(v, name, depth - 1))
            elif isinstance(v, list):
                out[name] = _summarise_list(v)
            elif isinstance(v, dict):
                out[name] = f"{{{len(v)} fields}}"
            else:
                out[name] = v
    elif isinstance(obj, list):
        return flatten(dict(enumerate(obj)), prefix, depth)
    else:
        out[prefix or "value"] = obj
    return out


def _cap(rows: list[list[Any]], note: str = "") -> tuple[list[list[Any]], str]:
    if len(rows) <= MAX_ROWS:
        return rows, note
    more = f"first {MAX_ROWS:,} of {len(rows):,} rows"
    return rows[:MAX_ROWS], f"{note}; {more}" if note else more


def kv_table(title: str, obj: Any, part: str, source: str) -> Table | None:
    flat = flatten(obj)
    rows = [[k, v] for k, v in flat.items()]
    if not rows or all(is_placeholder(v) for _, v in rows):
        return None
    rows, note = _cap(rows)
    return Table(title, ["field", "value"], rows, part, source, note)


def grid_table(title: str, entities: list[tuple[str, Any]], part: str, source: str, entity_name: str = "") -> Table | None:
    """Entities (hooks, epochs, transform types) against their flattened fields, or None when too wide."""
    flats = [(name, flatten(obj) if isinstance(obj, (dict, list)) else {"value": obj}) for name, obj in entities]
    columns: list[str] = list(dict.fromkeys(k for _, f in flats for k in f))
    columns = [c for c in columns if not all(is_placeholder(f.get(c)) or f.get(c) is None for _, f in flats)]
    if not columns:
        return None
    # A field that only repeats the row's name ("name": "tiny-gpt2") is left out.
    columns = [c for c in columns if not all(str(f.get(c)) == name for name, f in flats)] or columns
    if len(columns) > NARROW and len(flats) <= TRANSPOSE_AT:
        # Few entities, many fields (an SAE's one or two hooks): a row per field reads better.
        rows = [[c, *(f.get(c) for _, f in flats)] for c in columns]
        rows, note = _cap(rows)
        return Table(title, ["field", *(n for n, _ in flats)], rows, part, source, note)
    if len(columns) > MAX_COLUMNS:
        return None
    rows = [[name, *(f.get(c) for c in columns)] for name, f in flats]
    rows, note = _cap(rows)
    return Table(title, [entity_name or title, *columns], rows, part, source, note)


def _explicit_tables(value: Any, source: str) -> list[Table]:
    """A group's own ``"tables"`` field, shown as written."""
    items: list[tuple[str, Any]]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = [(str(t.get("title") or t.get("name") or f"table {i + 1}"), t) for i, t in enumerate(value) if isinstance(t, dict)]
    else:
        return []
    out = []
    for title, t in items:
        if isinstance(t, dict) and isinstance(t.get("columns"), list) and isinstance(t.get("rows"), list):
            cols = [str(c) for c in t["columns"]]
            rows = [[c if is_scalar(c) else _summarise_list(c) if isinstance(c, list) else str(c) for c in r] if isinstance(r, list) else [r] for r in t["rows"]]
            rows, note = _cap(rows, str(t.get("note") or ""))
            out.append(Table(str(title), cols, rows, "metrics", source, note))
        elif isinstance(t, list) and t and all(isinstance(r, dict) for r in t):
            cols = list(dict.fromkeys(k for r in t for k in r))
            rows = [[r.get(c) if is_scalar(r.get(c)) else flatten_cell(r.get(c)) for c in cols] for r in t]
            rows, note = _cap(rows)
            out.append(Table(str(title), cols, rows, "metrics", source, note))
        else:
            tab = kv_table(str(title), t, "metrics", source)
            if tab:
                out.append(tab)
    return out


def flatten_cell(v: Any) -> Scalar:
    if isinstance(v, list):
        return _summarise_list(v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in flatten(v).items())
    return v


def _records(v: Any) -> list[tuple[str, Any]] | None:
    """Named entities when ``v`` is an object of objects or a list of objects, else None."""
    if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
        return [(str(k), x) for k, x in v.items()]
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        return [(_row_name(x, i), x) for i, x in enumerate(v)]
    return None


def _row_name(row: dict[str, Any], i: int) -> str:
    for k in ("name", "id", "hook", "epoch", "step", "layer", "fold", "model"):
        if is_scalar(row.get(k)) and row.get(k) is not None:
            return f"{k} {row[k]}" if k in ("epoch", "step", "layer", "fold") else str(row[k])
    return str(i)


def json_tables(data: Any, source: str) -> list[Table]:
    """Every table a JSON document gives (see the module docstring for the rules)."""
    if isinstance(data, list):
        rec = _records(data)
        tab = grid_table(source, rec, "metrics", source) if rec else None
        return [tab] if tab else [t for t in [kv_table(source, data, "metrics", source)] if t]
    if not isinstance(data, dict):
        return []
    tables: list[Table] = []
    summary: list[list[Any]] = []
    for key, value in data.items():
        if is_scalar(value):
            summary.append([key, value])
        elif isinstance(value, list) and all(is_scalar(x) for x in value):
            summary.append([key, _summarise_list(value)])
        elif key == "tables":
            tables += _explicit_tables(value, source)
        elif key in VERSION_KEYS and isinstance(value, dict):
            t = kv_table(key, value, "versions", source)
            if t:
                tables.append(t)
        elif key in CONFIG_KEYS and isinstance(value, dict):
            t = kv_table(key, value, "config", source)
            if t:
                tables.append(t)
        else:
            rec = _records(value)
            t = grid_table(key, rec, "metrics", source, entity_name=key) if rec else None
            if t is None:
                if rec and all(isinstance(x, dict) and all(is_placeholder(v) for v in flatten(x).values()) for _, x in rec):
                    summary.append([key, f"{len(rec):,} entries of long lists (not shown)"])
                    continue
                flat = flatten(value)
                if flat and all(is_placeholder(v) for v in flat.values()):
                    summary.append([key, f"{len(flat):,} × {next(iter(flat.values()))} (not shown)"])
                    continue
                t = kv_table(key, value, "metrics", source)
            if t:
                tables.append(t)
    if summary:
        rows, note = _cap(summary)
        tables.insert(0, Table("summary", ["field", "value"], rows, "metrics", source, note))
    return tables


def format_cell(v: Any) -> str:
    """A value as the page shows it: ints with separators, floats to 4 significant digits."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e6 or a < 1e-3:
            return f"{v:.3e}"
        return f"{v:.4g}"
    text = str(v)
    return text if len(text) <= 400 else text[:400] + "…"
