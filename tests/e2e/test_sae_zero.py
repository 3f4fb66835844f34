"""DeepSpeed ZeRO configs that cannot train are refused before any work.

Runs on two CPU ranks (exact resume after a kill, world-size-free checkpoints) are in test_recipes.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_user_error, run_xsae

pytest.importorskip("deepspeed")

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "deepspeed"
HOOK = "transformer.h.2"
TRAIN = [
    "sae",
    "train",
    "--model",
    "tiny-gpt2",
    "--hook",
    HOOK,
    "--k",
    "8",
    "--expansion",
    "4",
    "--batch-size",
    "512",
    "--context-size",
    "32",
    "--tokens",
    "12k",
    "--optimizer",
    "adam",
    "--checkpoint-every",
    "5",
]


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
