"""`viz curves`: SAE train logs and SANE histories read, overlaid and plotted; missing logs named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.unit.viz._helpers import DATA, write_run, write_sane_run
from xsae_cli.core.errors import XsaeError
from xsae_cli.viz.curves import load_run, plot_curves


def test_reads_sae_log_per_hook(tmp_path: Path) -> None:
    run = write_run(tmp_path, hooks=("transformer.h.1", "transformer.h.2"))
    series = load_run(run)
    assert [s.label for s in series] == ["run · transformer.h.1", "run · transformer.h.2"]
    n = sum(1 for line in (DATA / "train_log.jsonl").read_text().splitlines() if '"transformer.h.2"' in line)
    assert n >= 5 and all(s.kind == "sae" and len(s.x) == n for s in series)
    assert series[0].x == sorted(series[0].x) and all(v is not None for v in series[0].values["fvu"])
    assert series[0].values["dead_pct"][0] is not None and series[0].values["lr"][0] > 0


def test_sane_history_from_latest_checkpoint(tmp_path: Path) -> None:
    run = write_sane_run(tmp_path, epochs=2)
    (s,) = load_run(run)
    assert s.kind == "sane" and s.x == [1.0, 2.0] and len(s.values["loss"]) == 2
    (s2,) = load_run(run / "checkpoint_epoch_1")
    assert s2.x == [1.0] and s2.label == "sane"


def test_plot_overlaid_runs(tmp_path: Path) -> None:
    a = write_run(tmp_path, "a")
    b = write_run(tmp_path, "b", hooks=("transformer.h.1", "transformer.h.2"))
    sane = write_sane_run(tmp_path)
    out = tmp_path / "curves.png"
    summary = plot_curves([a, b, sane], out, "png", dpi=60)
    assert summary["series"] == 4 and summary["runs"] == 3
    assert summary["panels"] == ["loss", "fvu", "l0", "dead_pct", "lr", "sane_loss", "sane_recon", "sane_contrast"]
    img = np.asarray(Image.open(out).convert("L"), dtype=float)
    assert img.shape[1] > 500 and img.shape[0] > 700 and img.std() > 5
    svg = tmp_path / "c.svg"
    plot_curves([a], svg, "svg")
    text = svg.read_text()
    assert "training tokens" in text and "FVU" in text


def test_crash_truncated_last_line_is_skipped(tmp_path: Path) -> None:
    run = write_run(tmp_path)
    with open(run / "train_log.jsonl", "a") as fh:
        fh.write('{"step": 99, "tok')
    (s,) = load_run(run)
    assert 99 not in s.x


def test_missing_and_bad_logs_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(XsaeError) as exc:
        load_run(empty)
    msg = str(exc.value)
    assert "train_log.jsonl" in msg and "checkpoint_epoch_N/config.json" in msg and str(empty) in msg
    with pytest.raises(XsaeError, match="run folder not found"):
        load_run(tmp_path / "nope")
    run = write_run(tmp_path)
    lines = (run / "train_log.jsonl").read_text().splitlines()
    (run / "train_log.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(XsaeError, match=r"train_log.jsonl line 2 is not valid JSON"):
        load_run(run)
    (run / "train_log.jsonl").write_text(json.dumps({"loss": 1.0}) + "\n")
    with pytest.raises(XsaeError, match=r"line 1: missing field 'tokens'"):
        load_run(run)
    with pytest.raises(XsaeError, match="no run folders"):
        plot_curves([], tmp_path / "x.png")
