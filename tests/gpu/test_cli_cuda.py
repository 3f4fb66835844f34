"""The real `xsae` command on the GPU, end to end on tiny random-initialised models (no zoo, no downloads).

`sae train` with a bf16 model, `sae train` under DeepSpeed ZeRO-2 on one GPU, `restore train` + `restore
sae`, `sane train` + `sane embed` (the embedding on the GPU against the CPU's, same checkpoint). Marked
``slow`` as well as ``gpu``: on a CPU (the dry run) each one costs tens of seconds; on a GPU, seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_xsae
from tests.e2e.test_restore_cli import ATF
from tests.e2e.test_sane_cli import SMALL as SANE_SMALL

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
HOOK = "transformer.h.2"
SAE = ["--hook", HOOK, "--arch", "topk", "--k", "8", "--expansion", "4", "--batch-size", "512", "--context-size", "64"]


@pytest.fixture(scope="module")
def tiny_gpt2() -> Path:
    """The demo zoo's tiny GPT-2 (random init, pydoc-trained BPE tokenizer), built under XSAE_CACHE."""
    from xsae_cli.zoo.demo import build_tiny

    return build_tiny("tiny-gpt2")


def _ok(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _ran_on(memory: dict, device: torch.device) -> None:
    """The run's memory report shows the device was used (CUDA: a peak of allocated bytes)."""
    if device.type == "cuda":
        assert memory["cuda_peak_bytes"] > 0, memory


def test_sae_train_bf16_model_end_to_end(tiny_gpt2: Path, tmp_path: Path, device: torch.device) -> None:
    out = tmp_path / "run"
    metrics = _ok(run_xsae("--json", "--seed", "0", "--device", str(device), "--dtype", "bfloat16", "sae", "train", "--model", str(tiny_gpt2), *SAE, "--tokens", "8k", "--out", str(out)))
    hook = metrics["hooks"][HOOK]
    assert 0 < hook["fvu"] < 1 and hook["l0"] <= 8 + 1e-6
    assert hook["downstream"]["ce_clean"] < hook["downstream"]["ce_zero"]
    assert metrics["training"]["tokens"] >= 8000
    _ran_on(metrics["training"]["memory"], device)
    run = json.loads((out / "run.json").read_text())
    assert run["spec"]["model_dtype"] == "bfloat16" and run["spec"]["device"] == str(device)
    again = _ok(run_xsae("--json", "--device", str(device), "--dtype", "bfloat16", "sae", "eval", str(out)))
    assert abs(again["hooks"][HOOK]["fvu"] - hook["fvu"]) < 1e-3


def test_deepspeed_zero2_on_one_device(tiny_gpt2: Path, tmp_path: Path, device: torch.device) -> None:
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (benchmarks/gpu_check.sh brings it as a wheel)")
    out = tmp_path / "zero2"
    zero = ROOT / "recipes" / "deepspeed" / "zero2.json"
    args = [
        "--json",
        "--seed",
        "0",
        "--device",
        str(device),
        "--deepspeed-config",
        str(zero),
        "sae",
        "train",
        "--model",
        str(tiny_gpt2),
        *SAE,
        "--tokens",
        "12k",
        "--optimizer",
        "adam",
        "--checkpoint-every",
        "5",
        "--out",
        str(out),
    ]
    metrics = _ok(run_xsae(*args))
    t = metrics["training"]
    assert t["zero_stage"] == 2 and t["world_size"] == 1 and t["steps"] >= 20
    assert 0 < metrics["hooks"][HOOK]["fvu"] < 1
    _ran_on(t["memory"], device)
    from xsae_cli.sae.formats import load_sae

    sae = load_sae(out / HOOK)  # saved with the weight norm folded in: unit decoder rows
    assert torch.allclose(sae.W_dec.detach().norm(dim=1), torch.ones(sae.cfg.d_sae), atol=1e-5)


def test_restore_train_and_sae_on_the_device(tmp_path: Path, device: torch.device) -> None:
    run = tmp_path / "restore"
    dev = ["--device", str(device)]
    summary = _ok(
        run_xsae(
            "--json", "--seed", "0", *dev, "restore", "train", "--corpus", str(ATF), "--preset", "tiny", "--steps", "30", "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3", "--out", str(run)
        )
    )
    assert summary["steps"] == 30 and summary["last"]["loss"] < 3.5
    m = _ok(
        run_xsae(
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
            *dev,
            "--k",
            "8",
            "--expansion",
            "4",
            "--batch-size",
            "256",
            "--out",
            str(tmp_path / "sae"),
        )
    )
    assert m["hook"] == "blocks.2.hook_resid_post" and 0 < m["reconstruction"]["fvu"] < 1 and m["reconstruction"]["l0"] <= 8 + 1e-6
    _ran_on(m["memory"], device)
    features = json.loads((tmp_path / "sae" / "blocks.2.hook_resid_post" / "features.json").read_text())
    assert features["latents"][0]["top_chars"]


def test_sane_train_and_embed_on_the_device_match_the_cpu(tiny_gpt2: Path, tmp_path: Path, device: torch.device) -> None:
    """Tokenise, train (fp16 mixed precision on CUDA), embed on the device; the CPU embeds the same checkpoint alike."""
    from xsae_cli.zoo.demo import build_tiny

    models = ",".join(str(p) for p in (tiny_gpt2, build_tiny("tiny-qwen2")))
    run = tmp_path / "sane"
    tr = _ok(run_xsae("--json", "--seed", "0", "--device", str(device), "sane", "train", "--models", models, "--epochs", "1", *SANE_SMALL, "--out", str(run)))
    assert tr["epochs_done"] == 1 and np.isfinite(tr["history"][0]["loss"])
    ck = str(run / "checkpoint_epoch_1")
    emb = {}
    for name, where in (("device", str(device)), ("cpu", "cpu")):
        _ok(run_xsae("--json", "--device", where, "sane", "embed", "--checkpoint", ck, "--models", models, "--max-windows", "4", "--out", str(tmp_path / name)))
        emb[name] = np.load(tmp_path / name / "model_embeddings.npz")["embeddings"]
    ours, ref = emb["device"], emb["cpu"]
    assert ours.shape == ref.shape == (2, 512) and np.isfinite(ours).all()
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-3
