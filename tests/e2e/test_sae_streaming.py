"""Streaming harvest, end to end: every rank runs tiny-GPT-2 on its own documents, no activation file.

The two-rank runs (gloo on the CPU, under `--launcher accelerate`) take a minute or more each on a
shared 2-core machine, so they are marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_xsae

HOOK = "transformer.h.2"
TRAIN = ["sae", "train", "--model", "tiny-gpt2", "--hook", HOOK, "--k", "8", "--expansion", "4", "--batch-size", "256", "--context-size", "32", "--tokens", "4k", "--checkpoint-every", "5"]


def _cache_dir(tokens: int = 4096) -> Path:
    """Where a cached harvest of TRAIN would be written (it must never appear in streaming mode)."""
    from xsae_cli.core.config import xsae_cache
    from xsae_cli.sae.runs import RunSpec, _harvest_key, _identity
    from xsae_cli.sae.settings import SaeRunSettings

    spec = RunSpec(model="tiny-gpt2", hooks=[HOOK], out=Path("."), settings=SaeRunSettings(context_size=32, tokens=tokens, batch_size=256))
    return xsae_cache() / "activations" / _harvest_key(spec, _identity(spec), tokens, 0)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from xsae_cli.sae.formats import load_sae

    return {k: v.detach() for k, v in load_sae(run / HOOK).state_dict().items()}


def _launch(out: Path, port: int, env: dict[str, str] | None = None) -> object:
    return run_xsae("--launcher", "accelerate", "--num-processes", "2", "--main-process-port", str(port), "--device", "cpu", *TRAIN, "--out", str(out), env=env, timeout=900)


@pytest.mark.slow
def test_two_ranks_stream_disjoint_documents_and_resume_a_kill_exactly(demo_zoo: Path, tmp_path: Path) -> None:
    import os

    assert not _cache_dir().exists()
    single = run_xsae("--device", "cpu", *TRAIN, "--no-cache", "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert one["training"]["harvest_mode"] == "streaming" and len(one["harvest_per_rank"]) == 1
    n_docs = one["harvest_per_rank"][0]["n_documents"]
    assert one["harvest_per_rank"][0]["documents"] == [0, n_docs]

    full = _launch(tmp_path / "full", 29681)
    assert full.returncode == 0, full.stderr[-3000:]
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["training"]["world_size"] == 2 and metrics["training"]["harvest_mode"] == "streaming"
    ranks = metrics["harvest_per_rank"]
    assert [r["rank"] for r in ranks] == [0, 1]
    (a0, b0), (a1, b1) = ranks[0]["documents"], ranks[1]["documents"]
    assert a0 == 0 and b0 == a1 and b1 == n_docs  # disjoint, and together what the single process read
    assert all(r["tokens_kept"] >= 2048 for r in ranks)  # each rank harvested its own half of the budget
    assert not _cache_dir().exists()  # nothing written under XSAE_CACHE/activations

    crash_env = dict(os.environ, XSAE_CRASH_AT_STEP="5")  # SIGKILL right after the step-5 checkpoint
    crashed = _launch(tmp_path / "crash", 29682, env=crash_env)
    assert crashed.returncode != 0 and not (tmp_path / "crash" / "metrics.json").exists()
    metas = [json.loads(p.read_text()) for p in (tmp_path / "crash" / "checkpoints").rglob("*.json")]
    positions = next(m["stream_positions"] for m in metas if "stream_positions" in m)
    assert [p["rank"] for p in positions] == [0, 1] and all(p["rows"] == 5 * 256 for p in positions)
    resumed = _launch(tmp_path / "crash", 29683)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 5" in resumed.stderr
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "crash")
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit-identical to the run that was never killed


@pytest.mark.slow
def test_a_launch_whose_ranks_would_see_no_documents_is_refused_with_the_counts(demo_zoo: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "two.jsonl"
    corpus.write_text('{"text": "one lone training document about cats"}\n{"text": "a held-out one"}\n')
    proc = run_xsae(
        "--launcher",
        "accelerate",
        "--num-processes",
        "2",
        "--main-process-port",
        "29684",
        "--device",
        "cpu",
        "sae",
        "train",
        "--model",
        "tiny-gpt2",
        "--hook",
        HOOK,
        "--corpus",
        str(corpus),
        "--held-out-fraction",
        "0.5",
        "--out",
        str(tmp_path / "r"),
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines == ["error: the corpus has 1 training document(s) for 2 ranks: 1 rank(s) would see no documents. use a larger corpus (at least one training document per rank) or fewer processes"]
    assert not (tmp_path / "r").exists()  # refused before any model load or run folder
