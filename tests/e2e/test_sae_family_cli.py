"""The gated and Matryoshka BatchTopK SAEs through the real ``xsae sae train`` (issue 20)."""

import json
from pathlib import Path

import pytest

from tests.conftest import assert_user_error, run_xsae

TINY = ["sae", "train", "--model", "tiny-gpt2", "--hook", "transformer.h.2", "--expansion", "4", "--batch-size", "512", "--context-size", "64"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "saelens", "arch"),
    [
        (["--arch", "gated", "--normalize-activations", "expected_average_only_in"], "gated", "gated"),
        (["--arch", "matryoshka_batchtopk", "--k", "8", "--matryoshka-widths", "32,128"], "jumprelu", "matryoshka_batchtopk"),
    ],
)
def test_train_and_evaluate(demo_zoo: Path, tmp_path: Path, flags: list[str], saelens: str, arch: str) -> None:
    out = tmp_path / "run"
    proc = run_xsae("--json", "--seed", "0", *TINY, *flags, "--tokens", "8k", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    hook = json.loads(proc.stdout)["hooks"]["transformer.h.2"]
    assert 0 < hook["fvu"] < 1
    cfg = json.loads((out / "transformer.h.2" / "cfg.json").read_text())
    assert cfg["architecture"] == saelens and cfg["xsae"]["arch"] == arch and cfg["d_sae"] == 256
    if arch == "matryoshka_batchtopk":
        assert cfg["xsae"]["config"]["options"] == {"matryoshka_widths": [32, 128]}
        log = (out / "train_log.jsonl").read_text()
        assert '"mse_32"' in log and '"mse_128"' in log  # each prefix's error is logged


@pytest.mark.slow  # loads the model: the widths meet d_sae = expansion x d_in only then
def test_matryoshka_widths_beyond_the_expansion_are_refused_before_the_harvest(demo_zoo: Path, tmp_path: Path) -> None:
    proc = run_xsae(*TINY, "--arch", "matryoshka_batchtopk", "--matryoshka-widths", "32,512", "--tokens", "8k", "--out", str(tmp_path / "x"))
    assert_user_error(proc, "matryoshka_widths 32,512 exceed d_sae=256")
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_bad_matryoshka_widths_are_refused_before_any_model_loads(xsae_env: dict, tmp_path: Path) -> None:
    assert_user_error(run_xsae(*TINY, "--arch", "matryoshka_batchtopk", "--matryoshka-widths", "64,512", "--d-sae", "256", "--out", str(tmp_path / "w")), "exceed d_sae=256")
    # not increasing, and widths for another architecture: tests/unit/sae/test_family.py (the same settings check)
