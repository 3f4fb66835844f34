"""`xsae viz align`: the pictures of an alignment report (``report.json`` of ``xsae align transfer``).

Two figures, both read from the report alone (viz imports no align code, so a report copied off a
cluster plots the same):

* **bars**: one panel per layer pair and direction; for every mapper and space, the held-out score
  of the mapper next to its *shuffled-pair null* (what the same mapper scores with the pairing
  destroyed), its *second-SAE reference* (the same mapper from the target model to itself through a
  second-seed SAE; called "ceiling" in earlier reports, but exact maps can beat it) and its *upper
  bound* (the same mapper fit on the test pairs it is scored on). A mapper bar is only worth
  reading next to those: a high R^2 with a high null says nothing, and the upper bound says how
  much a map of that kind could get on these rows. Reports from before the upper bound existed
  draw without it.
* **heatmap**: per layer pair, the test correlations between the best one-to-one matched latents of
  model A's SAE and model B's (``latent_matching.top_pairs``). The diagonal is each pair; the rest
  shows whether a match is specific or one of many look-alikes. Reports written before that field
  existed still give the bars; the heatmap is skipped with a note saying how to get it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import read_json
from xsae_cli.viz import style
from xsae_cli.viz.common import finite, require

ALIGN_FORMAT = "xsae-align-report"  # align/transfer.py's REPORT_FORMAT (not imported: viz reads files only)
REPORT_NAME = "report.json"
DIRECTIONS = ("a->b", "b->a")
VARIANTS = ("null", "test", "sae_ref", "upper")
VARIANT_LABELS = {"null": "shuffled-pair null", "test": "mapper (held-out test)", "sae_ref": "2nd-SAE reference (target to itself)", "upper": "upper bound (fit on test pairs)"}
VARIANT_COLORS = {"null": "#9aa3ab", "test": style.PALETTE[0], "sae_ref": style.PALETTE[1], "upper": style.PALETTE[2]}
OLD_NAMES = {"sae_ref": "ceiling"}  # the key earlier reports used
OPTIONAL = ("upper",)  # absent in earlier reports: drawn where present
# The score drawn and what its axis says: each is unitless, so the label says its scale instead.
METRICS = {
    "r2": "held-out R² (fraction of variance; 0 = training-mean predictor)",
    "cosine": "centred cosine, per token (unitless, -1 to 1)",
    "latent_r": "mean Pearson r of target latents (unitless, -1 to 1)",
    "f1": "active-latent F1 per token (fraction, 0 to 1)",
    "matched_fraction": "matched latents (fraction of alive target latents)",
}
FIGURE_NAMES = {"bars": "align_bars", "heatmap": "align_heatmap"}
HEAT_COLS = 3  # heatmap panels per row
LOW_CLIP = -1.0  # scores below this (a null's R² can be very negative) are clipped and labelled


@dataclass
class BarRow:
    """One mapper in one space, in one direction: its score and its null, references and mean predictor."""

    space: str
    mapper: str
    values: dict[str, float | None]  # null / test / sae_ref / upper (None: not in the report)
    mean: float | None

    @property
    def label(self) -> str:
        return f"{self.mapper}\n{self.space}"


@dataclass
class Heat:
    """The matched pairs' correlation block at one layer pair (rows A's latents, columns B's)."""

    latents_a: list[int]
    latents_b: list[int]
    r: list[list[float]]


@dataclass
class LayerPair:
    layer_a: int
    layer_b: int
    directions: dict[str, list[BarRow]]
    heat: Heat | None

    @property
    def label(self) -> str:
        return f"layers {self.layer_a}:{self.layer_b}"


@dataclass
class AlignReport:
    path: Path
    a: str
    b: str
    metric: str
    layers: list[LayerPair]
    notes: list[str] = field(default_factory=list)

    def arrow(self, direction: str) -> str:
        return f"{self.a} → {self.b}" if direction == "a->b" else f"{self.b} → {self.a}"

    @property
    def has_heat(self) -> bool:
        return any(lp.heat is not None and lp.heat.latents_a for lp in self.layers)


# ---------------------------------------------------------------------------------------- reading


def report_file(path: str | Path) -> Path:
    """The report file: ``path`` itself, or ``path/report.json`` for a run folder."""
    p = Path(path)
    if p.is_dir():
        p = p / REPORT_NAME
        if not p.exists():
            raise XsaeError(f"{path} holds no {REPORT_NAME}", "point at the --out folder of `xsae align transfer` or its report.json")
    return p


