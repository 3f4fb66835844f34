"""`xsae sane tokenize` on families no rule in the code names: the circuits view reads them through
the derived anatomy (no fallback line); a model whose anatomy cannot be derived says why in one
line and which view it falls back to, and ``--strict`` makes that exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.conftest import assert_user_error, run_xsae

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _save(folder: Path, seed: int, model_type: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM, GPTJConfig

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(GPTJConfig(vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, bos_token_id=0, eos_token_id=0))
    m.save_pretrained(folder, safe_serialization=True)
    if model_type is not None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["model_type"] = model_type
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_unnamed_family_gets_the_circuits_view_and_strict_refuses_what_cannot_be_derived(tmp_path: Path) -> None:
    good = _save(tmp_path / "gj", seed=21)
    proc = run_xsae("--json", "sane", "tokenize", str(good), "--view", "circuits", "--force", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert "no circuits view" not in proc.stderr and "no canonical form" not in proc.stderr, proc.stderr
    assert json.loads(proc.stdout)[0]["view"] == "circuits"

    bad = _save(tmp_path / "bad", seed=22, model_type="not-a-family")
    fell = run_xsae("--json", "sane", "tokenize", str(bad), "--view", "circuits", "--force", env=ONE_THREAD)
    assert fell.returncode == 0, fell.stderr
    lines = [ln for ln in fell.stderr.splitlines() if "no circuits view" in ln]
    assert len(lines) == 1 and "not-a-family" in lines[0] and "canonical" in lines[0], fell.stderr
    assert json.loads(fell.stdout)[0]["view"] == "weights"
    assert_user_error(run_xsae("--json", "sane", "tokenize", str(bad), "--view", "circuits", "--strict", "--force", env=ONE_THREAD), "no circuits view", "not-a-family", "--strict")
