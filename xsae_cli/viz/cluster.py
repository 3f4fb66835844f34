"""`xsae viz cluster`: models as points, from the SANE embeddings that `xsae sane embed` writes.

PCA (what users know) by default, t-SNE on request, and UMAP when the optional ``umap-learn``
package is installed (it pulls in numba, which is why it is an extra); points coloured by family and labelled with
the model's name. PNG and SVG through matplotlib; HTML as one self-contained page with an inline
SVG scatter and a few lines of JavaScript for hover names (no network, no server).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import atomic_write_text, read_json
from xsae_cli.viz import style
from xsae_cli.viz.common import esc, require, script_json

METHODS = ("pca", "tsne", "umap")
UMAP_MISSING = "pip install umap-learn (the optional extra for --method umap), or use --method pca or tsne"


@dataclass
class Embeddings:
    path: Path
    names: list[str]
    vectors: np.ndarray  # [n_models, dim]
    families: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Projection:
    coords: np.ndarray  # [n_models, 2]
    method: str
    axis_labels: tuple[str, str]
    explained: list[float] | None = None
    perplexity: float | None = None
    n_neighbors: int | None = None


def load_embeddings(path: str | Path) -> Embeddings:
    """Read ``model_embeddings.json`` (xsae's, or the original tools' plain name -> vector map);
    every malformed part is named with the file."""
    path = Path(path)
    data = read_json(path, "embeddings file")
    if not isinstance(data, dict):
        raise XsaeError(f"{path}: expected a JSON object with an 'embeddings' field, got {type(data).__name__}", "point --input at the model_embeddings.json that `xsae sane embed` writes")
    if "embeddings" not in data and data and all(isinstance(v, list) for v in data.values()):
        data = {"embeddings": data}  # the original Universal SANE's plain {model name: [floats]} map
    emb = require(data, "embeddings", path, kind=dict)
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise XsaeError(f"{path}: field 'models' must be an object of name -> info, got {type(models).__name__}", "re-create it with `xsae sane embed`")
    names = list(emb)
    if len(names) < 2:
        raise XsaeError(
            f"{path} holds {len(names)} model embedding{'s' if len(names) != 1 else ''}; a cluster plot needs at least two",
            "embed more models with `xsae sane embed --models a,b,...`",
        )
    rows = []
    dim = None
    for name in names:
        v = emb[name]
        if not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise XsaeError(f"{path}: embeddings['{name}'] must be a non-empty list of numbers", "re-create it with `xsae sane embed`")
        if dim is None:
            dim = len(v)
        elif len(v) != dim:
            raise XsaeError(f"{path}: embeddings['{name}'] has {len(v)} values but '{names[0]}' has {dim}", "embed all models with the same SANE checkpoint")
        rows.append(v)
    vectors = np.asarray(rows, dtype=np.float64)
    bad = [names[i] for i in np.where(~np.isfinite(vectors).all(axis=1))[0]]
    if bad:
        raise XsaeError(f"{path}: embeddings of {', '.join(bad)} contain NaN or infinity", "re-embed those models")
    families = []
    for name in names:
        info = _v if isinstance(_v := models.get(name), dict) else {}
        families.append(str(info.get("family") or info.get("lineage") or "unknown"))
    return Embeddings(path, names, vectors, families, {k: data.get(k) for k in ("format", "dim", "config") if k in data})


def project(vectors: np.ndarray, method: str = "pca", seed: int = 0, perplexity: float = 30.0) -> Projection:
    """2-D coordinates for ``vectors`` (one row per model)."""
    n = vectors.shape[0]
    if method not in METHODS:
        raise XsaeError(f"unknown --method '{method}'", f"use one of: {', '.join(METHODS)}")
    if n < 2:
        raise XsaeError(f"{n} model(s) given; a projection needs at least two", "embed more models")
    if method == "pca":
        from sklearn.decomposition import PCA

        k = min(2, n, vectors.shape[1])
        pca = PCA(n_components=k, random_state=seed)
        coords = pca.fit_transform(vectors)
        ratios = [float(r) for r in pca.explained_variance_ratio_]
        if k < 2:
            coords = np.concatenate([coords, np.zeros((n, 2 - k))], axis=1)
            ratios += [0.0] * (2 - k)
        labels = tuple(f"PC{i + 1} ({100 * r:.1f}% of variance, embedding units)" for i, r in enumerate(ratios))
        return Projection(coords, "pca", labels, explained=ratios)  # type: ignore[arg-type]
    if method == "umap":
        return _umap(vectors, seed)
    from sklearn.manifold import TSNE

    # t-SNE needs perplexity < n; with few models the usual 30 is far too large.
    perp = float(max(1.0, min(perplexity, (n - 1) / 3 if n > 4 else n - 1 - 1e-3)))
    tsne = TSNE(n_components=2, perplexity=perp, random_state=seed, init="pca" if n > 2 else "random", learning_rate="auto")
    from threadpoolctl import threadpool_limits

    # A zoo is tens to thousands of models: one thread is fastest, and OpenMP spinning up a thread per
    # core on a busy machine turns a 0.05 s fit into tens of seconds.
    with threadpool_limits(1 if n <= 5000 else None):
        coords = tsne.fit_transform(vectors)
    return Projection(coords, "tsne", ("t-SNE 1 (arbitrary units)", "t-SNE 2 (arbitrary units)"), perplexity=perp)


def _umap(vectors: np.ndarray, seed: int) -> Projection:
    try:
        import umap
    except ImportError as exc:
        raise XsaeError("--method umap needs the umap-learn package, which is not installed", UMAP_MISSING) from exc
    import warnings

    n = vectors.shape[0]
    # UMAP's default 15 neighbours is more than a small zoo has; its spectral init needs a few points.
    neighbours = max(2, min(15, n - 1))
    reducer = umap.UMAP(n_components=2, n_neighbors=neighbours, random_state=seed, init="spectral" if n > 4 else "random", min_dist=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state": seeded UMAP is single-threaded by design
        coords = np.asarray(reducer.fit_transform(vectors), dtype=np.float64)
    return Projection(coords, "umap", ("UMAP 1 (arbitrary units)", "UMAP 2 (arbitrary units)"), n_neighbors=neighbours)


def family_colors(families: list[str]) -> dict[str, str]:
    return {fam: style.color(i) for i, fam in enumerate(dict.fromkeys(families))}


def _title(emb: Embeddings, proj: Projection) -> str:
    if proj.method == "pca":
        what = "PCA"
    elif proj.method == "umap":
        what = f"UMAP, {proj.n_neighbors} neighbours"
    else:
        what = f"t-SNE, perplexity {proj.perplexity:.2g}"
    return f"Model weight-space embeddings ({len(emb.names)} models, {what})"


def draw_static(emb: Embeddings, proj: Projection) -> Any:
    """The scatter as a matplotlib figure (call inside :func:`style.styled`)."""
    colors = family_colors(emb.families)
    fig, ax = style.figure(figsize=(8.0, 6.0))
    for fam, col in colors.items():
        idx = [i for i, f in enumerate(emb.families) if f == fam]
        ax.scatter(proj.coords[idx, 0], proj.coords[idx, 1], s=64, color=col, label=fam, edgecolors="white", linewidths=0.8, zorder=3)
    lo, hi = proj.coords.min(axis=0), proj.coords.max(axis=0)
    norm = (proj.coords - lo) / np.where(hi - lo > 0, hi - lo, 1.0)
    for i, name in enumerate(emb.names):
        # A label whose point sits close to an earlier one goes below it, so the two stay readable.
        crowded = sum(1 for j in range(i) if np.abs(norm[i] - norm[j]).max() < 0.06)
        offset = (6, 5 - 13 * crowded)
        ax.annotate(name, proj.coords[i], xytext=offset, textcoords="offset points", fontsize=9, color="#222222", zorder=4)
    ax.set_title(_title(emb, proj))
    ax.set_xlabel(proj.axis_labels[0])
    ax.set_ylabel(proj.axis_labels[1])
    ax.legend(title="family", loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.margins(0.15)
    return fig


def render_static(emb: Embeddings, proj: Projection, output: Path, fmt: str, dpi: int = style.DPI) -> Path:
    with style.styled():
        style.save(draw_static(emb, proj), output, fmt, dpi)
    return output


def cluster_image(emb: Embeddings, proj: Projection, fmt: str = "png", dpi: int = style.DPI) -> bytes:
    """The scatter as PNG or SVG bytes (what the report embeds)."""
    with style.styled():
        return style.to_bytes(draw_static(emb, proj), fmt, dpi)


def render_html(emb: Embeddings, proj: Projection, output: Path) -> Path:
    atomic_write_text(output, html_page(emb, proj))
    return output


def html_page(emb: Embeddings, proj: Projection) -> str:
    """A self-contained interactive scatter: inline SVG, hover shows name and family; no network."""
    colors = family_colors(emb.families)
    W, H, pad = 760, 520, 60
    xy = proj.coords
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    norm = (xy - lo) / span
    # Points inset from the axes; room on the right for the labels.
    sx = pad + 24 + norm[:, 0] * (W - 2 * pad - 110)
    sy = H - pad - 24 - norm[:, 1] * (H - 2 * pad - 48)
    points = []
    for i, name in enumerate(emb.names):
        fam = emb.families[i]
        crowded = sum(1 for j in range(i) if np.abs(norm[i] - norm[j]).max() < 0.06)
        points.append(
            f'<g class="pt" data-i="{i}"><circle cx="{sx[i]:.1f}" cy="{sy[i]:.1f}" r="7" fill="{colors[fam]}" stroke="#fff" stroke-width="1.5">'
            f"<title>{esc(name)} ({esc(fam)})</title></circle>"
            f'<text x="{sx[i] + 9:.1f}" y="{sy[i] - 6 + 16 * crowded:.1f}">{esc(name)}</text></g>'
        )
    legend = "".join(f'<li><span class="sw" style="background:{c}"></span>{esc(f)}</li>' for f, c in colors.items())
    data = {
        "method": proj.method,
        "axis_labels": list(proj.axis_labels),
        "explained_variance_ratio": proj.explained,
        "perplexity": proj.perplexity,
        "n_neighbors": proj.n_neighbors,
        "points": [{"name": n, "family": f, "x": float(xy[i, 0]), "y": float(xy[i, 1])} for i, (n, f) in enumerate(zip(emb.names, emb.families))],
        "source": str(emb.path.name),
    }
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(_title(emb, proj))}</title>
<style>
body{{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222}}
h1{{font-size:18px;margin:0 0 8px}}
svg{{background:#fff;border:1px solid #ddd;border-radius:6px;overflow:visible}}
svg text{{font-size:11px;fill:#333;pointer-events:none}}
svg .axis{{font-size:12px;fill:#555}}
.pt circle{{cursor:pointer}} .pt.hl circle{{stroke:#000;stroke-width:2.5}} .pt.dim{{opacity:.2}}
#tip{{position:fixed;pointer-events:none;background:#222;color:#fff;padding:4px 8px;border-radius:4px;font-size:12px;display:none}}
ul.legend{{list-style:none;padding:0;display:flex;gap:16px;flex-wrap:wrap}} ul.legend li{{cursor:pointer}}
.sw{{display:inline-block;width:12px;height:12px;border-radius:6px;margin-right:6px;vertical-align:-1px}}
</style></head><body>
<h1>{esc(_title(emb, proj))}</h1>
<ul class="legend" id="legend">{legend}</ul>
<svg id="plot" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="scatter of model embeddings">
<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="#999"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="#999"/>
<text class="axis" x="{W / 2}" y="{H - pad / 3}" text-anchor="middle">{esc(proj.axis_labels[0])}</text>
<text class="axis" x="{pad / 3}" y="{H / 2}" text-anchor="middle" transform="rotate(-90 {pad / 3} {H / 2})">{esc(proj.axis_labels[1])}</text>
{"".join(points)}
</svg>
<div id="tip"></div>
<script type="application/json" id="xsae-data">{script_json(data)}</script>
<script>
(function(){{
  var data = JSON.parse(document.getElementById('xsae-data').textContent);
  var tip = document.getElementById('tip');
  document.querySelectorAll('.pt').forEach(function(g){{
    var p = data.points[+g.dataset.i];
    g.addEventListener('mousemove', function(e){{
      tip.textContent = p.name + ' \u00b7 ' + p.family + ' \u00b7 (' + p.x.toFixed(3) + ', ' + p.y.toFixed(3) + ')';
      tip.style.left = (e.clientX + 12) + 'px'; tip.style.top = (e.clientY + 12) + 'px'; tip.style.display = 'block';
      g.classList.add('hl');
    }});
    g.addEventListener('mouseleave', function(){{ tip.style.display = 'none'; g.classList.remove('hl'); }});
  }});
  var active = null;
  document.querySelectorAll('#legend li').forEach(function(li){{
    li.addEventListener('click', function(){{
      var fam = li.textContent; active = active === fam ? null : fam;
      document.querySelectorAll('.pt').forEach(function(g){{
        g.classList.toggle('dim', active !== null && data.points[+g.dataset.i].family !== active);
      }});
    }});
  }});
}})();
</script>
</body></html>
"""


def cluster(input_path: str | Path, output: str | Path, method: str = "pca", fmt: str = "png", dpi: int = style.DPI, seed: int = 0) -> dict[str, Any]:
    """Read embeddings, project them to 2-D, write the plot; return a summary."""
    emb = load_embeddings(input_path)
    proj = project(emb.vectors, method, seed=seed)
    output = Path(output)
    if fmt == "html":
        render_html(emb, proj, output)
    else:
        render_static(emb, proj, output, fmt, dpi)
    return {
        "written": str(output),
        "format": fmt,
        "method": proj.method,
        "models": len(emb.names),
        "families": sorted(set(emb.families)),
        "explained_variance_ratio": proj.explained,
        "points": {n: [round(float(x), 6), round(float(y), 6)] for n, (x, y) in zip(emb.names, proj.coords)},
    }
