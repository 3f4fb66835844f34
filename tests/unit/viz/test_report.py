"""`viz report`: run kinds told from their files, generic tables and logs, and the offline page."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.unit.viz._helpers import (
    EXTERNAL_REF,
    URL,
    page_images,
    tiny_png,
    write_align_run,
    write_demo_tree,
    write_full_sae_run,
    write_restore_run,
    write_sane_embed,
    write_sane_run,
)
from xsae_cli.core.errors import XsaeError
from xsae_cli.viz import tables as T
from xsae_cli.viz.curves import load_run, plot_curves
from xsae_cli.viz.report import build_report, write_report
from xsae_cli.viz.runs import LOOKED_FOR, find_runs, is_run, read_run


def _titles(info) -> dict[str, T.Table]:
    return {f"{t.source}:{t.title}": t for t in info.tables}


# ------------------------------------------------------------------------------------ JSON -> tables


def test_json_tables_by_shape() -> None:
    data = {
        "format": "xsae-x",
        "steps": 12,
        "hooks_list": ["a", "b"],
        "config": {"lr": 0.1, "nested": {"k": 8}},
        "versions": {"torch": "2.13"},
        "hooks": {"h1": {"fvu": 0.3, "l0": 8.0, "downstream": {"kl": 0.01}}, "h2": {"fvu": 0.2, "l0": 7.5, "downstream": {"kl": 0.02}}},
        "history": [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}],
        "embeddings": {"m1": [0.1] * 512, "m2": [0.2] * 512},
    }
    by = {t.title: t for t in T.json_tables(data, "x.json")}
    assert by["summary"].rows[:3] == [["format", "xsae-x"], ["steps", 12], ["hooks_list", "a, b"]]
    assert ["embeddings", "2 × [512 numbers] (not shown)"] in by["summary"].rows  # long vectors never dumped
    assert by["config"].part == "config" and ["nested.k", 8] in by["config"].rows
    assert by["versions"].part == "versions" and by["versions"].rows == [["torch", "2.13"]]
    hooks = by["hooks"]  # an object of objects: one row per hook, nested fields dotted
    assert hooks.columns == ["hooks", "fvu", "l0", "downstream.kl"] and hooks.rows[1] == ["h2", 0.2, 7.5, 0.02]
    hist = by["history"]  # a list of objects, rows named by their epoch
    assert hist.rows == [["epoch 1", 1, 2.0], ["epoch 2", 2, 1.5]] and all(t.source == "x.json" for t in by.values())


def test_grid_transposes_few_wide_entities_and_caps_rows() -> None:
    wide = {f"m{i}": i * 0.5 for i in range(12)}
    t = T.json_tables({"hooks": {"only": wide}}, "m.json")[0]
    assert t.columns == ["field", "only"] and len(t.rows) == 12 and t.rows[3] == ["m3", 1.5]
    big = {"per_item": {f"x{i}": {"a": i, "b": -i} for i in range(T.MAX_ROWS + 50)}}
    t = T.json_tables(big, "b.json")[0]
    assert len(t.rows) == T.MAX_ROWS and f"of {T.MAX_ROWS + 50:,} rows" in t.note
    deep = {"results": [{"directions": {d: {m: {"r2": 0.1, "null": 0.0} for m in "abcdefghij"} for d in ("ab", "ba")}} for _ in range(8)]}
    t = T.json_tables(deep, "r.json")[0]  # 40 fields x 8 entities: too wide for a grid -> key / value rows
    assert t.columns == ["field", "value"] and t.title == "results" and ["0.directions.ab.a.r2", 0.1] in t.rows and "first 200 of 320 rows" in t.note


def test_explicit_tables_three_shapes() -> None:
    data = {
        "tables": {
            "records": [{"layer": 5, "r2": 0.4}, {"layer": 6, "r2": 0.5}],
            "grid": {"columns": ["layer", "cka"], "rows": [[5, 0.6]], "note": "held out"},
        }
    }
    by = {t.title: t for t in T.json_tables(data, "report.json")}
    assert by["records"].columns == ["layer", "r2"] and by["records"].rows == [[5, 0.4], [6, 0.5]]
    assert by["grid"].rows == [[5, 0.6]] and by["grid"].note == "held out"
    listed = T.json_tables({"tables": [{"title": "t1", "columns": ["a"], "rows": [[1], [2]]}]}, "r.json")
    assert listed[0].title == "t1" and listed[0].rows == [[1], [2]]


def test_format_cell() -> None:
    assert [T.format_cell(v) for v in (None, True, 12345, 0.0, 0.123456, 1.5e-5, 2.5e7, "x")] == ["–", "yes", "12,345", "0", "0.1235", "1.500e-05", "2.500e+07", "x"]


# ---------------------------------------------------------------------------------------- detection


def test_sae_run_detected(tmp_path: Path) -> None:
    info = read_run(write_full_sae_run(tmp_path))
    assert info.kind == "sae" and info.title == "SAE run"
    assert {"train_log.jsonl", "run.json", "metrics.json", "transformer.h.2/cfg.json", "transformer.h.2/features.json"} <= set(info.files)
    tabs = _titles(info)
    saes = tabs["<hook>/cfg.json:SAEs (SAELens layout)"]
    assert saes.rows[0][:6] == ["transformer.h.2", "transformer.h.2", "topk", 64, 256, 8]  # hook read from cfg.json's metadata
    hooks = tabs["metrics.json:hooks"]
    assert ["fvu", pytest.approx(0.3772, abs=1e-4)] in hooks.rows and hooks.columns == ["field", "transformer.h.2"]
    top = tabs["transformer.h.2/features.json:most frequent latents · transformer.h.2"]
    freqs = [r[1] for r in top.rows]
    assert len(top.rows) == 8 and freqs == sorted(freqs, reverse=True) and "xsae viz features" in top.note
    assert any("[" in r[4] for r in top.rows)  # the max token of the top context is marked
    assert sum(t.part == "versions" for t in info.tables) == 1  # run.json's and metrics.json's versions are one table
    assert [s.label for s in info.series] == ["sae · transformer.h.2"] and not info.notes
    hook = read_run(tmp_path / "sae" / "transformer.h.2")  # one hook's folder on its own
    assert hook.kind == "sae" and hook.files == ["cfg.json", "features.json"]
    assert [t.title for t in hook.tables] == ["SAEs (SAELens layout)", "most frequent latents · transformer.h.2"]


def test_sane_train_and_embed_detected(tmp_path: Path) -> None:
    run = write_sane_run(tmp_path, "sane", epochs=2)
    write_sane_embed(run, "embed")
    info = read_run(run)
    assert info.kind == "sane" and info.kinds == ["sane"]
    assert info.embeddings == [run / "embed" / "model_embeddings.json"]
    assert [s.kind for s in info.series] == ["sane"] and info.series[0].x == [1.0, 2.0]  # the latest checkpoint's history
    assert "checkpoint_epoch_2/config.json" in info.files and "checkpoint_epoch_1/config.json" not in info.files
    tabs = _titles(info)
    assert "embed/model_embeddings.json:models" in tabs and tabs["embed/model_embeddings.json:summary"].rows[-1][1].endswith("(not shown)")


def test_align_and_restore_detected_generically(tmp_path: Path) -> None:
    align = read_run(write_align_run(tmp_path))
    assert align.kind == "align" and align.title == "alignment run"
    tabs = _titles(align)
    assert tabs["report.json:mapper r2 (test)"].rows[1] == [5, "ridge", 0.47, 0.03, 0.81]
    assert tabs["report.json:config"].part == "config" and tabs["report.json:versions"].part == "versions"
    assert sorted(p.name for p in align.pictures) == ["bars.svg", "heatmap.png"] and not align.series

    restore = read_run(write_restore_run(tmp_path))
    assert restore.kind == "restore" and "vocab.json" not in restore.files  # a vocabulary has no numbers to show
    (s,) = restore.series
    assert s.kind == "log" and s.xlabel == "training step" and s.columns == ["loss", "masked_acc", "lr", "chars_per_s"]


def test_unknown_group_gets_a_generic_page(tmp_path: Path) -> None:
    run = tmp_path / "newgroup"
    run.mkdir()
    (run / "scores.json").write_text(json.dumps({"kind": "probe", "accuracy": 0.91, "per_layer": {"3": {"acc": 0.8}, "4": {"acc": 0.9}}}))
    (run / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "val_loss": 1.0 / e, "weird_metric": e * 2, "phase": "val"}) + "\n" for e in (1, 2, 3)))
    (run / "notes.json").write_text(json.dumps({"text": "no numbers here"}))
    info = read_run(run)
    assert info.kind == "probe" and info.title == "probe run"
    assert info.files == ["log.jsonl", "scores.json"]
    (s,) = info.series
    assert s.xlabel == "epoch" and s.label == "newgroup · val" and s.columns == ["val_loss", "weird_metric"]


def test_unreadable_files_become_notes(tmp_path: Path) -> None:
    run = write_restore_run(tmp_path)
    (run / "broken.json").write_text('{"a": 1,')
    (run / "fake.png").write_bytes(b"not a png at all")
    (run / "empty.svg").write_bytes(b"")
    info = read_run(run)
    (run / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{oops\n{"step": 3, "loss": 1.0}\n')
    info = read_run(run)
    notes = " | ".join(info.notes)
    assert "broken.json is not valid JSON" in notes and "fake.png is not a PNG image" in notes and "empty.svg is empty" in notes
    assert f"{run / 'train_log.jsonl'} line 2 is not valid JSON" in notes and not info.series
    assert info.kind == "restore" and "config.json" in info.files  # the rest of the run is still shown
    big = tmp_path / "big"
    big.mkdir()
    (big / "m.json").write_text('{"x": 1}')
    (big / "plot.png").write_bytes(tiny_png(600, 600) + b"\0" * 50_000)
    info = read_run(big, max_image_bytes=20_000)
    assert not info.pictures and info.notes == [f"plot.png is {(big / 'plot.png').stat().st_size / 2**20:.3g} MB, over the 0.0191 MB limit for embedded pictures ([viz] max_image_mb); not embedded"]


def test_find_runs_recurses_one_level(tmp_path: Path) -> None:
    demo = write_demo_tree(tmp_path)
    (demo / "embedding_plot.png").write_bytes(tiny_png())
    (demo / "stray").mkdir()  # nothing xsae wrote: skipped
    targets = find_runs([demo])
    assert [(t.path.name, t.pictures_only) for t in targets] == [("demo", True), ("align", False), ("restore", False), ("sae", False), ("sane", False)]
    assert [t.path.name for t in find_runs([demo / "sae", demo / "sae", demo / "sane"])] == ["sae", "sane"]  # each run once
    assert is_run(demo / "sae") and not is_run(demo) and not is_run(demo / "stray")


def test_find_runs_bad_input(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(XsaeError) as exc:
        find_runs([empty])
    msg = str(exc.value)
    assert str(empty) in msg and LOOKED_FOR in msg and "train_log.jsonl" in msg and "report.json" in msg
    with pytest.raises(XsaeError, match="run folder not found"):
        find_runs([tmp_path / "nope"])
    with pytest.raises(XsaeError, match="is a file, not a run folder"):
        find_runs([empty / "notes.txt"])
    with pytest.raises(XsaeError, match="no run folders given"):
        find_runs([])


# ----------------------------------------------------------------------------------- generic curves


def test_generic_log_curves(tmp_path: Path) -> None:
    run = write_restore_run(tmp_path)
    (s,) = load_run(run)
    assert s.kind == "log" and s.x == [10.0, 20.0, 30.0]
    svg = tmp_path / "c.svg"
    summary = plot_curves([run], svg, "svg")
    assert summary["panels"] == ["log_loss", "log_masked_acc", "log_lr", "log_chars_per_s"]
    text = svg.read_text()
    assert "training step" in text and "accuracy (fraction of masked characters)" in text and "characters per second" in text
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "train_log.jsonl").write_text(json.dumps({"step": 1, "mystery": 2.0}) + "\n" + json.dumps({"step": 2, "mystery": 1.0}) + "\n")
    plot_curves([tmp_path / "x"], tmp_path / "m.svg", "svg")
    assert "mystery (as logged)" in (tmp_path / "m.svg").read_text()  # an unknown unit is said to be unknown


# ------------------------------------------------------------------------------------------- page


def test_report_page_self_contained(tmp_path: Path) -> None:
    demo = write_demo_tree(tmp_path)
    (demo / "sae" / "config_note.json").write_text(json.dumps({"settings": {"comment": "<script>alert(1)</script>"}, "x": 1}))
    page, summary = build_report([demo], dpi=40)
    assert summary["runs"] == 4 and [s["kind"] for s in summary["sections"]] == ["align", "restore", "sae", "sane"]
    assert page.count('<section class="run"') == 4 and len(re.findall(r'<a href="#run-\d">', page)) == 4
    assert not EXTERNAL_REF.search(page) and not URL.search(page), EXTERNAL_REF.search(page) or URL.search(page)
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    imgs = page_images(page)
    # align: 2 pictures; restore, sae: curves; sane: curves + cluster plot
    assert [m for m, _ in imgs] == ["image/svg+xml", "image/png", "image/png", "image/png", "image/png", "image/png"]
    for mime, data in imgs:
        if mime == "image/png":
            w, h = Image.open(io.BytesIO(data)).size
            assert w >= 40 and h >= 20
    sane = summary["sections"][3]
    assert sane["figures"] == {"curves": 1, "cluster": 1, "picture": 0} and sane["tables"] >= 6
    for needle in ("mapper r2 (test)", "most frequent latents", "masked-character accuracy", "Model embeddings", "Versions", "Config"):
        assert needle in page, needle


def test_write_report_single_run_and_notes(tmp_path: Path) -> None:
    run = write_sane_run(tmp_path)
    one = tmp_path / "one"
    one.mkdir()
    (one / "model_embeddings.json").write_text(json.dumps({"embeddings": {"a": [1.0, 2.0]}, "models": {}}))
    out = tmp_path / "r.html"
    s = write_report([run, one], out, dpi=40)
    page = out.read_text()
    assert s["bytes"] == out.stat().st_size and s["runs"] == 2
    assert "at least two" in " ".join(s["sections"][1]["notes"])  # a one-model embedding: said, no invented plot
    assert page.count("<figure") == 1
    solo, _ = build_report([run], dpi=40)
    assert 'id="toc"' not in solo and "xsae report: sane" in solo
