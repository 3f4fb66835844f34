"""What a run folder holds: its kind, told from its files, and what a report shows of it.

Viz reads files only, so a folder copied off a cluster reports the same. Kinds it knows by their
files (what the xsae commands write):

* ``sae``: ``xsae sae train`` (``run.json``, ``metrics.json``, ``train_log.jsonl`` with a hook per
  line, one SAELens folder per hook with ``cfg.json`` and, after ``xsae sae features``,
  ``features.json``). The restoration model's SAEs (``xsae restore sae``) share this layout.
* ``sane``: ``xsae sane train`` (``checkpoint_epoch_N/config.json`` with the history), ``xsae sane
  embed`` (``model_embeddings.json``, here or one folder down) and ``xsae sane evaluate``
  (``lineage.json``).
* ``align`` / ``restore`` and any group still to come: by the ``kind`` or ``format`` field of their
  JSON (``report.json``, ``config.json``), read generically (:mod:`xsae_cli.viz.tables`): any JSON
  with numbers gives tables, any JSON-lines log with a step gives curves, any picture is shown.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xsae_cli.core.errors import XsaeError
from xsae_cli.viz import curves as C
from xsae_cli.viz.tables import Table, json_tables, numeric_leaves

PICTURES = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}
SKIP_DIRS = {"checkpoints", "__pycache__", "node_modules", "sane-cache", "wandb"}
MAX_JSON_BYTES = 20 * 1024 * 1024  # bigger JSON files are listed, not parsed for tables
CHECKPOINT_RE = re.compile(r"checkpoint_epoch_(\d+)")
LOOKED_FOR = (
    "run.json / metrics.json / train_log.jsonl (xsae sae train), checkpoint_epoch_N/config.json (xsae sane train), "
    "model_embeddings.json (xsae sane embed), lineage.json (xsae sane evaluate), report.json (xsae align), "
    "config.json (xsae restore train), or any *.json with numbers or *.jsonl log with a step"
)
FORMAT_KINDS = {"xsae-sane-checkpoint": "sane", "xsae-sane-embeddings": "sane", "xsae-sane-lineage": "sane", "xsae-align-report": "align", "xsae-restoration": "restore"}
KIND_TITLES = {"sae": "SAE run", "sane": "SANE run", "align": "alignment run", "restore": "restoration run", "pictures": "pictures", "run": "run"}


@dataclass
class Picture:
    """An image file already in the run folder, embedded as it is."""

    path: Path
    name: str  # relative to the run folder
    mime: str
    data: bytes


@dataclass
class RunInfo:
    """Everything a report section shows of one run folder."""

    path: Path
    name: str
    kind: str = "run"
    kinds: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    series: list[C.Series] = field(default_factory=list)
    embeddings: list[Path] = field(default_factory=list)  # model_embeddings.json files: cluster plots
    pictures: list[Picture] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # what was read, relative to the run folder
    notes: list[str] = field(default_factory=list)  # what could not be read, and why

    @property
    def title(self) -> str:
        return KIND_TITLES.get(self.kind, f"{self.kind} run")

    def add_kind(self, kind: str) -> None:
        if kind not in self.kinds:
            self.kinds.append(kind)


# ---------------------------------------------------------------------------------------- detection


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")) and p.name not in SKIP_DIRS)
    except OSError:
        return []


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))
    except OSError:
        return []


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for p in _subdirs(folder):
        m = CHECKPOINT_RE.fullmatch(p.name)
        if m and (p / "config.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _json_with_numbers(path: Path) -> bool:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            return True  # too big to peek at; a big JSON in a run folder is a result
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, (dict, list)) and numeric_leaves(data) > 0


def is_run(folder: Path) -> bool:
    """Whether ``folder`` holds something a run wrote (at its top level, or SANE checkpoints)."""
    if _checkpoints(folder):
        return True
    if _files(folder, (".jsonl",)):
        return True
    return any(_json_with_numbers(p) for p in _files(folder, (".json",)))


def has_pictures(folder: Path) -> bool:
    return bool(_files(folder, tuple(PICTURES)))


@dataclass
class Target:
    """A folder the report gives a section: a run, or loose pictures beside runs (``pictures_only``)."""

    path: Path
    pictures_only: bool = False


def find_runs(paths: list[str | Path]) -> list[Target]:
    """The sections behind ``paths``: each path itself when it is a run, else its run subfolders."""
    if not paths:
        raise XsaeError("no run folders given", "e.g. xsae viz report runs/sae runs/sane --output report.html")
    found: list[Target] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise XsaeError(f"run folder not found: {p}", "check the path")
        if not p.is_dir():
            raise XsaeError(f"{p} is a file, not a run folder", f"give the folder that holds it: xsae viz report {p.parent}")
        if is_run(p):
            found.append(Target(p))
            continue
        kids = [Target(c) for c in _subdirs(p) if is_run(c)]
        if has_pictures(p):
            found.append(Target(p, pictures_only=True))  # e.g. plots written beside the demo's runs
        elif not kids:
            raise XsaeError(f"nothing xsae wrote in {p}: looked for {LOOKED_FOR}, in it and in its subfolders", "point at the --out folder of an xsae run, or a folder holding such folders")
        found += kids
    unique: list[Target] = []
    seen: set[Path] = set()
    for t in found:
        r = t.path.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(t)
    return unique


# ------------------------------------------------------------------------------------------ reading


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _read_json(path: Path, info: RunInfo) -> Any:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            info.notes.append(f"{_rel(path, info.path)}: {path.stat().st_size / 2**20:.0f} MB, too big to tabulate; not read")
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        info.notes.append(f"{_rel(path, info.path)} is not valid JSON ({exc}); not shown")
        return None


def _add_tables(info: RunInfo, data: Any, path: Path) -> None:
    source = _rel(path, info.path)
    info.tables += json_tables(data, source)
    if source not in info.files:
        info.files.append(source)
    if isinstance(data, dict):
        # A group names its run in a top-level file's "kind" (align's report.json) or "format".
        kind = data.get("kind") if isinstance(data.get("kind"), str) and path.parent == info.path else None
        fmt = data.get("format") if isinstance(data.get("format"), str) else None
        if kind:
            info.add_kind(kind)
        elif fmt in FORMAT_KINDS:
            info.add_kind(FORMAT_KINDS[fmt])


def _hook_tables(info: RunInfo, hook_dirs: list[Path]) -> None:
    """The SAELens folders: one row per hook, and the most active latents where features exist."""
    rows = []
    for d in hook_dirs:
        cfg = _read_json(d / "cfg.json", info)
        if not isinstance(cfg, dict):
            continue
        info.files.append(_rel(d / "cfg.json", info.path))
        meta = _v if isinstance(_v := cfg.get("metadata"), dict) else {}
        feats = d / "features.json"
        rows.append(
            [
                d.name,
                cfg.get("hook_name") or meta.get("hook_name"),
                cfg.get("architecture"),
                cfg.get("d_in"),
                cfg.get("d_sae"),
                cfg.get("k"),
                cfg.get("dtype"),
                "yes" if (d / "sae_weights.safetensors").exists() or (d / "sae.safetensors").exists() else "no",
                "yes" if feats.exists() else "no",
            ]
        )
        if feats.exists():
            _feature_table(info, feats, cfg.get("hook_name") or meta.get("hook_name") or d.name)
    if rows:
        info.tables.insert(0, Table("SAEs (SAELens layout)", ["folder", "hook", "architecture", "d_in", "d_sae", "k", "dtype", "weights", "features.json"], rows, "metrics", "<hook>/cfg.json"))


TOP_LATENTS = 8


def _feature_table(info: RunInfo, path: Path, hook: str) -> None:
    data = _read_json(path, info)
    if not isinstance(data, dict) or not isinstance(data.get("latents"), list):
        if data is not None:
            info.notes.append(f"{_rel(path, info.path)}: missing field 'latents'; not shown")
        return
    info.files.append(_rel(path, info.path))
    lats = [lat for lat in data["latents"] if isinstance(lat, dict) and isinstance(lat.get("frequency"), (int, float))]
    lats.sort(key=lambda lat: -lat["frequency"])
    rows = []
    for lat in lats[:TOP_LATENTS]:
        ctx = ""
        tops = lat.get("top_contexts") or []
        if tops and isinstance(tops[0], dict) and isinstance(tops[0].get("tokens"), list):
            toks = [str(t) for t in tops[0]["tokens"]]
            i = tops[0].get("max_index") if isinstance(tops[0].get("max_index"), int) and 0 <= tops[0]["max_index"] < len(toks) else None
            if i is not None:
                toks[i] = f"[{toks[i]}]"
                toks = toks[max(0, i - 6) : i + 4]
            ctx = "".join(toks[:12]).replace("\n", "↵")
        lens = _v if isinstance(_v := lat.get("logit_lens"), dict) else {}
        promoted = ", ".join(repr(str(p[0])) for p in (lens.get("promoted") or [])[:5] if isinstance(p, list) and p)
        rows.append([lat.get("id"), lat["frequency"], lat.get("mean_act"), lat.get("max_act"), ctx, promoted])
    dead = data.get("dead_fraction")
    note = f"{len(data['latents']):,} latents" + (f", {100 * dead:.1f}% dead" if isinstance(dead, (int, float)) else "") + f"; every latent: xsae viz features {info.path} --hook {hook}"
    info.tables.append(
        Table(
            f"most frequent latents · {hook}", ["latent", "frequency", "mean act", "max act", "top context ([max token])", "promoted tokens (logit lens)"], rows, "metrics", _rel(path, info.path), note
        )
    )


def _sane_series(info: RunInfo, folder: Path, label: str) -> list[Path]:
    """The SANE history of a train folder's latest checkpoint; returns the checkpoint folders."""
    ckpts = _checkpoints(folder)
    if not ckpts:
        return []
    latest = ckpts[-1][1] / "config.json"
    try:
        s = C.read_sane_history(latest, label)
    except XsaeError as exc:
        info.notes.append(str(exc))
        s = None
    if s is not None and s.x:
        info.series.append(s)
    return [p for _, p in ckpts]


