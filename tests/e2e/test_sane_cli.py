"""`xsae sane` end to end on the tiny demo models: tokenize, train (and resume), embed, neighbors, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_user_error, run_xsae
from xsae_cli.core.io import load_safetensors
from xsae_cli.sane.tokenizer import KIND_ID
from xsae_cli.sane.views import get_view

TINY = ["tiny-gpt2", "tiny-gptneox", "tiny-qwen2", "tiny-mistral", "tiny-gemma"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SMALL = ["--batch-size", "4", "--window-size", "256", "--save-every", "1", "--mixed-precision", "fp16", "--steps-per-epoch", "3", "--d-model", "32", "--latent-dim", "8"]


def test_tokenize_train_resume_embed_neighbors(demo_zoo: Path, tmp_path: Path) -> None:
    tok = run_xsae("--json", "sane", "tokenize", "tiny-gpt2", "tiny-gemma", env=ONE_THREAD)
    assert tok.returncode == 0, tok.stderr[-2000:]
    rows = json.loads(tok.stdout)
    assert [r["name"] for r in rows] == ["tiny-gpt2", "tiny-gemma"] and [r["view"] for r in rows] == ["circuits", "circuits"]
    assert [r["n_chunks"] for r in rows] == [13 * 64, 17 * 64]  # gram + 4 blocks x (qk, ov, mlp[, gate]); both tie their head
    assert [r["outlier_directions"] for r in rows] == [0, 0]  # random-initialised embeddings are left as they are
    raw = run_xsae("--json", "sane", "tokenize", "--view", "weights", "tiny-gpt2", env=ONE_THREAD)
    assert raw.returncode == 0, raw.stderr[-2000:]
    assert json.loads(raw.stdout)[0]["view"] == "weights" and json.loads(raw.stdout)[0]["n_chunks"] > 3000

    run = tmp_path / "runs" / "sane"
    tr = run_xsae("--json", "--seed", "0", "sane", "train", "--models", ",".join(TINY), "--epochs", "2", *SMALL, "--out", str(run), env=ONE_THREAD)
    assert tr.returncode == 0, tr.stderr[-2000:]
    summary = json.loads(tr.stdout)
    assert summary["epochs_done"] == 2 and summary["resumed_from"] is None and summary["models"] == TINY
    assert len(summary["history"]) == 2 and summary["history"][0]["windows_per_second"] > 0
    for e in (1, 2):
        ck = run / f"checkpoint_epoch_{e}"
        assert (ck / "model.safetensors").exists() and json.loads((ck / "config.json").read_text())["epoch"] == e

    again = run_xsae("--json", "--seed", "0", "sane", "train", "--models", ",".join(TINY), "--epochs", "3", *SMALL, "--out", str(run), env=ONE_THREAD)
    assert again.returncode == 0, again.stderr[-2000:]
    s2 = json.loads(again.stdout)
    assert s2["resumed_from"] == 2 and s2["epochs_done"] == 3 and len(s2["history"]) == 3
    assert s2["history"][:2] == summary["history"][:2] or [h["loss"] for h in s2["history"][:2]] == [h["loss"] for h in summary["history"][:2]]

    out = tmp_path / "out"
    em = run_xsae("--json", "sane", "embed", "--checkpoint", str(run / "checkpoint_epoch_3"), "--models", ",".join(TINY), "--output-dir", str(out), env=ONE_THREAD)
    assert em.returncode == 0, em.stderr[-2000:]
    data = json.loads((out / "model_embeddings.json").read_text())
    assert data["format"] == "xsae-sane-embeddings" and list(data["embeddings"]) == TINY
    assert all(len(v) == 512 and np.isfinite(v).all() for v in data["embeddings"].values())
    assert data["config"]["chunk_size"] == 64 and data["config"]["epoch"] == 3 and data["versions"]["torch"]
    assert data["models"]["tiny-gpt2"]["family"] == "gpt2" and data["models"]["tiny-gpt2"]["windows"] >= 1
    npz = np.load(out / "model_embeddings.npz")
    assert list(npz["names"]) == TINY and npz["embeddings"].shape == (5, 512)
    assert np.allclose(npz["embeddings"][0], data["embeddings"]["tiny-gpt2"], atol=1e-5)

    # the original Universal SANE's layout: a bare {name: [floats]} map, written and read back
    plain = tmp_path / "plain"
    ep = run_xsae("--json", "sane", "embed", "--checkpoint", str(run / "checkpoint_epoch_3"), "--models", ",".join(TINY), "--format", "plain", "--out", str(plain), env=ONE_THREAD)
    assert ep.returncode == 0, ep.stderr[-2000:]
    bare = json.loads((plain / "model_embeddings.json").read_text())
    assert list(bare) == TINY and np.allclose(bare["tiny-gpt2"], data["embeddings"]["tiny-gpt2"], atol=1e-6)

    nb = run_xsae("--json", "sane", "neighbors", "tiny-gpt2", "--embeddings", str(out / "model_embeddings.json"))
    assert nb.returncode == 0, nb.stderr[-2000:]
    near = json.loads(nb.stdout)["neighbors"]
    assert sorted(r["name"] for r in near) == sorted(TINY[1:])
    dists = [r["cosine_distance"] for r in near]
    assert dists == sorted(dists) and all(0 <= d <= 2 for d in dists)
    human = run_xsae("sane", "neighbors", "tiny-gpt2", "--embeddings", str(out / "model_embeddings.json"), "--top", "2")
    assert human.returncode == 0 and "cosine distance" in human.stdout and "tiny-gpt2" in human.stdout

    # Calibration on known descendants: a copy of the checkpoint with fitted gains; the original stays.
    lineage = {str(_noisy_copy("tiny-gpt2", tmp_path / "gpt2-noisy", seed=1)): "tiny-gpt2", str(_noisy_copy("tiny-qwen2", tmp_path / "qwen2-noisy", seed=2)): "tiny-qwen2"}
    (tmp_path / "lineage.json").write_text(json.dumps(lineage))
    ca = run_xsae("--json", "sane", "calibrate", "--checkpoint", str(run / "checkpoint_epoch_3"), "--lineage", str(tmp_path / "lineage.json"), env=ONE_THREAD)
    assert ca.returncode == 0, ca.stderr[-2000:]
    cal = json.loads(ca.stdout)
    calibrated = run / "checkpoint_epoch_3_calibrated"
    assert cal["checkpoint"] == str(calibrated) and cal["n_models"] == 4 and cal["n_bases"] == 2 and "gram" in cal["kind_gains"]
    assert json.loads((calibrated / "config.json").read_text())["kind_gains"] == cal["kind_gains"]
    assert not load_safetensors(run / "checkpoint_epoch_3" / "model.safetensors")["kind_gain"].any()  # the original keeps gains of 1
    ec = run_xsae("--json", "sane", "embed", "--checkpoint", str(calibrated), "--models", ",".join(TINY), "--output-dir", str(tmp_path / "oc"), env=ONE_THREAD)
    assert ec.returncode == 0, ec.stderr[-2000:]
    cdata = json.loads((tmp_path / "oc" / "model_embeddings.json").read_text())
    assert not np.allclose(cdata["embeddings"]["tiny-gpt2"], data["embeddings"]["tiny-gpt2"])
    assert_user_error(run_xsae("sane", "calibrate", "--checkpoint", str(run / "checkpoint_epoch_3"), "--lineage", str(tmp_path / "lineage.json")), "already exists", "--force")
    (tmp_path / "bad.json").write_text(json.dumps(["tiny-gpt2"]))
    assert_user_error(run_xsae("sane", "calibrate", "--checkpoint", str(run / "checkpoint_epoch_3"), "--lineage", str(tmp_path / "bad.json"), "--out", str(tmp_path / "c2")), "not a lineage map")
    one_base = tmp_path / "one_base.json"
    one_base.write_text(json.dumps({next(iter(lineage)): "tiny-gpt2"}))
    assert_user_error(run_xsae("sane", "calibrate", "--checkpoint", str(run / "checkpoint_epoch_3"), "--lineage", str(one_base), "--out", str(tmp_path / "c3")), "two bases")

    # A checkpoint trained on another view: `sane embed` takes the view from the checkpoint.
    wrun = tmp_path / "runs" / "sane-weights"
    tw = run_xsae("--json", "sane", "train", "--view", "weights", "--models", "tiny-gpt2,tiny-gemma", "--epochs", "1", *SMALL, "--out", str(wrun), env=ONE_THREAD)
    assert tw.returncode == 0, tw.stderr[-2000:]
    ew = run_xsae("--json", "sane", "embed", "--checkpoint", str(wrun / "checkpoint_epoch_1"), "--models", "tiny-gpt2,tiny-gemma", "--output-dir", str(tmp_path / "ow"), env=ONE_THREAD)
    assert ew.returncode == 0, ew.stderr[-2000:]
    wdata = json.loads((tmp_path / "ow" / "model_embeddings.json").read_text())
    assert wdata["config"]["scheme"].startswith("weights-v1-") and wdata["models"]["tiny-gpt2"]["n_chunks"] > 3000

    # Bad input: one line, exit 2, both values named.
    assert_user_error(run_xsae("sane", "embed", "--checkpoint", str(run / "checkpoint_epoch_3"), "--models", "tiny-gpt2", "--output-dir", str(out)), "already exists", "--force")
    # The checkpoint keeps its coordinate scheme as data: edited [sane] layer keywords do not make it
    # unreadable (its own scheme is used, with a note), and a checkpoint written before schemes were
    # stored (scheme id only) is read through its id. Both embed exactly as before.
    ck3 = run / "checkpoint_epoch_3"
    rec = json.loads((ck3 / "config.json").read_text())["coord_scheme"]
    assert (
        rec["id"] == data["config"]["scheme"] and rec["view"] == "circuits" and rec["view_revision"] == get_view("circuits").revision and rec["chunk_size"] == 64 and "layers" in rec["layer_keywords"]
    )
    kw = run_xsae("--json", "sane", "embed", "--checkpoint", str(ck3), "--models", "tiny-gpt2", "--output-dir", str(tmp_path / "o2"), env={**ONE_THREAD, "XSAE_SANE_LAYER_KEYWORDS": "layers,h"})
    assert kw.returncode == 0, kw.stderr[-2000:]
    assert "layer keywords" in kw.stderr and "those are used" in kw.stderr
    assert np.allclose(json.loads((tmp_path / "o2" / "model_embeddings.json").read_text())["embeddings"]["tiny-gpt2"], data["embeddings"]["tiny-gpt2"], atol=1e-6)
    import shutil

    old = tmp_path / "old-checkpoint"
    shutil.copytree(ck3, old)
    meta = json.loads((old / "config.json").read_text())
    del meta["coord_scheme"]
    (old / "config.json").write_text(json.dumps(meta))
    eo = run_xsae("--json", "sane", "embed", "--checkpoint", str(old), "--models", "tiny-gpt2", "--output-dir", str(tmp_path / "o3"), env=ONE_THREAD)
    assert eo.returncode == 0, eo.stderr[-2000:]
    assert np.allclose(json.loads((tmp_path / "o3" / "model_embeddings.json").read_text())["embeddings"]["tiny-gpt2"], data["embeddings"]["tiny-gpt2"], atol=1e-6)
    assert_user_error(run_xsae("sane", "embed", "--checkpoint", str(ck3), "--models", "tiny-gpt2", "--view", "weights", "--output-dir", str(tmp_path / "o4")), "circuits view", "--view weights")
    assert_user_error(
        run_xsae("sane", "train", "--models", "tiny-gpt2,tiny-gemma", "--chunk-size", "32", "--latent-dim", "8", "--epochs", "4", *SMALL[:-4], "--out", str(run)), "chunk_size 64", "chunk_size 32"
    )
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"embeddings": {"tiny-gpt2": data["embeddings"]["tiny-gpt2"]}}))
    assert_user_error(run_xsae("sane", "neighbors", "tiny-gpt2", "--embeddings", str(one)), "at least two")
    assert_user_error(run_xsae("sane", "neighbors", "nope", "--embeddings", str(out / "model_embeddings.json")), "nope")


def _noisy_copy(name: str, dest: Path, seed: int, scale: float = 0.05) -> Path:
    """A catalogued model's folder copied with Gaussian noise (``scale`` x each tensor's std): a known descendant."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from xsae_cli.zoo.registry import Registry, resolve_entry

    shutil.copytree(Path(resolve_entry(name, Registry()).model_dir), dest)
    f = dest / "model.safetensors"
    g = torch.Generator().manual_seed(seed)
    state = load_file(f)
    save_file({k: v + scale * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1 else v for k, v in state.items()}, f)
    return dest


