"""Bad inputs of issue 17's kinds, through the real app: exit 2, one stderr line naming the input,
no traceback, the input file untouched. In-process (the app, not a subprocess) to stay fast; one case
runs the real `xsae` in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_user_error, run_xsae

GOOD = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 1.0]}

#: name -> (embeddings file content, extra args, what the line must name)
NEIGHBORS = {
    "nan distance": ({**GOOD, "b": [float("nan"), 1.0]}, [], "embeddings of b contain NaN or infinity"),
    "infinite value": ({**GOOD, "c": [float("inf"), 1.0]}, [], "embeddings of c contain NaN or infinity"),
    "not a vector": ({**GOOD, "c": "1,1"}, [], "embeddings['c'] is not a non-empty list of numbers"),
    "empty vector": ({**GOOD, "c": []}, [], "embeddings['c'] is not a non-empty list of numbers"),
    "top 0": (GOOD, ["--top", "0"], "--top 0 must be at least 1"),
    "top negative": (GOOD, ["--top", "-3"], "--top -3 must be at least 1"),
}


def _in_process(args: list[str]) -> int:
    from xsae_cli.cli import app

    with pytest.raises(SystemExit) as ex:
        app(args, prog_name="xsae")
    return int(ex.value.code or 0)


@pytest.mark.parametrize("case", list(NEIGHBORS))
def test_sane_neighbors_refuses_what_has_no_distance(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content, extra, needle = NEIGHBORS[case]
    f = tmp_path / "model_embeddings.json"
    f.write_text(json.dumps({"embeddings": content}))
    before = f.read_bytes()
    assert _in_process(["sane", "neighbors", "a", "--embeddings", str(f), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err and "Traceback" not in err, err
    assert f.read_bytes() == before


def test_nan_neighbors_in_a_subprocess(tmp_path: Path) -> None:
    f = tmp_path / "model_embeddings.json"
    f.write_text(json.dumps({"embeddings": {**GOOD, "b": [float("nan"), 1.0]}}))
    assert_user_error(run_xsae("sane", "neighbors", "a", "--embeddings", str(f)), str(f), "NaN")


@pytest.mark.parametrize("name", ["plot.jpg", "plot.JPEG", "plot.gif", "plot.pdf", "a_folder"])
def test_viz_refuses_outputs_it_cannot_write(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PNG bytes went into files named .jpg/.gif; a folder as --out gave a traceback."""
    emb = tmp_path / "model_embeddings.json"
    emb.write_text(json.dumps({"embeddings": GOOD}))
    target = tmp_path / name
    if "." not in name:
        target.mkdir()
    for cmd in (["viz", "cluster", "-i", str(emb)], ["viz", "curves", str(tmp_path)]):
        assert _in_process([*cmd, "--out", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and f"--out {target}" in err and "\n" not in err, err
    assert target.is_dir() if "." not in name else not target.exists()


def test_align_pair_refuses_a_folder_without_tokenizer_files(tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """transformers builds an empty tokenizer there: 0 tokens, 0 pairs, exit 0 before."""
    assert _in_process(["align", "pair", "--a", str(tiny_gpt2_dir), "--b", str(tiny_gpt2_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "turns text into no tokens" in err and str(tiny_gpt2_dir) in err and "\n" not in err, err


@pytest.mark.parametrize(("text", "needle"), [("a [...] b " * 300, "the text has 300 gaps"), ("a-na " * 25_000 + "[x]", "at most 100,000 per call"), ("a-na be-li2", "no gap in")])
def test_restore_predict_bounds_its_work_before_the_model_loads(text: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Thousands of gaps ran for hours; the model path does not even exist here."""
    assert _in_process(["restore", "predict", text, "-m", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err, err[:300]


def test_home_or_cache_that_is_a_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xsae_cli.core.config import xsae_cache
    from xsae_cli.core.errors import XsaeError

    f = tmp_path / "not-a-folder"
    f.write_text("keep")
    assert_user_error(run_xsae("zoo", "list", env={"XSAE_HOME": str(f)}), f"XSAE_HOME {f}", "is a file, not a folder")
    monkeypatch.setenv("XSAE_CACHE", str(f / "sub"))
    with pytest.raises(XsaeError, match=f"XSAE_CACHE {f}/sub: {f} is a file, not a folder"):
        xsae_cache()
    assert f.read_text() == "keep"
