"""Linear mappers and similarity indices on synthetic data whose answer is known."""

from __future__ import annotations

import torch

from xsae_cli.align.linear import (
    Svcca,
    cross,
    linear_cka,
    matmul,
    r2_score,
)
from xsae_cli.align.mappers.procrustes import Procrustes
from xsae_cli.align.mappers.ridge import Ridge


def _rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


def _data(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.3, d)  # anisotropic, like real activations
    return torch.randn(n, d, generator=g) * scales + 5.0


def test_procrustes_recovers_a_rotation_and_the_shuffled_null_is_zero() -> None:
    x = _data(3000, 24)
    rot = _rotation(24, 1)
    noise = 0.05 * torch.randn(3000, 24, generator=torch.Generator().manual_seed(2))
    y = 7.0 * (x @ rot) + 1.0 + noise  # B = scaled rotation of A + offset + noise
    tr, te = slice(0, 2000), slice(2000, 3000)
    fit = Procrustes().fit(x[tr], y[tr])
    assert torch.allclose(fit.weight.float() / fit.info["scale"], rot, atol=2e-3)
    assert abs(fit.info["scale"] - 7.0) < 0.01
    assert r2_score(fit.predict(x[te]), y[te], y[tr].double().mean(0)) > 0.999
    perm = torch.randperm(2000, generator=torch.Generator().manual_seed(3))
    null = Procrustes().fit(x[tr], y[tr][perm])
    assert r2_score(null.predict(x[te]), y[te], y[tr].double().mean(0)) < 0.02


def test_procrustes_between_different_widths_is_semi_orthogonal() -> None:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2000, 16, generator=g)
    q = _rotation(32, 4)[:16]  # 16 -> 32: orthonormal rows, an isometric embedding
    y = 2.0 * (x @ q) + 3.0
    fit = Procrustes().fit(x[:1500], y[:1500])
    r = fit.weight / fit.info["scale"]
    assert fit.info["semi_orthogonal"] and r.shape == (16, 32)
    assert torch.allclose(r @ r.t(), torch.eye(16, dtype=r.dtype), atol=1e-6)
    assert abs(fit.info["scale"] - 2.0) < 1e-3
    assert r2_score(fit.predict(x[1500:]), y[1500:], y[:1500].double().mean(0)) > 0.9999
    # 32 -> 16 (isotropic source): a rotation then dropping coordinates, R^T R = I.
    back = Procrustes().fit(y[:1500], x[:1500])
    rb = back.weight / back.info["scale"]
    assert torch.allclose(rb.t() @ rb, torch.eye(16, dtype=rb.dtype), atol=1e-6)
    assert r2_score(back.predict(y[1500:]), x[1500:], x[:1500].double().mean(0)) > 0.999


def test_ridge_picks_its_penalty_on_val_and_fits_a_linear_map() -> None:
    g = torch.Generator().manual_seed(5)
    x = _data(1200, 40, seed=6)
    w = torch.randn(40, 12, generator=g)
    y = x @ w + 0.5 * torch.randn(1200, 12, generator=g)
    fit = Ridge().fit(x[:800], y[:800], x[800:1000], y[800:1000])
    assert fit.info["val_r2"] == max(score for _, score in fit.info["val_curve"])
    assert r2_score(fit.predict(x[1000:]), y[1000:], y[:800].double().mean(0)) > 0.98
    # With few rows and pure noise targets, val picks a strong penalty and test R^2 stays near 0.
    noise = torch.randn(1200, 12, generator=g)
    small = Ridge().fit(x[:60], noise[:60], x[800:1000], noise[800:1000])
    assert small.info["alpha_relative"] >= 1.0
    assert r2_score(small.predict(x[1000:]), noise[1000:], noise[:60].double().mean(0)) > -0.1


def test_sparse_products_match_dense_ones() -> None:
    g = torch.Generator().manual_seed(7)
    codes = torch.relu(torch.randn(500, 300, generator=g) - 2.0)  # ~2% nonzero, like SAE codes
    dense = torch.randn(500, 20, generator=g)
    w = torch.randn(300, 20, generator=g)
    assert torch.allclose(matmul(codes, w), codes @ w, atol=1e-4)
    assert torch.allclose(cross(codes, dense), codes.double().t() @ dense.double(), atol=1e-8)
    assert torch.allclose(cross(dense, codes), dense.double().t() @ codes.double(), atol=1e-8)


def test_cka_and_svcca_with_their_known_values() -> None:
    x = _data(4000, 16, seed=8)
    y = x @ _rotation(16, 9) * 3.0
    other = _data(4000, 16, seed=10)
    assert abs(linear_cka(x, y) - 1.0) < 1e-6  # invariant to rotation and scale
    assert linear_cka(x, other) < 0.02
    sv = Svcca(keep=0.999)
    same = sv.score(x[:3000], y[:3000], x[3000:], y[3000:])
    assert same["svcca"] > 0.99
    # Few rows per dimension: the in-sample index is inflated, the held-out one is not.
    small = Svcca(keep=0.999).score(x[:40], other[:40], x[3000:], other[3000:])
    assert small["svcca_in_sample"] > 0.5 and abs(small["svcca"]) < 0.15
    assert small["rows_per_dim"] < 3