def load_align_report(path: str | Path, metric: str = "r2") -> AlignReport:
    """Read and check an alignment report; any missing field is a one-line error naming it."""
    if metric not in METRICS:
        raise XsaeError(f"unknown --metric '{metric}'", f"use one of: {', '.join(METRICS)}")
    p = report_file(path)
    data = read_json(p, "alignment report")
    if not isinstance(data, dict):
        raise XsaeError(f"{p}: not an xsae alignment report (a JSON {type(data).__name__}, not an object)", "point at the report.json of `xsae align transfer`")
    fmt = require(data, "format", p)
    if fmt != ALIGN_FORMAT:
        raise XsaeError(f"{p}: field 'format' is '{fmt}', not '{ALIGN_FORMAT}'", "point at the report.json of `xsae align transfer`")
    a, b = str(require(data, "a", p, kind=str)), str(require(data, "b", p, kind=str))
    results = require(data, "results", p, kind=list)
    if not results:
        raise XsaeError(f"{p}: field 'results' is empty (no layer pairs)", "re-run `xsae align transfer` with --layers")
    layers = []
    notes: list[str] = []
    for i, res in enumerate(results):
        where = f"results[{i}]"
        la = require(res, "layer_a", p, where, int)
        lb = require(res, "layer_b", p, where, int)
        dirs = require(res, "directions", p, where, dict)
        rows: dict[str, list[BarRow]] = {}
        for d in DIRECTIONS:
            got = require(dirs, d, p, f"{where}.directions", list)
            rows[d] = [_bar_row(row, p, f"{where}.directions['{d}'][{j}]", metric) for j, row in enumerate(got)]
            if not rows[d]:
                raise XsaeError(f"{p}: {where}.directions['{d}'] is empty (no mappers)", "re-run `xsae align transfer` with --mappers")
        layers.append(LayerPair(la, lb, rows, _heat(res, p, where)))
    bare = [lp.label for lp in layers if lp.heat is None]
    if bare:
        notes.append(f"{p}: no latent_matching.top_pairs at {', '.join(bare)} (written by xsae align transfer since it stores matched pairs); heatmap skipped there, re-run the transfer to draw it")
    empty = [lp.label for lp in layers if lp.heat is not None and not lp.heat.latents_a]
    if empty:
        notes.append(f"{p}: no latent of {b} fired often enough to be paired at {', '.join(empty)}; no heatmap there")
    return AlignReport(p, a, b, metric, layers, notes)


def _bar_row(row: Any, p: Path, where: str, metric: str) -> BarRow:
    space = require(row, "space", p, where, str)
    mapper = require(row, "mapper", p, where, str)
    values: dict[str, Any] = {}
    for v in VARIANTS:
        key = OLD_NAMES[v] if v not in row and OLD_NAMES.get(v) in row else v
        if v in OPTIONAL and key not in row:
            values[v] = None
            continue
        scores = require(row, key, p, where, dict)
        values[v] = finite(require(scores, metric, p, f"{where}.{v}"))  # None (NaN in the report) draws no bar
    mean = _v if isinstance(_v := row.get("mean"), dict) else {}
    return BarRow(space, mapper, values, finite(mean.get(metric)))


def _heat(res: dict[str, Any], p: Path, where: str) -> Heat | None:
    lm = res.get("latent_matching")
    top = lm.get("top_pairs") if isinstance(lm, dict) else None
    if top is None:
        return None
    w = f"{where}.latent_matching.top_pairs"
    la = require(top, "latents_a", p, w, list)
    lb = require(top, "latents_b", p, w, list)
    r = require(top, "r", p, w, list)
    if len(la) != len(lb) or len(r) != len(la) or any(not isinstance(row, list) or len(row) != len(lb) for row in r):
        raise XsaeError(f"{p}: {w}: 'r' must be a {len(la)} x {len(lb)} matrix for {len(la)} latents of A and {len(lb)} of B", "re-create the report with `xsae align transfer`")
    return Heat([int(x) for x in la], [int(x) for x in lb], [[v if (v := finite(x)) is not None else float("nan") for x in row] for row in r])


# ---------------------------------------------------------------------------------------- drawing


