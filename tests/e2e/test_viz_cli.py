"""`xsae viz` end to end: the real command on files in the shape the other groups write them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import assert_user_error, run_xsae
from tests.unit.viz._helpers import (
    CHROMIUM,
    DATA,
    URL,
    card_ids,
    chromium,
    write_run,
    write_sane_run,
)

EMB = str(DATA / "model_embeddings.json")


def test_cluster(tmp_path: Path) -> None:
    png = tmp_path / "embedding_plot.png"
    proc = run_xsae("--json", "viz", "cluster", "--input", EMB, "--output", str(png))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["format"] == "png" and summary["method"] == "pca" and len(summary["points"]) == 5
    assert Image.open(png).size[0] > 800
    for fmt in ("svg", "html"):
        p = run_xsae("viz", "cluster", "--input", EMB, "--output", str(tmp_path / f"e.{fmt}"), "--method", "tsne")
        assert p.returncode == 0 and "wrote" in p.stdout, p.stderr
    page = (tmp_path / "e.html").read_text()
    assert not URL.search(page) and page.count('class="pt"') == 5 and "tiny-gemma" in page
    default = run_xsae("viz", "cluster", "--input", EMB, "--format", "svg", cwd=tmp_path)
    assert default.returncode == 0 and (tmp_path / "embedding_plot.svg").exists(), default.stderr

    assert_user_error(run_xsae("viz", "cluster", "--input", EMB, "--output", str(png)), str(png), "--force")
    assert_user_error(run_xsae("viz", "cluster", "--input", EMB, "--output", str(tmp_path / "x.png"), "--format", "svg"), "--format svg", "x.png")
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"embeddings": {"a": [1.0, 2.0]}, "models": {"a": {"family": "gpt2"}}}))
    assert_user_error(run_xsae("viz", "cluster", "--input", str(one), "--output", str(tmp_path / "o.png")), str(one), "at least two")
    assert not (tmp_path / "o.png").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vectors": {}}))
    assert_user_error(run_xsae("viz", "cluster", "--input", str(bad), "--output", str(tmp_path / "o.png")), str(bad), "'embeddings'")
    assert_user_error(run_xsae("viz", "cluster", "--input", EMB, "--output", str(tmp_path / "o.png"), "--method", "isomap"), "isomap", "pca, tsne, umap")
    # Where umap-learn is not installed (a stand-in package that fails to import, first on the path):
    fake = tmp_path / "no-umap" / "umap"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('umap-learn is not installed')\n")
    no_umap = run_xsae("viz", "cluster", "--input", EMB, "--output", str(tmp_path / "o.png"), "--method", "umap", env={"PYTHONPATH": str(fake.parent)})
    assert_user_error(no_umap, "umap-learn", "pip install umap-learn")
    assert not (tmp_path / "o.png").exists()


def test_curves(tmp_path: Path) -> None:
    a, b, sane = write_run(tmp_path, "a"), write_run(tmp_path, "b", hooks=("transformer.h.1", "transformer.h.2")), write_sane_run(tmp_path)
    out = tmp_path / "curves.png"
    proc = run_xsae("--json", "viz", "curves", str(a), str(b), str(sane), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["series"] == 4 and Image.open(out).size[1] > 1000
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run_xsae("viz", "curves", str(empty), "--output", str(tmp_path / "c.png")), str(empty), "train_log.jsonl", "checkpoint_epoch_N/config.json")


def test_features(tmp_path: Path) -> None:
    run = write_run(tmp_path, hooks=("transformer.h.1", "transformer.h.2"))
    out = tmp_path / "features.html"
    assert_user_error(run_xsae("viz", "features", str(run), "--output", str(out)), "several hooks", "--hook")
    proc = run_xsae("--json", "viz", "features", str(run), "--hook", "transformer.h.2", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["latents"] == 12 and s["bytes"] == out.stat().st_size
    page = out.read_text()
    assert not URL.search(page) and 'id="search"' in page
    data = json.loads(re.search(r'id="xsae-data">(.*?)</script>', page, re.DOTALL).group(1))
    assert len(data["latents"]) == 12 and data["meta"]["hook"] == "transformer.h.2"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hook": "h"}))
    assert_user_error(run_xsae("viz", "features", str(bad), "--output", str(tmp_path / "b.html")), str(bad), "'latents'")
    assert_user_error(run_xsae("viz", "features", str(tmp_path / "nope"), "--output", str(tmp_path / "b.html")), "nope")


@pytest.mark.slow
def test_real_sae_run_to_dashboard(demo_zoo: Path, tmp_path: Path) -> None:
    """The issue's commands on a real SAE run: train, features, then every viz view of it."""
    run = tmp_path / "run"
    tr = run_xsae(
        "--seed",
        "0",
        "sae",
        "train",
        "--model",
        "tiny-gpt2",
        "--hook",
        "transformer.h.2",
        "--k",
        "8",
        "--expansion",
        "4",
        "--tokens",
        "8k",
        "--batch-size",
        "512",
        "--context-size",
        "64",
        "--out",
        str(run),
    )
    assert tr.returncode == 0, tr.stderr[-2000:]
    fe = run_xsae("sae", "features", str(run), "--contexts", "16")
    assert fe.returncode == 0, fe.stderr[-2000:]
    assert run_xsae("viz", "curves", str(run), "--output", str(tmp_path / "c.png")).returncode == 0
    out = tmp_path / "features.html"
    proc = run_xsae("--json", "viz", "features", str(run), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["latents"] == 256 and not URL.search(out.read_text())
    if CHROMIUM:
        assert card_ids(chromium(out.resolve().as_uri(), "--dump-dom").stdout) == list(range(50))
