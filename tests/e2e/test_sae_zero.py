"""DeepSpeed ZeRO for SAE training: two CPU ranks (gloo) under DeepSpeed's launcher and torchrun,
exact resume after a kill, checkpoints that do not depend on the world size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_user_error, run_xsae

pytest.importorskip("deepspeed")

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "deepspeed"
HOOK = "transformer.h.2"
TRAIN = ["sae", "train", "--model", "tiny-gpt2", "--hook", HOOK, "--k", "8", "--expansion", "4", "--batch-size", "512",
         "--context-size", "32", "--tokens", "12k", "--optimizer", "adam", "--checkpoint-every", "5"]


def _zero(stage: int, port: int, out: Path, launcher: str = "deepspeed", **env: str):
    args = ["--launcher", launcher, "--num-processes", "2", "--main-process-port", str(port), "--device", "cpu", "--seed", "0",
            "--deepspeed-config", str(RECIPES / f"zero{stage}.json"), *TRAIN, "--out", str(out)]
    return run_xsae(*args, env=env, timeout=900)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from xsae_cli.sae.formats import load_sae

    return {k: v.detach() for k, v in load_sae(run / HOOK).state_dict().items()}


def test_zero3_two_ranks_resumes_a_kill_exactly(demo_zoo: Path, tmp_path: Path) -> None:
    full = _zero(3, 29541, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())["training"]
    assert metrics["world_size"] == 2 and metrics["zero_stage"] == 3 and metrics["tokens"] >= 12_000

    crashed = _zero(3, 29542, tmp_path / "crash", XSAE_CRASH_AT_STEP="5")  # SIGKILL right after the step-5 checkpoint
    assert crashed.returncode != 0 and not (tmp_path / "crash" / "metrics.json").exists()
    resumed = _zero(3, 29543, tmp_path / "crash")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resuming from step 5") == 1  # said once, by rank 0
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "crash")
    for name in a:
        assert torch.equal(a[name], b[name]), name  # same weights as the run that was never killed
    # ZeRO keeps decoder rows unit norm through the forward; the saved SAE holds the unit rows.
    assert torch.allclose(a["W_dec"].norm(dim=1), torch.ones(a["W_dec"].shape[0]), atol=1e-5)


def test_zero2_checkpoint_resumes_without_deepspeed(demo_zoo: Path, tmp_path: Path) -> None:
    """Checkpoints hold full tensors in torch Adam's layout, whatever the world size was."""
    out = tmp_path / "z2"
    proc = _zero(2, 29544, out, launcher="torchrun")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from xsae_cli.core.io import Checkpoints
    from xsae_cli.sae.train import SaeTrainer, TrainSettings

    step, state, meta = Checkpoints(out).latest()
    assert meta["world_size"] == 2 and meta["decoder_weight_norm"] == {HOOK: True}
    adam = state[HOOK]["optimizer"]["state"]
    assert adam[2]["exp_avg"].shape == (256, 64) and float(adam[2]["step"]) == step  # W_dec's moments, not a partition
    settings = TrainSettings(**{**json.loads((out / "run.json").read_text())["settings"], "deepspeed_config": None})
    trainer = SaeTrainer(settings, {HOOK: 64}, out)
    assert trainer.try_resume() and trainer.step == step
    resumed = trainer.finalize()[HOOK].W_dec.detach()
    assert torch.allclose(resumed, _weights(out)["W_dec"], atol=1e-6)
    assert torch.equal(trainer.states[HOOK].optimizer.state_dict()["state"][2]["exp_avg"], adam[2]["exp_avg"])


def test_zero_refuses_signum_and_bad_configs_before_any_work(demo_zoo: Path, tmp_path: Path) -> None:
    base = ["--device", "cpu", "--deepspeed-config"]
    train = [a for a in TRAIN if a not in ("--optimizer", "adam")]
    proc = run_xsae(*base, str(RECIPES / "zero2.json"), *train, "--out", str(tmp_path / "a"))
    assert_user_error(proc, "DeepSpeed ZeRO trains with Adam", "--optimizer adam")
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2},\n "fp16": {"enabled": true}}')
    assert_user_error(run_xsae(*base, str(bad), *TRAIN, "--out", str(tmp_path / "b")), "enables fp16", str(bad))
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    assert_user_error(run_xsae(*base, str(bad), *TRAIN, "--out", str(tmp_path / "c")), "not valid JSON", "line 1")
    bad.write_text('{"zero_optimization": {"stage": 0}}')
    assert_user_error(run_xsae(*base, str(bad), *TRAIN, "--out", str(tmp_path / "d")), "stage=0", "use stage 1, 2 or 3")
    assert_user_error(run_xsae(*base, str(tmp_path / "missing.json"), *TRAIN, "--out", str(tmp_path / "e")), "does not exist")
    assert not any((tmp_path / d).exists() for d in "abcde")  # nothing harvested, no run folder