def draw_bars(container: Any, rep: AlignReport) -> list[Any]:
    """One panel per layer pair (rows) and direction (columns) on ``container`` (a figure or subfigure)."""
    n = len(rep.layers)
    axes = container.subplots(n, len(DIRECTIONS), squeeze=False, sharey=True)
    vals = [v for lp in rep.layers for rows in lp.directions.values() for r in rows for v in r.values.values() if v is not None]
    lo = min([0.0, *vals])
    bottom = max(LOW_CLIP, lo - 0.05) if lo < 0 else 0.0
    top = max([1.0 if rep.metric != "r2" else 0.0, *vals]) + 0.08
    shown = [v for v in VARIANTS if v not in OPTIONAL or any(r.values[v] is not None for lp in rep.layers for rows in lp.directions.values() for r in rows)]
    width = 0.8 / len(shown)
    for i, lp in enumerate(rep.layers):
        for j, d in enumerate(DIRECTIONS):
            ax = axes[i][j]
            rows = lp.directions[d]
            xs = list(range(len(rows)))
            for k, v in enumerate(shown):
                heights = [r.values[v] for r in rows]
                pos = [x + (k - (len(shown) - 1) / 2) * width for x, h in zip(xs, heights) if h is not None]
                hs = [max(h, bottom) for h in heights if h is not None]
                ax.bar(pos, hs, width, color=VARIANT_COLORS[v], label=VARIANT_LABELS[v] if i == 0 and j == 0 else None, gid=f"bar-{v}")
                for x, h in zip(pos, [h for h in heights if h is not None]):
                    if h < bottom:
                        ax.annotate(f"{h:.2f}", (x, bottom), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
            means = [(x, r.mean) for x, r in zip(xs, rows) if r.mean is not None]
            if means:
                ax.hlines(
                    [m for _, m in means], [x - 0.4 for x, _ in means], [x + 0.4 for x, _ in means], colors="black", linewidths=1.2, label="training-mean predictor" if i == 0 and j == 0 else None
                )
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_xticks(xs, [r.label for r in rows], fontsize=8)
            ax.set_ylim(bottom, top)
            ax.set_title(f"{rep.arrow(d)}, {lp.label}", fontsize=11)
            ax.grid(axis="x", visible=False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i] == "training-mean predictor")  # the bars first, in drawing order
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    container.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    container.supylabel(METRICS[rep.metric], fontsize=11)
    container.suptitle(f"Held-out mapper scores between {rep.a} and {rep.b}, next to null, 2nd-SAE reference and upper bound")
    return [ax for row in axes for ax in row]