def test_bad_input_is_one_line(demo_zoo: Path, tmp_path: Path) -> None:
    assert_user_error(run_xsae("sane", "train", "--out", str(tmp_path / "r")), "no models given")
    assert_user_error(run_xsae("sane", "train", "--zoo", "nope", "--out", str(tmp_path / "r")), "unknown --zoo")
    assert_user_error(run_xsae("sane", "tokenize", "no-such-model"), "unknown model 'no-such-model'")
    assert_user_error(run_xsae("sane", "tokenize", "--view", "nope", "tiny-gpt2"), "--view 'nope' is not one of", "circuits")
    assert_user_error(run_xsae("sane", "embed", "--checkpoint", str(tmp_path), "--models", "tiny-gpt2"), "not a SANE checkpoint")
    assert_user_error(run_xsae("sane", "train", "--models", "tiny-gpt2,tiny-gemma", "--latent-dim", "64", "--out", str(tmp_path / "r")), "--latent-dim 64: must be smaller than chunk_size", "(64)")
    assert_user_error(run_xsae("sane", "evaluate", "--seeds", "1", "--out", str(tmp_path / "lin")), "--seeds 1")
    assert_user_error(run_xsae("sane", "evaluate", "--families", "tiny-nope", "--real", "", "--out", str(tmp_path / "lin")), "tiny-nope")


