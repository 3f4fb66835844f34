"""`xsae restore` end to end: train tiny on ATF -> predict -> convert -> sae (both routes), and bad input."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_user_error, run_xsae

ATF = Path(__file__).parents[1] / "unit" / "restore" / "fixtures" / "letters.atf"
BAD_ATF = ATF.with_name("bad.atf")
# Tiny models on a shared 2-core machine: OpenMP hand-offs cost more than the arithmetic.
ENV = {"OMP_NUM_THREADS": "1"}


def test_train_predict_convert_sae(tmp_path: Path) -> None:
    run = tmp_path / "restore"
    train = run_xsae(
        "--json", "--seed", "0", "restore", "train", "--corpus", str(ATF), "--preset", "tiny", "--steps", "30", "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3", "--out", str(run), env=ENV
    )
    assert train.returncode == 0, train.stderr[-2000:]
    summary = json.loads(train.stdout)
    assert summary["steps"] == 30 and summary["last"]["loss"] < 3.5  # well under ln(vocab) ~ 3.6 at the start
    assert {p.name for p in run.iterdir()} >= {"config.json", "model.safetensors", "vocab.json", "checkpoints", "train_log.jsonl"}

    pred = run_xsae("--json", "restore", "predict", "a-na be-li2-ia [...] qi2-bi2-ma", "-m", str(run), "--top", "3", "--max-len", "4", env=ENV)
    assert pred.returncode == 0, pred.stderr[-2000:]
    result = json.loads(pred.stdout)
    (gap,) = result["gaps"]
    assert gap["source"] == "[...]" and len(gap["candidates"]) == 3
    assert all(0 < c["p"] <= c["p_char"] <= 1 for c in gap["candidates"])
    human = run_xsae("restore", "predict", "a-na [x] qi2-bi2-ma", "-m", str(run), "--top", "2", env={**ENV, "COLUMNS": "120"})
    assert human.returncode == 0 and "gap 1: [x]" in human.stdout and "p per char" in human.stdout

    conv = run_xsae("--json", "restore", "convert", str(run), env=ENV)
    assert conv.returncode == 0, conv.stderr[-2000:]
    report = json.loads(conv.stdout)
    assert report["max_abs_logit_diff"] <= 1e-4 and report["config"]["attention_dir"] == "bidirectional"
    assert (run / "transformer_lens" / "tl_model.safetensors").exists()

    sae = run_xsae(
        "--json",
        "restore",
        "sae",
        "-m",
        str(run),
        "--layer",
        "2",
        "--max-samples",
        "12",
        "--epochs",
        "3",
        "--device",
        "cpu",
        "--k",
        "8",
        "--expansion",
        "4",
        "--batch-size",
        "256",
        "--out",
        str(tmp_path / "sae"),
        env=ENV,
    )
    assert sae.returncode == 0, sae.stderr[-2000:]
    m = json.loads(sae.stdout)
    assert m["hook"] == "blocks.2.hook_resid_post" and m["reconstruction"]["fvu"] < 1.0 and m["reconstruction"]["l0"] <= 8 + 1e-6
    folder = tmp_path / "sae" / "blocks.2.hook_resid_post"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["d_in"] == 64 and cfg["d_sae"] == 256 and cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    features = json.loads((folder / "features.json").read_text())
    assert features["format"] == "xsae-features"  # the schema `xsae sae features` writes, so `viz features` reads it
    top = max(features["latents"], key=lambda lat: lat["frequency"])
    assert top["top_tokens"] and top["logit_lens"]["promoted"]
    ctx = top["top_contexts"][0]
    assert len(ctx["tokens"]) == len(ctx["acts"]) and ctx["acts"][ctx["max_index"]] == pytest.approx(ctx["max_act"], abs=1e-3)
    page = run_xsae("viz", "features", str(folder), "--out", str(tmp_path / "f.html"), env=ENV)
    assert page.returncode == 0, page.stderr[-2000:]


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    assert_user_error(run_xsae("restore", "train", "--corpus", str(BAD_ATF), "--out", str(tmp_path / "x"), env=ENV), "bad.atf line 5", "not a valid ATF line")
    state = {"embed.weight": torch.zeros(40, 32), "blocks.0.W_Q": torch.zeros(4, 32, 8)}
    torch.save({"model_state_dict": state, "config": {"vocab_size": 40, "d_model": 32, "n_heads": 4, "d_ff": 48, "n_layers": 1, "max_position": 16}, "vocab_size": 40}, tmp_path / "other.pt")
    assert_user_error(run_xsae("restore", "convert", str(tmp_path / "other.pt"), env=ENV), "missing keys: ", "layers.0.attn.q_proj.weight", "unexpected keys: blocks.0.W_Q")
    assert_user_error(run_xsae("restore", "sae", "-m", str(tmp_path / "other.pt"), "--out", str(tmp_path / "s"), "--device", "mps", env=ENV), "'mps' is not available", "available devices: cpu")


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    args = ["--seed", "1", "restore", "train", "--corpus", str(ATF), "--steps", "12", "--batch-size", "4", "--seq-len", "48", "--checkpoint-every", "4"]
    ref = run_xsae(*args, "--out", str(tmp_path / "ref"), env=ENV)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    crashed = run_xsae(*args, "--out", str(out), env={**ENV, "XSAE_CRASH_AT_STEP": "10"})
    assert crashed.returncode == -signal.SIGKILL
    assert not (out / "config.json").exists()
    resumed = run_xsae(*args, "--out", str(out), env=ENV)
    assert resumed.returncode == 0 and "resuming from step 8" in resumed.stderr
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
