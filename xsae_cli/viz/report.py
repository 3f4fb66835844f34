"""`xsae viz report`: one offline HTML page summarising any run folders xsae wrote.

One section per run (with a table of contents when there are several): what kind of run it is
(told from its files, :mod:`xsae_cli.viz.runs`), its metrics, config and versions as tables, its
training curves (drawn by :mod:`xsae_cli.viz.curves`), a cluster plot of SANE embeddings (drawn
by :mod:`xsae_cli.viz.cluster`) and the pictures already in the folder. Everything is inside the
one file: pictures as base64 ``data:`` URIs, styles inline, no script or font fetched, so the page
can be mailed, archived or opened on a machine with no network. A file that cannot be read
becomes a note in its run's section rather than failing the page.
"""

from __future__ import annotations

import base64
import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xsae_cli.core.console import warn
from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import atomic_write_text
from xsae_cli.viz import style
from xsae_cli.viz.common import esc
from xsae_cli.viz.runs import RunInfo, Target, find_runs, read_run
from xsae_cli.viz.tables import Table, format_cell, is_number

OPEN_ROWS = 14  # tables up to this long are shown open; longer ones fold behind their title


@dataclass
class Figure:
    """A picture of the page: drawn here (curves, cluster) or found in the run folder."""

    title: str
    mime: str
    data: bytes
    caption: str
    kind: str  # "curves", "cluster" or "picture"

    def uri(self) -> str:
        return f"data:{self.mime};base64," + base64.b64encode(self.data).decode("ascii")


def _names(targets: list[Target]) -> list[str]:
    """Section names: the folder's name, with its parent's where two runs share a name."""
    base = [t.path.resolve().name or str(t.path) for t in targets]
    out = []
    for t, b in zip(targets, base):
        if base.count(b) > 1:
            r = t.path.resolve()
            b = f"{r.parent.name}/{r.name}"
        out.append(b)
    return out


def _figures(info: RunInfo, method: str, dpi: int, seed: int) -> list[Figure]:
    figs: list[Figure] = []
    if info.series:
        from xsae_cli.viz.curves import curves_image

        try:
            png, panels = curves_image(info.series, f"Training curves ({info.name})", "png", dpi)
            xs = sorted({p.xlabel for p in panels})
            figs.append(Figure("Training curves", "image/png", png, f"{len(info.series)} series against {' / '.join(xs)}: {', '.join(p.title.lower() for p in panels)}", "curves"))
        except XsaeError as exc:
            info.notes.append(f"training curves: {exc}")
    for path in info.embeddings:
        from xsae_cli.viz import cluster as CL

        rel = path.relative_to(info.path) if path.is_relative_to(info.path) else path
        try:
            emb = CL.load_embeddings(path)
            try:
                proj = CL.project(emb.vectors, method, seed=seed)
            except XsaeError as exc:
                if method == "pca":
                    raise
                info.notes.append(f"cluster plot: {exc}; drawn with PCA instead")
                proj = CL.project(emb.vectors, "pca", seed=seed)
            png = CL.cluster_image(emb, proj, "png", dpi)
            fams = sorted(set(emb.families))
            figs.append(
                Figure(
                    "Model embeddings",
                    "image/png",
                    png,
                    f"{len(emb.names)} models from {rel} ({proj.method.upper() if proj.method != 'tsne' else 't-SNE'}), coloured by family: {', '.join(fams)}",
                    "cluster",
                )
            )
        except XsaeError as exc:
            info.notes.append(f"cluster plot of {rel}: {exc}")
    if "align" in info.kinds:
        figs += _align_figures(info, dpi)
    for pic in info.pictures:
        figs.append(Figure(pic.name, pic.mime, pic.data, f"{pic.name} ({len(pic.data) / 1024:.0f} KB, from the run folder)", "picture"))
    return figs


def _align_figures(info: RunInfo, dpi: int) -> list[Figure]:
    """An align run's own pictures (``xsae viz align``), when its report.json is a real alignment report."""
    import json

    from xsae_cli.viz import align as AL

    path = info.path / AL.REPORT_NAME
    try:
        fmt = json.loads(path.read_text(encoding="utf-8")).get("format") if path.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return []  # already a note from reading the run
    if fmt != AL.ALIGN_FORMAT:
        return []  # a report in another shape: its tables are shown, there is nothing to draw
    try:
        rep = AL.load_align_report(path)
        images = AL.figures_bytes(rep, "png", dpi)
    except XsaeError as exc:
        info.notes.append(f"alignment plots: {exc}")
        return []
    info.notes += rep.notes
    pairs = ", ".join(lp.label.removeprefix("layers ") for lp in rep.layers)
    figs = [
        Figure(
            "Mappers next to null, 2nd-SAE reference and upper bound",
            "image/png",
            images["bars"],
            f"held-out R² of each mapper, {rep.a} ↔ {rep.b}, both directions, layer pairs {pairs}: grey = shuffled-pair null, blue = mapper, orange = target through its 2nd-seed SAE (a reference, not a bound), green = upper bound (the mapper fit on the test pairs)",
            "align",
        )
    ]
    if "heatmap" in images:
        figs.insert(
            0,
            Figure("Matched latents", "image/png", images["heatmap"], f"test correlations of the best one-to-one matched SAE latents of {rep.a} (rows) and {rep.b} (columns), per layer pair", "align"),
        )
    return figs


