"""GPU tests: xsae's CUDA path against the CPU reference, each test marked ``gpu``.

``make test`` deselects them (pyproject: ``-m 'not slow and not gpu'``); ``pytest -m gpu tests/gpu``
runs them on CUDA, and without CUDA each one skips, saying why. ``benchmarks/gpu_check.sh`` runs them
on a GPU; its ``--dry-run`` runs them on the CPU (``XSAE_GPU_TESTS_DEVICE=cpu``: the device then
plays the GPU's part against itself), so that the code of a check run once in a scarce GPU slot is
exercised on every CPU test run of the dry run.
"""

from __future__ import annotations

import os

import pytest
import torch

# Fixtures of the CPU tests, shared: the sparse-backend switch and the harvest's tiny tokenizer and contexts.
from tests.unit.data.test_activations import contexts, small, tok  # noqa: F401
from tests.unit.sae.test_models import backend  # noqa: F401

#: Set to ``cpu`` (the dry run) or ``cuda:N`` to run the GPU tests on that device.
DEVICE_ENV = "XSAE_GPU_TESTS_DEVICE"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the GPU tests run on: CUDA, or what ``XSAE_GPU_TESTS_DEVICE`` names."""
    forced = os.environ.get(DEVICE_ENV, "").strip()
    if forced:
        dev = torch.device(forced)
        if dev.type == "cuda" and not torch.cuda.is_available():
            pytest.fail(f"{DEVICE_ENV}={forced} but torch.cuda.is_available() is False (torch {torch.__version__})")
        return dev
    if not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA device (torch {torch.__version__} sees none); `benchmarks/gpu_check.sh --dry-run` runs these tests on the CPU")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"