@pytest.mark.slow
def test_demo_zoo_with_real_models(demo_zoo: Path, tmp_path: Path) -> None:
    """The issue's commands on the whole demo catalogue (SmolLM2-135M and MiniLM-L6 included)."""
    run = tmp_path / "runs" / "sane"
    tr = run_xsae(
        "--json",
        "sane",
        "train",
        "--zoo",
        "demo",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--window-size",
        "1024",
        "--save-every",
        "1",
        "--mixed-precision",
        "fp16",
        "--steps-per-epoch",
        "4",
        "--out",
        str(run),
        timeout=1800,
    )
    assert tr.returncode == 0, tr.stderr[-2000:]
    em = run_xsae("--json", "sane", "embed", "--checkpoint", str(run / "checkpoint_epoch_1"), "--models", "minilm-l6,tiny-gpt2,tiny-qwen2", "--output-dir", str(tmp_path / "out"), timeout=1800)
    assert em.returncode == 0, em.stderr[-2000:]
    assert len(json.loads((tmp_path / "out" / "model_embeddings.json").read_text())["embeddings"]["minilm-l6"]) == 512


@pytest.mark.slow
def test_evaluate_lineage(demo_zoo: Path, tmp_path: Path) -> None:
    """`xsae sane evaluate`: lineage zoo, held-out retrieval for SANE and both baselines, function check, JSON."""
    args = ["sane", "evaluate", "--out", str(tmp_path / "lin"), "--families", "tiny-gpt2,tiny-qwen2", "--seeds", "2", "--real", "", "--folds", "1", "--epochs", "1", "--steps-per-epoch", "5"]
    proc = run_xsae("--json", *args, env=ONE_THREAD, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    assert r["n_bases"] == 4 and r["n_variants"] == 4 * len(r["transforms"])
    held = r["folds"][0]["held_out"]
    assert "perm_full" in held and "perm_full" not in r["folds"][0]["trained_on"] and list(r["per_type"]) == [t for t in r["transforms"] if t in held]
    for row in r["per_type"].values():
        assert set(row) >= {"sane", "quantile_baseline", "random_encoder_baseline"}
        assert all(0 <= row[k]["top1"] <= 1 and 0 <= row[k]["auroc"] <= 1 for k in ("sane", "quantile_baseline", "random_encoder_baseline"))
    assert r["per_type"]["perm_full"]["quantile_baseline"]["top1"] == 1.0  # quantiles cannot see a permutation
    assert r["function_check_max_rel_logit_diff"] < 1e-4
    assert r["folds"][0]["reconstruction_held_out"]["mse_tensor_mean_masked"] > 0 and set(r["goals"]) >= {"top1_at_least_0.95", "never_below_quantile_top1"}
    assert r["versions"]["torch"] and r["settings"]["seeds"] == 2
    gains = r["folds"][0]["kind_gains"]  # fitted on the training lineages, and kept by the fold's checkpoint
    assert gains["gram"] > 0 and "hard_strictly_above_both" in r["goals"]
    ckpt = sorted((tmp_path / "lin" / "run-fold1").glob("checkpoint_epoch_*"))[-1]
    assert json.loads((ckpt / "config.json").read_text())["kind_gains"] == gains
    assert abs(float(load_safetensors(ckpt / "model.safetensors")["kind_gain"][KIND_ID["gram"]].exp()) - gains["gram"]) < 1e-2 * gains["gram"]
    assert (tmp_path / "lin" / "lineage.json").exists()
    assert_user_error(run_xsae(*args), "already exists", "--force")
    assert_user_error(run_xsae("sane", "evaluate", "--seeds", "1", "--out", str(tmp_path / "x")), "--seeds 1")