def _plural(n: int, word: str) -> str:
    return "" if n == 0 else f"{n} {word}" + ("s" if n != 1 else "")


def _table_html(t: Table) -> str:
    numeric = [bool(t.rows) and all(is_number(r[i]) or r[i] is None for r in t.rows if i < len(r)) for i in range(len(t.columns))]
    head = "".join(f'<th class="n">{esc(c)}</th>' if numeric[i] and i else f"<th>{esc(c)}</th>" for i, c in enumerate(t.columns))
    body = []
    for r in t.rows:
        cells = []
        for _i, v in enumerate(r):
            cls = ' class="n"' if is_number(v) else ""
            cells.append(f"<td{cls}>{esc(format_cell(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = f'<p class="note">{esc(t.note)}</p>' if t.note else ""
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{note}"
    label = f'{esc(t.title)} <span class="src">{esc(t.source)}</span>'
    open_ = " open" if len(t.rows) <= OPEN_ROWS else ""
    return f'<details class="tbl"{open_}><summary>{label} <span class="count">{len(t.rows):,} row{"s" if len(t.rows) != 1 else ""}</span></summary>{table}</details>'


def _section_html(i: int, info: RunInfo, figs: list[Figure]) -> str:
    parts = [f'<section class="run" id="run-{i}" data-kind="{esc(info.kind)}">']
    parts.append(f'<h2><span class="idx">{i}.</span> {esc(info.name)} <span class="kind k-{esc(info.kind)}">{esc(info.title)}</span></h2>')
    facts = [f'<span class="path">{esc(info.path)}</span>']
    if info.files:
        facts.append("read " + ", ".join(f"<code>{esc(f)}</code>" for f in info.files))
    parts.append(f'<p class="facts">{" · ".join(facts)}</p>')
    if info.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in info.notes) + "</ul>")
    groups = [
        ("Metrics", [t for t in info.tables if t.part == "metrics"], []),
        ("Training curves", [], [f for f in figs if f.kind == "curves"]),
        ("Alignment", [], [f for f in figs if f.kind == "align"]),
        ("Model embeddings", [], [f for f in figs if f.kind == "cluster"]),
        ("Pictures", [], [f for f in figs if f.kind == "picture"]),
        ("Config", [t for t in info.tables if t.part == "config"], []),
        ("Versions", [t for t in info.tables if t.part == "versions"], []),
    ]
    for title, tables, pics in groups:
        if not tables and not pics:
            continue
        parts.append(f"<h3>{title}</h3>")
        parts += [_table_html(t) for t in tables]
        for f in pics:
            parts.append(f'<figure class="{f.kind}"><img src="{f.uri()}" alt="{esc(f.title)}" loading="eager"><figcaption>{esc(f.caption)}</figcaption></figure>')
    parts.append("</section>")
    return "\n".join(parts)


def build_report(run_dirs: list[str | Path], method: str = "pca", dpi: int = style.DPI, seed: int = 0, title: str | None = None, max_image_mb: float = 8.0) -> tuple[str, dict[str, Any]]:
    """The page's HTML and a summary of what it holds."""
    from xsae_cli import __version__

    targets = find_runs(run_dirs)
    names = _names(targets)
    sections, toc, summary_runs = [], [], []
    n_figs = 0
    for i, (t, name) in enumerate(zip(targets, names), start=1):
        info = read_run(t.path, name, max_image_bytes=int(max_image_mb * 2**20), pictures_only=t.pictures_only)
        figs = _figures(info, method, dpi, seed)
        for n in info.notes:
            warn(f"{info.name}: {n}")
        n_figs += len(figs)
        sections.append(_section_html(i, info, figs))
        counts = [_plural(len(info.tables), "table"), _plural(len(figs), "picture")]
        toc.append(
            f'<li><a href="#run-{i}">{esc(info.name)}</a> <span class="kind k-{esc(info.kind)}">{esc(info.title)}</span> <span class="count">{esc(", ".join(c for c in counts if c))}</span></li>'
        )
        summary_runs.append(
            {
                "name": info.name,
                "path": str(t.path),
                "kind": info.kind,
                "kinds": info.kinds,
                "tables": len(info.tables),
                "figures": {k: sum(f.kind == k for f in figs) for k in ("curves", "cluster", "picture", *(("align",) if "align" in info.kinds else ()))},
                "files": info.files,
                "notes": info.notes,
            }
        )
    heading = title or ("xsae report" + (f": {names[0]}" if len(names) == 1 else ""))
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    facts = f"{len(targets)} run{'s' if len(targets) != 1 else ''} · written {when} by xsae {__version__} · self-contained: no network needed"
    nav = f'<nav id="toc"><h2>Contents</h2><ol>{"".join(toc)}</ol></nav>' if len(targets) > 1 else ""
    page = _TEMPLATE.replace("__TITLE__", esc(heading)).replace("__FACTS__", esc(facts)).replace("__NAV__", nav).replace("__SECTIONS__", "\n".join(sections))
    return page, {"runs": len(targets), "sections": summary_runs, "figures": n_figs}


