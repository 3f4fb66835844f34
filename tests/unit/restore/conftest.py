"""Fixtures for the restore tests: the synthetic ATF letters and small random models.

Torch runs single-threaded here: the models are tiny, and on a shared 2-core machine OpenMP's
thread hand-offs cost more than the arithmetic (small forwards ran ~30x slower with 2 threads).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"

torch.set_num_threads(1)


@pytest.fixture()
def letters_atf() -> Path:
    return FIXTURES / "letters.atf"


@pytest.fixture()
def bad_atf() -> Path:
    return FIXTURES / "bad.atf"


def small_config(vocab_size: int = 40, max_position: int = 32, attn_bias: bool = True, n_layers: int = 3):
    from xsae_cli.restore.model import RestorationConfig

    return RestorationConfig(vocab_size=vocab_size, max_position=max_position, d_model=32, n_heads=4, d_ff=48, n_layers=n_layers, dropout=0.0, attn_bias=attn_bias)


def small_model(seed: int = 0, **kwargs):
    from xsae_cli.restore.model import RestorationModel

    torch.manual_seed(seed)
    model = RestorationModel(small_config(**kwargs)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a missed weight shows up
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model
