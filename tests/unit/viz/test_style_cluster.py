"""The house style and `viz cluster`: PCA / t-SNE coordinates, PNG / SVG / HTML output, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.unit.viz._helpers import DATA, URL
from xsae_cli.core.errors import XsaeError
from xsae_cli.viz import cluster as C
from xsae_cli.viz import style
from xsae_cli.viz.common import resolve_format, script_json


def _embeddings(tmp_path: Path, n: int = 6, dim: int = 32) -> Path:
    rng = np.random.default_rng(0)
    fams = ["gpt2", "llama", "qwen2"]
    data = {
        "format": "xsae-sane-embeddings",
        "dim": dim,
        "embeddings": {f"m{i}": (rng.normal(size=dim) + 3 * (i % 3)).tolist() for i in range(n)},
        "models": {f"m{i}": {"family": fams[i % 3], "sha256": "0" * 64} for i in range(n)},
    }
    p = tmp_path / "model_embeddings.json"
    p.write_text(json.dumps(data))
    return p


def _not_blank(path: Path) -> None:
    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert img.std() > 5 and (img < 128).mean() > 0.002  # ink on the page, not a white sheet


def test_style_png_and_svg(tmp_path: Path) -> None:
    with style.styled():
        fig, ax = style.figure()
        ax.plot([0, 1, 2], [2, 1, 3])
        ax.set_title("t")
        style.save(fig, tmp_path / "a.png", "png", dpi=100)
        style.save(fig, tmp_path / "a.svg", "svg")
    w, h = Image.open(tmp_path / "a.png").size
    assert 700 <= w <= 900 and 400 <= h <= 560  # 8 x 5 in at 100 dpi, bbox tight
    _not_blank(tmp_path / "a.png")
    assert (tmp_path / "a.svg").read_text().lstrip().startswith("<?xml")
    assert style.color(0) != style.color(1) and re.fullmatch(r"#[0-9a-f]{6}", style.color(30).lower())


def test_real_embeddings_pca_png(tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    summary = C.cluster(DATA / "model_embeddings.json", out, "pca", "png", dpi=80)
    assert summary["models"] == 5 and len(summary["points"]) == 5
    assert set(summary["families"]) == {"gpt2", "gpt_neox", "qwen2", "mistral", "gemma"}
    ev = summary["explained_variance_ratio"]
    assert ev[0] >= ev[1] > 0 and sum(ev) <= 1 + 1e-9
    w, h = Image.open(out).size
    assert w > 500 and h > 400
    _not_blank(out)


def test_pca_coordinates_and_formats(tmp_path: Path) -> None:
    emb = C.load_embeddings(_embeddings(tmp_path))
    proj = C.project(emb.vectors, "pca")
    assert proj.coords.shape == (6, 2) and np.isfinite(proj.coords).all()
    from sklearn.decomposition import PCA

    ref = PCA(2).fit_transform(emb.vectors)
    assert np.allclose(np.abs(proj.coords), np.abs(ref), atol=1e-8)  # PCA as users know it (up to sign)
    C.render_static(emb, proj, tmp_path / "p.svg", "svg")
    svg = (tmp_path / "p.svg").read_text()
    assert all(f">m{i}<" in svg for i in range(6)) and "PC1" in svg  # labels stay text
    page = C.html_page(emb, proj)
    assert not URL.search(page)
    assert page.count('class="pt"') == 6
    data = json.loads(re.search(r'<script type="application/json" id="xsae-data">(.*?)</script>', page, re.DOTALL).group(1))
    assert [p["name"] for p in data["points"]] == [f"m{i}" for i in range(6)]
    assert np.allclose([[p["x"], p["y"]] for p in data["points"]], proj.coords)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_tsne_few_models(tmp_path: Path, n: int) -> None:
    emb = C.load_embeddings(_embeddings(tmp_path, n=n, dim=8))
    proj = C.project(emb.vectors, "tsne", seed=0)
    assert proj.coords.shape == (n, 2) and np.isfinite(proj.coords).all()
    assert proj.perplexity is not None and proj.perplexity < n


def test_bad_embeddings_named(tmp_path: Path) -> None:
    p = tmp_path / "e.json"
    cases = [
        ({"embeddings": {"a": [1.0, 2.0]}}, "needs at least two"),
        ({"models": {}}, "missing field 'embeddings'"),
        ({"embeddings": [1, 2]}, "field 'embeddings' must be an object"),
        ({"embeddings": {"a": [1.0, 2.0], "b": [1.0]}}, "embeddings['b'] has 1 values"),
        ({"embeddings": {"a": [1.0, 2.0], "b": "x"}}, "embeddings['b'] must be a non-empty list"),
        ([1, 2], "expected a JSON object"),
    ]
    for data, needle in cases:
        p.write_text(json.dumps(data))
        with pytest.raises(XsaeError) as exc:
            C.load_embeddings(p)
        assert needle in str(exc.value) and str(p) in str(exc.value), str(exc.value)
    p.write_text('{"embeddings": {"a": [NaN], "b": [1.0]}}')
    with pytest.raises(XsaeError, match="NaN"):
        C.load_embeddings(p)
    with pytest.raises(XsaeError, match="unknown --method 'isomap'. use one of: pca, tsne, umap"):
        C.project(np.zeros((3, 4)), "isomap")


def test_umap_missing_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "umap", None)  # what `import umap` sees where umap-learn is not installed
    with pytest.raises(XsaeError) as exc:
        C.project(np.random.default_rng(0).normal(size=(4, 8)), "umap")
    msg = str(exc.value)
    assert "umap-learn" in msg and "pip install umap-learn" in msg and "\n" not in msg


@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 8])
def test_umap_real(tmp_path: Path, n: int) -> None:
    """The optional extra's real path (numba compiles UMAP on first use: tens of seconds)."""
    pytest.importorskip("umap", reason="umap-learn not installed (pip install umap-learn)")
    emb = C.load_embeddings(_embeddings(tmp_path, n=n, dim=16))
    proj = C.project(emb.vectors, "umap", seed=0)
    assert proj.coords.shape == (n, 2) and np.isfinite(proj.coords).all() and proj.n_neighbors == min(15, n - 1)
    assert proj.axis_labels[0] == "UMAP 1 (arbitrary units)"
    C.render_static(emb, proj, tmp_path / "u.svg", "svg")
    assert "UMAP" in (tmp_path / "u.svg").read_text() and all(f">m{i}<" in (tmp_path / "u.svg").read_text() for i in range(n))


def test_resolve_format_and_script_json(tmp_path: Path) -> None:
    assert resolve_format(Path("x.svg"), None) == "svg"
    assert resolve_format(Path("x"), None, "html") == "html"
    assert resolve_format(Path("x.png"), "png") == "png"
    with pytest.raises(XsaeError, match="does not match"):
        resolve_format(Path("x.png"), "svg")
    with pytest.raises(XsaeError, match="unknown --format 'jpg'"):
        resolve_format(Path("x"), "jpg")
    text = script_json({"t": "</script><!-- & \u2028"})
    assert "</" not in text and "<!--" not in text and json.loads(text) == {"t": "</script><!-- & \u2028"}