def write_report(run_dirs: list[str | Path], output: str | Path, method: str = "pca", dpi: int = style.DPI, seed: int = 0, title: str | None = None, max_image_mb: float = 8.0) -> dict[str, Any]:
    """Build the page for ``run_dirs`` and write it atomically to ``output``."""
    page, summary = build_report(run_dirs, method=method, dpi=dpi, seed=seed, title=title, max_image_mb=max_image_mb)
    output = Path(output)
    atomic_write_text(output, page)
    return {"written": str(output), **summary, "bytes": len(page.encode("utf-8"))}


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
:root{--fg:#1d232a;--muted:#66707a;--line:#e3e6ea;--bg:#f6f7f9;--accent:#0072B2}
*{box-sizing:border-box}
body{font:14px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:var(--fg);background:var(--bg)}
header{background:#fff;border-bottom:1px solid var(--line);padding:14px 28px}
h1{font-size:20px;margin:0 0 2px} .facts{color:var(--muted);font-size:12.5px;margin:2px 0 8px;overflow-wrap:anywhere}
main{padding:16px 28px 48px;max-width:1180px}
nav#toc{background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 18px;margin-bottom:18px}
nav#toc h2{font-size:15px;margin:4px 0} nav#toc ol{margin:4px 0;padding-left:22px} nav#toc li{margin:2px 0}
a{color:var(--accent);text-decoration:none} a:hover{text-decoration:underline}
section.run{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 20px 16px;margin-bottom:20px}
section.run h2{font-size:18px;margin:4px 0 2px} .idx{color:var(--muted);font-weight:400}
h3{font-size:14.5px;margin:18px 0 6px;padding-top:6px;border-top:1px solid var(--line);color:#2b3540}
.kind{display:inline-block;font-size:11.5px;font-weight:600;border-radius:10px;padding:1px 9px;vertical-align:middle;background:#e8eef5;color:#24527a}
.k-sae{background:#e3f0fa;color:#0b5c91} .k-sane{background:#fdf0dc;color:#8a5a00} .k-align{background:#e2f4ec;color:#0a6b47}
.k-restore{background:#f9e6ee;color:#8e2b5b} .k-pictures{background:#eee;color:#444}
.count,.src{color:var(--muted);font-size:12px;font-weight:400} .src{font-family:ui-monospace,Menlo,Consolas,monospace}
code{font:12px ui-monospace,Menlo,Consolas,monospace;background:#f1f3f5;border-radius:3px;padding:0 3px}
ul.notes{background:#fff8e6;border:1px solid #f1dca4;border-radius:6px;padding:6px 10px 6px 28px;font-size:12.5px;color:#6b4e00}
details.tbl{margin:6px 0 10px} details.tbl>summary{cursor:pointer;font-weight:600;font-size:13px;margin-bottom:4px}
table{border-collapse:collapse;font-size:12.5px;margin:2px 0 2px 14px;max-width:calc(100% - 14px);display:block;overflow-x:auto}
th,td{border-bottom:1px solid var(--line);padding:3px 10px 3px 6px;text-align:left;vertical-align:top;overflow-wrap:anywhere;max-width:520px}
th{background:#f8f9fb;font-weight:600;position:sticky;top:0} td:first-child{white-space:nowrap;overflow-wrap:normal} td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:hover{background:#fafbfc} .note{color:var(--muted);font-size:12px;margin:2px 0 0 14px}
figure{margin:8px 0 14px;text-align:center} figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:4px;background:#fff}
figure.curves img,figure.align img{max-width:1000px} figure.cluster img,figure.picture img{max-width:820px} figcaption{color:var(--muted);font-size:12.5px;margin-top:4px}
#errors{color:#b3261e;white-space:pre-wrap}
</style></head>
<body>
<header><h1>__TITLE__</h1><div class="facts">__FACTS__</div></header>
<main>
__NAV__
__SECTIONS__
<div id="errors" hidden></div>
</main>
<script>
(function () {
  'use strict';
  // A picture that does not decode, or any script error, is shown on the page (and tested for).
  var errors = document.getElementById('errors');
  function report(text) { errors.hidden = false; errors.textContent += text + '\n'; }
  window.addEventListener('error', function (e) {
    var t = e.target;
    report(t && t.tagName === 'IMG' ? 'picture did not load: ' + t.alt : 'error: ' + e.message);
  }, true);
  window.addEventListener('load', function () {
    var imgs = document.images, ok = 0;
    for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
    document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
  });
})();
</script>
</body></html>
"""
