"""`xsae viz align` end to end: the real command on a real (trimmed) alignment report, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tests.conftest import assert_user_error, run_xsae
from tests.unit.viz._helpers import DATA

REPORT = DATA / "align_report.json"
LOW_DPI = {"XSAE_VIZ_DPI": "72"}  # the same figures, a quarter of the pixels to render


def test_viz_align(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(REPORT.read_text())
    out = tmp_path / "plots"
    proc = run_xsae("--json", "viz", "align", str(run), "--output", str(out), env=LOW_DPI)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["panels"] == {"bars": 6, "heatmap": 3} and s["layer_pairs"] == [[5, 0], [6, 0], [7, 1]] and s["format"] == "png"
    assert sorted(p.name for p in out.iterdir()) == ["align_bars.png", "align_heatmap.png"]
    for p in out.iterdir():
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 800
    # Existing pictures are kept unless --force.
    assert_user_error(run_xsae("viz", "align", str(run), "--output", str(out)), "align_bars.png", "--force")
    one = json.loads(REPORT.read_text())
    one["results"] = one["results"][:1]
    (tmp_path / "one.json").write_text(json.dumps(one))
    svg = tmp_path / "align.svg"
    proc = run_xsae("viz", "align", str(tmp_path / "one.json"), "--output", str(svg), "--metric", "f1", env=LOW_DPI)
    assert proc.returncode == 0 and "wrote" in proc.stdout and svg.read_text().count("<svg") == 1, proc.stderr


def test_viz_align_bad_input(tmp_path: Path) -> None:
    other = tmp_path / "embeddings.json"
    other.write_text(json.dumps({"format": "xsae-sane-embeddings", "embeddings": {}}))
    assert_user_error(run_xsae("viz", "align", str(other), "--output", str(tmp_path / "o")), str(other), "'format'", "xsae-align-report")
    data = json.loads(REPORT.read_text())
    del data["results"][0]["directions"]["b->a"]
    lacking = tmp_path / "lacking.json"
    lacking.write_text(json.dumps(data))
    assert_user_error(run_xsae("viz", "align", str(lacking), "--output", str(tmp_path / "o")), str(lacking), "results[0].directions", "'b->a'")
    assert not (tmp_path / "o").exists()