def _is_sae_folder(d: Path) -> bool:
    """An SAE's own folder: SAELens (or sparsify) config beside its weights or its features."""
    return (d / "cfg.json").is_file() and any((d / f).exists() for f in ("sae_weights.safetensors", "sae.safetensors", "features.json"))


def _pictures(info: RunInfo, folders: list[Path], max_bytes: int) -> None:
    for folder in folders:
        for p in _files(folder, tuple(PICTURES)):
            rel = _rel(p, info.path)
            size = p.stat().st_size
            if size == 0:
                info.notes.append(f"{rel} is empty; not shown")
                continue
            if size > max_bytes:
                info.notes.append(f"{rel} is {size / 2**20:.3g} MB, over the {max_bytes / 2**20:.3g} MB limit for embedded pictures ([viz] max_image_mb); not embedded")
                continue
            data = p.read_bytes()
            mime = PICTURES[p.suffix.lower()]
            if not _looks_like(data, mime):
                info.notes.append(f"{rel} is not a {mime.split('/')[1].split('+')[0].upper()} image; not shown")
                continue
            info.pictures.append(Picture(p, rel, mime, data))


def _looks_like(data: bytes, mime: str) -> bool:
    head = data[:512]
    return {
        "image/png": head.startswith(b"\x89PNG\r\n\x1a\n"),
        "image/jpeg": head.startswith(b"\xff\xd8\xff"),
        "image/gif": head.startswith((b"GIF87a", b"GIF89a")),
        "image/webp": head[:4] == b"RIFF" and head[8:12] == b"WEBP",
        "image/svg+xml": b"<svg" in data[:4096],
    }[mime]