def draw_heatmap(container: Any, rep: AlignReport) -> list[Any]:
    """One panel per layer pair with matched pairs: their test correlation block."""
    pairs = [lp for lp in rep.layers if lp.heat is not None and lp.heat.latents_a]
    if not pairs:
        raise XsaeError(f"{rep.path}: no layer pair has matched latents (latent_matching.top_pairs)", "re-run `xsae align transfer` (reports before this field give the bars only)")
    cols = min(HEAT_COLS, len(pairs))
    nrows = -(-len(pairs) // cols)
    axes = container.subplots(nrows, cols, squeeze=False)
    image = None
    for ax, lp in zip([a for row in axes for a in row], pairs):
        h = lp.heat
        assert h is not None
        image = ax.imshow(h.r, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest", aspect="equal")
        size = 6 if len(h.latents_a) <= 32 else 4
        ax.set_xticks(range(len(h.latents_b)), [str(x) for x in h.latents_b], rotation=90, fontsize=size)
        ax.set_yticks(range(len(h.latents_a)), [str(x) for x in h.latents_a], fontsize=size)
        ax.set_xlabel(f"{rep.b} latent id (layer {lp.layer_b})", fontsize=9)
        ax.set_ylabel(f"{rep.a} latent id (layer {lp.layer_a})", fontsize=9)
        diag = [h.r[i][i] for i in range(len(h.latents_a)) if h.r[i][i] == h.r[i][i]]
        mean = sum(diag) / len(diag) if diag else float("nan")
        ax.set_title(f"{lp.label}: {len(h.latents_a)} best pairs, mean r {mean:.2f}", fontsize=10)
        ax.grid(False)
    for ax in [a for row in axes for a in row][len(pairs) :]:
        ax.set_visible(False)
    used = [a for row in axes for a in row][: len(pairs)]
    cb = container.colorbar(image, ax=used, shrink=0.8)
    cb.set_label("Pearson r on held-out test tokens (unitless)")
    container.suptitle(f"Test correlations of matched SAE latents, {rep.a} vs {rep.b}")
    return used


def _blank(figsize: tuple[float, float]) -> Any:
    """An empty Agg figure (the panels are laid out by the draw functions, on a figure or a subfigure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def bars_figure(rep: AlignReport) -> tuple[Any, list[Any]]:
    fig = _blank((12.0, 1.4 + 3.0 * len(rep.layers)))
    return fig, draw_bars(fig, rep)


def heatmap_figure(rep: AlignReport) -> tuple[Any, list[Any]]:
    n = sum(1 for lp in rep.layers if lp.heat is not None and lp.heat.latents_a)
    cols = max(1, min(HEAT_COLS, n))
    rows = max(1, -(-n // cols))
    fig = _blank((1.2 + 4.4 * cols, 0.8 + 4.4 * rows))
    return fig, draw_heatmap(fig, rep)


def combined_figure(rep: AlignReport) -> tuple[Any, dict[str, list[Any]]]:
    """Heatmaps above the bars, in one figure (for an --output that names a single file)."""
    n = sum(1 for lp in rep.layers if lp.heat is not None and lp.heat.latents_a)
    heat_rows = -(-n // HEAT_COLS) if n else 0
    h_heat, h_bars = 4.6 * heat_rows, 1.4 + 3.0 * len(rep.layers)
    fig = _blank((13.0, h_heat + h_bars))
    if not heat_rows:
        return fig, {"bars": draw_bars(fig, rep)}
    top, bottom = fig.subfigures(2, 1, height_ratios=[h_heat, h_bars])
    return fig, {"heatmap": draw_heatmap(top, rep), "bars": draw_bars(bottom, rep)}


def figures_bytes(rep: AlignReport, fmt: str = "png", dpi: int = style.DPI) -> dict[str, bytes]:
    """Each figure as png or svg bytes (what `viz report` embeds)."""
    out = {}
    with style.styled():
        fig, _ = bars_figure(rep)
        out["bars"] = style.to_bytes(fig, fmt, dpi)
        if rep.has_heat:
            fig, _ = heatmap_figure(rep)
            out["heatmap"] = style.to_bytes(fig, fmt, dpi)
    return out


# ---------------------------------------------------------------------------------------- writing


def targets(output: Path, fmt: str, single: bool, has_heat: bool) -> dict[str, Path]:
    """Where each figure goes: the one file, or ``align_bars.<fmt>`` / ``align_heatmap.<fmt>`` in a folder."""
    if single:
        return {"combined": output}
    names = ["bars", "heatmap"] if has_heat else ["bars"]
    return {n: output / f"{FIGURE_NAMES[n]}.{fmt}" for n in names}


def plot_align(report: str | Path, output: str | Path, fmt: str = "png", metric: str = "r2", dpi: int = style.DPI, force: bool = False) -> dict[str, Any]:
    """Draw the report's figures into ``output`` (a .png/.svg file, or a folder), atomically.

    Nothing is written unless every figure can be drawn, and no existing file is replaced without ``force``.
    """
    output = Path(output)
    rep = load_align_report(report, metric)
    single = output.suffix.lower() in (".png", ".svg")
    if not single and output.exists() and not output.is_dir():
        raise XsaeError(f"{output} is a file without a .png or .svg suffix", "name a folder for one file per figure, or a .png/.svg file for one figure")
    paths = targets(output, fmt, single, rep.has_heat)
    taken = [str(p) for p in paths.values() if p.exists()]
    if taken and not force:
        raise XsaeError(f"{', '.join(taken)} already exists", "pass --force to replace it, or choose another --output")
    panels: dict[str, int] = {}
    with style.styled():
        drawn = []
        if single:
            fig, by_panel = combined_figure(rep)
            drawn.append((fig, paths["combined"]))
            panels = {k: len(v) for k, v in by_panel.items()}
        else:
            for name in paths:
                fig, axes = bars_figure(rep) if name == "bars" else heatmap_figure(rep)
                drawn.append((fig, paths[name]))
                panels[name] = len(axes)
        for fig, path in drawn:
            style.save(fig, path, fmt, dpi)
    return {
        "written": str(output),
        "files": [str(p) for p in paths.values()],
        "format": fmt,
        "metric": metric,
        "report": str(rep.path),
        "layer_pairs": [[lp.layer_a, lp.layer_b] for lp in rep.layers],
        "figures": len(paths),
        "panels": panels,
        "heatmap": rep.has_heat,
        "notes": rep.notes,
    }
