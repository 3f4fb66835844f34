"""`xsae viz report` end to end: the real command on run folders of every kind, the page in headless
Chromium, bad input; and (slow) on runs the real `xsae sae` / `xsae sane` commands just made."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import assert_user_error, run_xsae
from tests.unit.viz._helpers import (
    CHROMIUM,
    EXTERNAL_REF,
    URL,
    chromium,
    page_images,
    tiny_png,
    write_demo_tree,
)

FAST = {"XSAE_VIZ_DPI": "60"}  # the page's plots at low resolution: the same code, less PNG encoding


def _check_in_browser(out: Path, sections: int, tmp_path: Path) -> None:
    """Open the page in headless Chromium: a rendered screenshot, every section, every picture decoded, no console output."""
    url = out.resolve().as_uri()
    shot = tmp_path / "report.png"
    proc = chromium(url, f"--screenshot={shot}")
    assert shot.exists() and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape == (1600, 1280) and img.std() > 10  # a rendered page, not a blank one
    dom = chromium(url, "--enable-logging=stderr", "--v=0", "--dump-dom")
    assert dom.stdout.count('<section class="run"') == sections
    n_img = len(re.findall(r"<img ", dom.stdout))
    assert f'data-images-loaded="{n_img}/{n_img}"' in dom.stdout, re.search(r"data-images-loaded=\"[^\"]*\"", dom.stdout)
    assert re.search(r'<div id="errors" hidden="">\s*</div>', dom.stdout), "the page reported an error"
    console = [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]
    assert not console, console


def test_report_on_a_demo_folder(tmp_path: Path) -> None:
    """A folder holding SAE, SANE (train + embed), restore and align runs (files cut from real runs), plus a loose plot."""
    demo = write_demo_tree(tmp_path)
    (demo / "embedding_plot.png").write_bytes(tiny_png(120, 80))
    out = demo / "report.html"
    out.write_text("an older page")  # replaced with --force, atomically
    proc = run_xsae("--json", "viz", "report", str(demo), "--output", str(out), "--force", env=FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads(proc.stdout)
    assert s["runs"] == 5 and s["bytes"] == out.stat().st_size and not list(demo.glob(".report.html.*"))
    assert [(x["name"], x["kind"]) for x in s["sections"]] == [("demo", "pictures"), ("align", "align"), ("restore", "restore"), ("sae", "sae"), ("sane", "sane")]
    by = {x["name"]: x for x in s["sections"]}
    assert by["sae"]["figures"]["curves"] == 1 and by["sane"]["figures"] == {"curves": 1, "cluster": 1, "picture": 0}
    assert by["align"]["figures"]["picture"] == 2 and by["restore"]["figures"]["curves"] == 1
    assert all(not x["notes"] for x in s["sections"]), [x["notes"] for x in s["sections"]]

    page = out.read_text()
    assert not EXTERNAL_REF.search(page) and not URL.search(page)  # nothing to fetch: no http(s) anywhere
    assert "<link" not in page and "<script src" not in page
    assert len(page_images(page)) == 7  # every picture a data: URI that decodes
    assert page.count('<section class="run"') == 5 and page.count('<li><a href="#run-') == 5
    for needle in ("SAEs (SAELens layout)", "most frequent latents · transformer.h.2", "mapper r2 (test)", "Training curves", "Model embeddings", "Versions", "Config"):
        assert needle in page, needle

    if CHROMIUM:
        _check_in_browser(out, 5, tmp_path)


def test_report_bad_input(tmp_path: Path) -> None:
    """One line, exit 2: a folder with nothing xsae wrote names what was looked for; an existing page
    is kept without --force. (Missing folders, files, corrupt logs: tests/unit/viz/test_report.py.)"""
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not a run")
    out = tmp_path / "r.html"
    line = assert_user_error(run_xsae("viz", "report", str(empty), "--output", str(out)), str(empty), "looked for", "run.json", "train_log.jsonl", "report.json", "model_embeddings.json")
    assert "checkpoint_epoch_N/config.json" in line and not out.exists()
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "a.png").write_bytes(tiny_png())
    out.write_text("old")
    assert_user_error(run_xsae("viz", "report", str(pics), "--output", str(out)), str(out), "already exists", "--force")
    assert out.read_text() == "old"


@pytest.mark.slow
def test_report_on_real_runs(demo_zoo: Path, tmp_path: Path) -> None:
    """The commands that write runs, then one page for them all."""
    runs = tmp_path / "runs"
    sae = runs / "sae"
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
        str(sae),
    )
    assert tr.returncode == 0, tr.stderr[-2000:]
    assert run_xsae("sae", "features", str(sae), "--contexts", "16").returncode == 0
    one = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    sane = runs / "sane"
    st = run_xsae(
        "--seed",
        "0",
        "sane",
        "train",
        "--models",
        "tiny-gpt2,tiny-gemma,tiny-qwen2",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--window-size",
        "64",
        "--steps-per-epoch",
        "3",
        "--out",
        str(sane),
        env=one,
    )
    assert st.returncode == 0, st.stderr[-2000:]
    em = run_xsae("sane", "embed", "--checkpoint", str(sane / "checkpoint_epoch_2"), "--models", "tiny-gpt2,tiny-gemma,tiny-qwen2", "--output-dir", str(sane / "embed"), env=one)
    assert em.returncode == 0, em.stderr[-2000:]
    assert run_xsae("viz", "curves", str(sae), "--output", str(sae / "curves.png")).returncode == 0  # a picture already in the folder

    out = tmp_path / "report.html"
    proc = run_xsae("--json", "viz", "report", str(runs), "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads(proc.stdout)
    by = {x["name"]: x for x in s["sections"]}
    assert [x["kind"] for x in s["sections"]] == ["sae", "sane"]
    assert by["sae"]["figures"] == {"curves": 1, "cluster": 0, "picture": 1} and "metrics.json" in by["sae"]["files"]
    assert by["sane"]["figures"] == {"curves": 1, "cluster": 1, "picture": 0} and "embed/model_embeddings.json" in by["sane"]["files"]
    page = out.read_text()
    assert not EXTERNAL_REF.search(page) and not URL.search(page) and len(page_images(page)) == 4
    assert "ce_loss_recovered" in page and "tiny-gemma" in page and "most frequent latents" in page
    if CHROMIUM:
        _check_in_browser(out, 2, tmp_path)
    shutil.rmtree(runs)
