"""`xsae viz align` on a real alignment report (SmolLM2-135M <-> MiniLM-L6, trimmed): figures, checks, writing."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.unit.viz._helpers import DATA
from xsae_cli.core.errors import XsaeError
from xsae_cli.viz import align as AL

REPORT = DATA / "align_report.json"


def real() -> dict[str, Any]:
    return json.loads(REPORT.read_text())


def write(tmp: Path, data: Any, name: str = "report.json") -> Path:
    p = tmp / name
    p.write_text(json.dumps(data))
    return p


def one_layer(tmp: Path) -> Path:
    """The real report cut to its first layer pair: what the writing tests draw (a third of the rendering)."""
    data = real()
    data["results"] = data["results"][:1]
    return write(tmp, data, "one_layer.json")


def bars_of(ax: Any, variant: str) -> list[Any]:
    return [p for p in ax.patches if p.get_gid() == f"bar-{variant}"]


def test_load_real_report() -> None:
    rep = AL.load_align_report(REPORT)
    assert (rep.a, rep.b) == ("smollm2-135m", "minilm-l6")
    assert [(lp.layer_a, lp.layer_b) for lp in rep.layers] == [(5, 0), (6, 0), (7, 1)]
    rows = rep.layers[0].directions["a->b"]
    assert [r.label for r in rows][:3] == ["procrustes\nacts", "ridge\nacts", "hypernet\nacts"] and len(rows) == 6
    ridge = rows[1]
    assert ridge.values["null"] < 0.01 < ridge.values["test"] < ridge.values["sae_ref"]  # the real run's ordering (read from its old key 'ceiling')
    assert ridge.values["upper"] is None  # a report from before the upper bound: drawn without it
    assert rep.has_heat and not rep.notes
    heat = rep.layers[0].heat
    assert heat is not None and len(heat.latents_a) == len(heat.latents_b) == len(heat.r) == 12
    # Pairs are sorted by their own correlation: the diagonal falls.
    diag = [heat.r[i][i] for i in range(12)]
    assert diag == sorted(diag, reverse=True) and diag[0] > 0.5


def test_bars_panels_and_counts() -> None:
    rep = AL.load_align_report(REPORT)
    with AL.style.styled():
        fig, axes = AL.bars_figure(rep)
        fig.canvas.draw()
    assert len(axes) == 3 * 2  # layer pairs x directions
    for ax in axes:
        for v in ("null", "test", "sae_ref"):
            assert len(bars_of(ax, v)) == 6  # 3 mappers x 2 spaces
        assert "→" in ax.get_title() and "layers" in ax.get_title()
        assert len(ax.get_xticklabels()) == 6
    assert axes[0].get_title() == "smollm2-135m → minilm-l6, layers 5:0"
    assert axes[1].get_title() == "minilm-l6 → smollm2-135m, layers 5:0"
    # The bar heights are the report's numbers (ridge, acts, a->b at layer 5).
    ridge = rep.layers[0].directions["a->b"][1]
    assert bars_of(axes[0], "test")[1].get_height() == pytest.approx(ridge.values["test"])
    assert bars_of(axes[0], "sae_ref")[1].get_height() == pytest.approx(ridge.values["sae_ref"])
    assert not bars_of(axes[0], "upper")
    assert "R²" in fig.get_supylabel() and "fraction of variance" in fig.get_supylabel()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["shuffled-pair null", "mapper (held-out test)", "2nd-SAE reference (target to itself)", "training-mean predictor"]


def test_missing_values_draw_no_bar_and_very_low_scores_are_clipped(tmp_path: Path) -> None:
    data = real()
    rows = data["results"][0]["directions"]["a->b"]
    rows[0]["null"]["r2"] = None  # NaN in a report is written as null
    rows[1]["null"]["r2"] = -7.5
    rep = AL.load_align_report(write(tmp_path, data))
    with AL.style.styled():
        _, axes = AL.bars_figure(rep)
    assert len(bars_of(axes[0], "null")) == 5 and len(bars_of(axes[0], "test")) == 6
    assert axes[0].get_ylim()[0] == pytest.approx(AL.LOW_CLIP)
    assert any(t.get_text() == "-7.50" for t in axes[0].texts)


def test_heatmap_panels() -> None:
    rep = AL.load_align_report(REPORT)
    with AL.style.styled():
        fig, axes = AL.heatmap_figure(rep)
        fig.canvas.draw()
    assert len(axes) == 3
    for ax, lp in zip(axes, rep.layers):
        (img,) = ax.get_images()
        assert img.get_array().shape == (12, 12) and img.get_clim() == (-1, 1)
        assert [t.get_text() for t in ax.get_yticklabels()] == [str(x) for x in lp.heat.latents_a]
        assert "latent id" in ax.get_xlabel() and "minilm-l6" in ax.get_xlabel() and "smollm2-135m" in ax.get_ylabel()
    colorbars = [a for a in fig.axes if a not in axes]
    assert len(colorbars) == 1 and "Pearson r" in colorbars[0].get_ylabel()


def test_metric_choice_and_unknown_metric() -> None:
    rep = AL.load_align_report(REPORT, metric="f1")
    assert rep.layers[0].directions["a->b"][0].values["test"] == real()["results"][0]["directions"]["a->b"][0]["test"]["f1"]
    with pytest.raises(XsaeError, match="unknown --metric 'auc'.*r2, cosine"):
        AL.load_align_report(REPORT, metric="auc")


def test_plot_to_folder_png_and_refuse_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "plots"
    report = one_layer(tmp_path)
    s = AL.plot_align(report, out, fmt="png", dpi=80)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["align_bars.png", "align_heatmap.png"]  # and no temporary files left
    assert s["panels"] == {"bars": 2, "heatmap": 1} and s["heatmap"] is True and s["figures"] == 2
    for name in files:
        with Image.open(out / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200 and im.convert("L").getextrema()[0] < 100 < im.convert("L").getextrema()[1]
    before = (out / "align_bars.png").read_bytes()
    with pytest.raises(XsaeError, match="already exists.*--force"):
        AL.plot_align(report, out, fmt="png", dpi=80)
    AL.plot_align(report, out, fmt="png", dpi=60, force=True)
    assert (out / "align_bars.png").read_bytes() != before


def test_plot_one_svg_file(tmp_path: Path) -> None:
    out = tmp_path / "align.svg"
    s = AL.plot_align(one_layer(tmp_path), out, fmt="svg")
    text = out.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text and "Pearson r on held-out test tokens" in text
    assert s["panels"] == {"heatmap": 1, "bars": 2} and s["files"] == [str(out)]


def test_report_without_top_pairs_gives_bars_and_a_note(tmp_path: Path) -> None:
    data = real()
    data["results"] = data["results"][:2]
    for r in data["results"]:
        del r["latent_matching"]["top_pairs"]
    p = write(tmp_path, data)
    s = AL.plot_align(p, tmp_path / "plots", fmt="png", dpi=60)
    assert [Path(f).name for f in s["files"]] == ["align_bars.png"] and s["heatmap"] is False
    assert len(s["notes"]) == 1 and "latent_matching.top_pairs" in s["notes"][0] and str(p) in s["notes"][0]


def _without(data: dict[str, Any], *keys: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    obj = data
    for k in keys[:-1]:
        obj = obj[k]
    del obj[keys[-1]]
    return data


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        (("format",), "missing field 'format'"),
        (("results",), "missing field 'results'"),
        (("results", 1, "directions", "b->a"), "results[1].directions: missing field 'b->a'"),
        (("results", 0, "directions", "a->b", 2, "ceiling"), "results[0].directions['a->b'][2]: missing field 'sae_ref'"),
        (("results", 0, "directions", "a->b", 0, "test", "r2"), "results[0].directions['a->b'][0].test: missing field 'r2'"),
        (("results", 2, "latent_matching", "top_pairs", "r"), "results[2].latent_matching.top_pairs: missing field 'r'"),
    ],
)
def test_missing_field_is_named(tmp_path: Path, keys: tuple[Any, ...], named: str) -> None:
    p = write(tmp_path, _without(real(), *keys))
    with pytest.raises(XsaeError) as err:
        AL.load_align_report(p)
    line = str(err.value)
    assert "\n" not in line and str(p) in line and named in line


def test_not_an_align_report(tmp_path: Path) -> None:
    p = write(tmp_path, {"format": "xsae-sane-embeddings", "embeddings": {}})
    with pytest.raises(XsaeError, match="'format' is 'xsae-sane-embeddings', not 'xsae-align-report'"):
        AL.load_align_report(p)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(XsaeError, match="holds no report.json"):
        AL.load_align_report(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "report.json").write_text(json.dumps(dict(real(), results=[])))
    with pytest.raises(XsaeError, match="'results' is empty"):
        AL.load_align_report(bad)  # a run folder is read through its report.json


def test_heat_shape_is_checked(tmp_path: Path) -> None:
    data = real()
    data["results"][0]["latent_matching"]["top_pairs"]["r"].pop()
    with pytest.raises(XsaeError, match=r"'r' must be a 12 x 12 matrix"):
        AL.load_align_report(write(tmp_path, data))


def test_viz_report_embeds_align_figures(tmp_path: Path) -> None:
    from tests.unit.viz._helpers import page_images
    from xsae_cli.viz.report import build_report

    run = tmp_path / "align"
    run.mkdir()
    one_layer(tmp_path).rename(run / "report.json")
    page, summary = build_report([run], dpi=60)
    (section,) = summary["sections"]
    assert section["kind"] == "align" and section["figures"]["align"] == 2 and not section["notes"]
    assert "<h3>Alignment</h3>" in page and "Matched latents" in page
    assert len(page_images(page)) == 2


def test_transfer_stores_the_matched_block_viz_draws() -> None:
    """The producer side of latent_matching.top_pairs (align/transfer.py), on a correlation matrix with known pairs."""
    import torch

    from xsae_cli.align.scoring import top_matched_pairs

    corr = torch.full((5, 4), 0.05)
    for a, b, r in ((0, 2, 0.6), (3, 0, 0.9), (1, 1, 0.3), (4, 3, 0.8)):
        corr[a, b] = r
    alive = torch.tensor([True, True, True, False])  # B's latent 3 never fires enough: never paired
    top = top_matched_pairs(corr, alive, n=2)
    assert top == {"latents_a": [3, 0], "latents_b": [0, 2], "r": [[0.9, 0.05], [0.05, 0.6]]}
    assert top_matched_pairs(corr, torch.zeros(4, dtype=torch.bool)) == {"latents_a": [], "latents_b": [], "r": []}


def test_upper_bound_drawn_where_the_report_has_it(tmp_path: Path) -> None:
    data = real()
    data["results"] = data["results"][:1]
    for rows in data["results"][0]["directions"].values():
        for row in rows:
            row["sae_ref"] = row.pop("ceiling")
            row["upper"] = {**row["sae_ref"], "r2": 0.9}
    rep = AL.load_align_report(write(tmp_path, data))
    assert rep.layers[0].directions["a->b"][1].values["upper"] == 0.9
    with AL.style.styled():
        fig, axes = AL.bars_figure(rep)
    assert len(bars_of(axes[0], "upper")) == 6 and bars_of(axes[0], "upper")[0].get_height() == pytest.approx(0.9)
    assert "upper bound (fit on test pairs)" in [t.get_text() for t in fig.legends[0].get_texts()]