def read_run(folder: str | Path, name: str | None = None, max_image_bytes: int = 8 * 2**20, pictures_only: bool = False) -> RunInfo:
    """Read one run folder into what its report section shows; unreadable files become notes."""
    folder = Path(folder)
    info = RunInfo(folder, name or folder.name or str(folder.resolve().name))
    if pictures_only:
        _pictures(info, [folder], max_image_bytes)
        info.kind = "pictures"
        return info
    claimed: set[Path] = set()
    subdirs = _subdirs(folder)

    # SAE: the run's JSON is read generically below; its hook folders and log are read here.
    hook_dirs = [d for d in subdirs if _is_sae_folder(d)]
    if _is_sae_folder(folder):  # one hook's folder given on its own
        hook_dirs.insert(0, folder)
    log = folder / "train_log.jsonl"
    logs = _files(folder, (".jsonl",)) + [p for d in subdirs if d not in hook_dirs for p in _files(d, (".jsonl",))]
    for p in logs:
        try:
            rows = C.read_jsonl(p)
            sae = C.is_sae_log(rows)
            series = C.read_log(p, info.name if p.parent == folder else f"{info.name}/{p.parent.name}", rows)
        except XsaeError as exc:
            info.notes.append(str(exc))
            continue
        if sae:
            info.add_kind("sae")
        info.series += [s for s in series if s.x]
        info.files.append(_rel(p, folder))
    if hook_dirs and (log.exists() or (folder / "run.json").exists() or (folder / "metrics.json").exists() or folder in hook_dirs):
        info.add_kind("sae")
    if hook_dirs:
        _hook_tables(info, hook_dirs)
        claimed |= set(hook_dirs)

    # SANE training: history from the latest checkpoint, here and in subfolders (lineage folds).
    ckpts = _sane_series(info, folder, info.name)
    if ckpts:
        info.add_kind("sane")
        latest = ckpts[-1] / "config.json"
        data = _read_json(latest, info)
        if data is not None:
            _add_tables(info, data, latest)
        claimed |= set(ckpts)
    for d in subdirs:
        if d in claimed:
            continue
        sub = _sane_series(info, d, f"{info.name}/{d.name}")
        if sub:
            info.add_kind("sane")
            info.files.append(_rel(sub[-1] / "config.json", folder))
            claimed.add(d)

    # SANE embeddings, here or one folder down: tables and a cluster plot.
    for p in [folder / "model_embeddings.json"] + [d / "model_embeddings.json" for d in subdirs if d not in claimed]:
        if p.is_file():
            info.embeddings.append(p)
            info.add_kind("sane")

    # Every other JSON here and one folder down (not inside claimed folders): tables.
    jsons = _files(folder, (".json",)) + [p for d in subdirs if d not in claimed for p in _files(d, (".json",))]
    for p in jsons:
        if p.parent in hook_dirs and p.name in ("cfg.json", "features.json"):
            continue  # read above
        data = _read_json(p, info)
        if data is None:
            continue
        if numeric_leaves(data) == 0 and not (isinstance(data, dict) and isinstance(data.get("tables"), (dict, list))):
            continue  # a vocabulary, a tokenizer: nothing to tabulate
        _add_tables(info, data, p)

    _pictures(info, [folder] + [d for d in subdirs if d not in claimed or d in hook_dirs], max_image_bytes)

    # De-duplicate tables (metrics.json repeats run.json's settings and versions).
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for t in info.tables:
        k = t.key()
        if k not in seen:
            seen.add(k)
            unique.append(t)
    info.tables = unique
    known = [k for k in ("sae", "sane", "align", "restore") if k in info.kinds]
    others = [k for k in info.kinds if k not in known]
    info.kind = (known or others or ["pictures" if info.pictures and not info.tables and not info.series else "run"])[0]
    return info
