"""Scores in the target space and the target SAE's latent space, on cases with known answers."""

from __future__ import annotations

import torch

from xsae_cli.align.metrics import (
    active_f1,
    code_scores,
    correlation_matrix,
    hungarian_matches,
    mean_code_scores,
    regression_scores,
    topk_codes,
)


def _codes(n: int, d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return topk_codes(torch.rand(n, d, generator=g) * torch.linspace(1.0, 1.3, d), k)  # every latent fires, some more often


def test_regression_scores_of_perfect_and_mean_predictions() -> None:
    y = torch.randn(500, 8, generator=torch.Generator().manual_seed(0)) + 3.0
    mean = y.double().mean(0)
    perfect = regression_scores(y, y, mean)
    assert perfect["r2"] == 1.0 and perfect["fvu"] == 0.0 and abs(perfect["cosine"] - 1.0) < 1e-6
    m = regression_scores(mean.float()[None].expand(500, -1), y, mean)
    assert abs(m["r2"]) < 1e-9 and m["cosine"] == 0.0  # centred: the mean predictor gets no cosine credit


def test_latent_scores_identity_permutation_and_mean() -> None:
    true = _codes(2000, 64, 6, seed=1)
    same = code_scores(true, true, k=6)
    assert same["latent_r"] > 0.999 and same["f1"] == 1.0 and same["matched"] == same["alive"] == 64
    assert same["median_rank"] == 1.0 and abs(same["freq_r"] - 1.0) < 1e-6 and same["l0"] == same["l0_true"] == 6
    # Latent i of one SAE and latent i of another mean nothing: a permuted copy scores ~0 per index,
    # yet the Hungarian assignment finds every latent.
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    shuffled = code_scores(true[:, perm], true, k=6)
    assert shuffled["latent_r"] < 0.2 and shuffled["matched"] == 64
    # Unrelated codes: nothing above the threshold.
    other = code_scores(_codes(2000, 64, 6, seed=3), true, k=6)
    assert other["matched"] == 0
    # The mean predictor: correlation 0 by construction, F1 not (always guessing the frequent latents).
    mean = mean_code_scores(true[:1000], true[1000:], 6, 0.5)
    assert mean["latent_r"] == 0.0 and 0.0 < mean["f1"] < 0.5


def test_hungarian_rank_and_threshold() -> None:
    corr = torch.tensor([[0.9, 0.1, 0.0], [0.95, 0.6, 0.0], [0.0, 0.0, 0.3]])
    m = hungarian_matches(corr, 0.5)
    # One-to-one: row 1 takes column 1 (0.6) so row 0 keeps column 0; column 2 (0.3) is below threshold.
    assert m["matched"] == 2 and m["median_rank"] == 1.5  # column 0's partner (0.9) ranks 2nd behind 0.95
    assert m["top1_fraction"] == 0.5


def test_correlation_matrix_matches_numpy_and_f1() -> None:
    g = torch.Generator().manual_seed(4)
    p, t = torch.randn(300, 5, generator=g), _codes(300, 40, 4, seed=5)
    import numpy as np

    ref = np.corrcoef(p.numpy().T, t.numpy().T)[:5, 5:]
    ref = np.nan_to_num(ref)
    assert np.allclose(correlation_matrix(p, t).numpy(), ref, atol=1e-4)
    a = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    assert active_f1(a, b) == 0.5  # one shared of 2 + 2; the empty row is skipped
