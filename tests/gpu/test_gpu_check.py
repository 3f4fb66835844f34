"""benchmarks/gpu_check.sh cannot rot: its dry run (the GPU run's steps at tiny size on the CPU) runs
in `make test`, and the wheel folder logic it relies on is checked without a package index.

Not marked ``gpu``: these run on every CPU test run (the quick dry run in ~20 s on 2 cores; the full
one, with the end-to-end GPU tests on the CPU, is ``slow``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_wheels


def _dry_run(out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XSAE_")}  # the script sets its own
    env.update(PYTHON=sys.executable, OUT=str(out), WHEELS=str(out / "no-wheels"))
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *flags], capture_output=True, text=True, env=env, timeout=900, check=False)


def _check_outputs(out: Path, proc: subprocess.CompletedProcess[str]) -> ET.Element:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["env.json", "profile.txt", "summary.txt", "tests.log", "tests.xml", "throughput.json", "throughput.log"]
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0
    assert int(suite.get("skipped")) == 0  # on the CPU the dry run runs every GPU test, none skips
    data = json.loads((out / "throughput.json").read_text())
    (res,) = data["results"]
    assert res["shape"] == "dry" and res["device"] == "cpu" and res["roofline"]["tokens_per_s"] > 0
    impls = {(r["impl"], r["optimizer"]) for r in res["rows"]}
    assert {("xsae", "adam"), ("sparsify", "adam"), ("xsae", "signum"), ("saelens", "adam")} <= impls
    assert all(0 < r["fvu"] < 10 and r["roofline_fraction"] > 0 for r in res["rows"])
    (shape,) = data["breakdown"]["shapes"]
    assert [p["batch"] for p in shape["phases"]] == [256, 1024]
    assert all(t["exact"] for t in shape["topk"]) and {t["method"] for t in shape["topk"]} >= {"torch.topk", "grouped G=8"}
    assert "encoder_matmul" in (out / "profile.txt").read_text() and "Self CPU" in (out / "profile.txt").read_text()
    summary = (out / "summary.txt").read_text()
    assert "all steps passed" in summary and "step phases (ms)" in summary
    assert summary.strip() == proc.stdout.strip()[-len(summary.strip()) :]  # printed last, where a reply's tail shows it
    return suite


def test_quick_dry_run_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    suite = _check_outputs(out, _dry_run(out, "--quick"))
    assert int(suite.get("tests")) >= 40  # the in-process GPU tests: kernels, every architecture and path, harvest


@pytest.mark.slow
def test_full_dry_run_includes_the_end_to_end_gpu_tests(tmp_path: Path) -> None:
    out = tmp_path / "out"
    suite = _check_outputs(out, _dry_run(out))
    names = {case.get("name") for case in suite.iter("testcase")}
    assert {"test_sae_train_bf16_model_end_to_end", "test_deepspeed_zero2_on_one_device", "test_restore_train_and_sae_on_the_device"} <= names


def test_bad_option_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "--dryrun"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "unknown option '--dryrun'" in proc.stderr


# ----------------------------------------------------------------------------------------------
# The wheel folder, without an index
# ----------------------------------------------------------------------------------------------


def _fake_wheel(dest: Path, spec: str, size: int) -> None:
    name, version = spec.split("==")
    with zipfile.ZipFile(dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr("payload.bin", os.urandom(size))  # random: does not compress


def test_fetch_drops_whole_groups_from_the_last_until_under_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = {"core": 10_000, "deepspeed": 300_000, "sparsify": 200_000, "saelens": 900_000}
    group_of = {gpu_wheels._name(s): g for g, specs in gpu_wheels.GROUPS.items() for s in specs}

    def fake(spec: str, dest: Path) -> None:
        group = group_of[gpu_wheels._name(spec)]
        _fake_wheel(dest, spec, sizes[group] // len(gpu_wheels.GROUPS[group]))

    monkeypatch.setattr(gpu_wheels, "_download", fake)
    monkeypatch.setattr(gpu_wheels, "_build", fake)
    manifest = gpu_wheels.fetch(tmp_path / "w", list(gpu_wheels.GROUPS), limit_mb=0.6)
    assert list(manifest["groups"]) == ["core", "deepspeed", "sparsify"]  # saelens would pass 0.6 MB
    assert manifest["left_out"] == {"saelens": "over the 0.6 MB limit"} and manifest["total_mb"] <= 0.6
    on_disk = sorted(p.name for p in (tmp_path / "w").glob("*.whl"))
    assert on_disk == sorted(n for names in manifest["groups"].values() for n in names)
    assert json.loads((tmp_path / "w" / "MANIFEST.json").read_text()) == manifest


def test_fetch_leaves_out_a_group_whose_download_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(spec: str, dest: Path) -> None:
        if spec.startswith("wandb"):
            raise subprocess.CalledProcessError(1, ["pip", "download", spec])
        _fake_wheel(dest, spec, 100)

    monkeypatch.setattr(gpu_wheels, "_download", fake)
    monkeypatch.setattr(gpu_wheels, "_build", fake)
    manifest = gpu_wheels.fetch(tmp_path / "w", list(gpu_wheels.GROUPS), limit_mb=50)
    assert "saelens" not in manifest["groups"] and "wandb" in manifest["left_out"]["saelens"]
    assert not list((tmp_path / "w").glob("sae_lens-*"))  # nothing of a half-fetched group stays


def test_install_never_shadows_what_the_python_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_wheel(tmp_path, "torch==0.0.1", 10)  # this Python has torch: left alone
    _fake_wheel(tmp_path, "surely-not-installed-pkg==1.0", 10)
    calls = []
    monkeypatch.setattr(gpu_wheels.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    report = gpu_wheels.install(tmp_path, tmp_path / "site")
    assert report["already_there"] == ["torch"] and report["installed"] == ["surely-not-installed-pkg"]
    (cmd,) = calls
    assert "--no-index" in cmd and "--no-deps" in cmd and cmd[-1].endswith("surely_not_installed_pkg-1.0-py3-none-any.whl")
    assert not any("torch-0.0.1" in c for c in cmd)
