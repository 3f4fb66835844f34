"""Linear maps and similarity indices between two sets of paired rows: the products, ``LinearMap``, CKA, SVCCA.

The linear mappers themselves (Procrustes, ridge) are in :mod:`align.mappers`. Every fit sees training rows only and everything is centred on the *training* means, which
the test rows are scored against as well, so a mapper gets no credit for knowing the test mean.
Fits run in float64 on the CPU; SAE codes are sparse (k of d_sae latents per token), so products
with them go through torch's sparse kernels, which turns the [N, d_sae] x [d_sae, d] products of a
40k-token fit from tens of GFLOP into a few.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from xsae_cli.core.errors import XsaeError

SPARSE_DENSITY = 0.1  # below this fraction of nonzeros a matrix is multiplied as a sparse one


# --------------------------------------------------------------------------------------- products


def _is_sparse(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.numel() > 0 and int(torch.count_nonzero(x)) < SPARSE_DENSITY * x.numel()


def _csr(x: torch.Tensor) -> Any:
    from scipy import sparse

    return sparse.csr_matrix(x.detach().cpu().float().numpy()).astype(np.float64)


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w`` through a sparse kernel when ``x`` is mostly zeros (SAE codes)."""
    if _is_sparse(x):
        return torch.from_numpy(np.asarray(_csr(x) @ w.detach().cpu().double().numpy())).to(w.dtype)
    return x.to(w.dtype) @ w


def cross(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``x^T y`` (uncentred), through scipy's sparse kernels when either side is mostly zeros.

    Two top-k code matrices cost N * k_x * k_y multiply-adds this way instead of N * d_x * d_y.
    """
    sx, sy = _is_sparse(x), _is_sparse(y)
    if sx or sy:
        a = _csr(x) if sx else x.detach().cpu().double().numpy()
        b = _csr(y) if sy else y.detach().cpu().double().numpy()
        if sx:
            prod = a.T @ b
        else:  # dense x, sparse y: (y^T x)^T keeps the sparse operand on the left
            prod = (b.T @ a).T
        prod = prod.toarray() if hasattr(prod, "toarray") else np.asarray(prod)
        return torch.from_numpy(np.ascontiguousarray(prod)).to(dtype)
    return x.to(dtype).t() @ y.to(dtype)


def centred_cross(x: torch.Tensor, y: torch.Tensor, mx: torch.Tensor, my: torch.Tensor) -> torch.Tensor:
    """``(x - mx)^T (y - my)`` without forming the centred (dense) matrices."""
    n = x.shape[0]
    sx, sy = x.float().sum(0, dtype=torch.float64), y.float().sum(0, dtype=torch.float64)
    mx, my = mx.to(torch.float64), my.to(torch.float64)
    return cross(x, y) - torch.outer(sx, my) - torch.outer(mx, sy) + n * torch.outer(mx, my)


def r2_score(y_hat: torch.Tensor, y: torch.Tensor, mean: torch.Tensor) -> float:
    """1 - SSE / SST, with SST about ``mean`` (the training mean): the mean predictor scores ~0."""
    y = y.float()
    sse = float((y_hat.float() - y).pow(2).sum(dtype=torch.float64))  # float32 terms, float64 sums
    sst = float((y - mean.float()).pow(2).sum(dtype=torch.float64))
    return 1.0 - sse / sst if sst > 0 else float("nan")


def _check_pairs(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.shape[0] != y.shape[0]:
        raise XsaeError(f"{what}: {x.shape[0]} source rows but {y.shape[0]} target rows", "pass paired rows")
    if x.shape[0] < 2:
        raise XsaeError(f"{what}: {x.shape[0]} paired rows are too few to fit a map", "use a larger corpus")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise XsaeError(f"{what}: the activations hold NaN or Inf", "check the models' dtype (try --dtype float32)")


# --------------------------------------------------------------------------------------- linear maps


@dataclass
class LinearMap:
    """``y ~ (x - mx) @ weight + my``: the form every linear mapper here takes."""

    weight: torch.Tensor  # [d_x, d_y], float64
    mx: torch.Tensor
    my: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (matmul(x, self.weight.float()) - (self.mx.float() @ self.weight.float()) + self.my.float()).float()

    def direction(self, v: torch.Tensor) -> torch.Tensor:
        """Where a direction (a difference of two x) goes: the linear part only."""
        return (v.to(torch.float64) @ self.weight).float()


# --------------------------------------------------------------------------------------- similarity


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) from feature-space products, so N can be large.

    ``||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``. It is biased upwards when N is not much
    larger than the widths (unrelated random matrices score about d/N), which the shuffled null
    in the same table shows.
    """
    mx, my = x.float().mean(0, dtype=torch.float64), y.float().mean(0, dtype=torch.float64)
    xy = centred_cross(x, y, mx, my)
    xx = centred_cross(x, x, mx, mx)
    yy = centred_cross(y, y, my, my)
    den = float(torch.linalg.norm(xx) * torch.linalg.norm(yy))
    return float((xy**2).sum()) / den if den > 0 else float("nan")


def _top_components(x: torch.Tensor, keep: float, max_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and the principal directions explaining ``keep`` of the variance (at most ``max_dims``)."""
    mx = x.to(torch.float64).mean(0)
    cov = centred_cross(x, x, mx, mx)
    e, v = torch.linalg.eigh(cov)
    e, v = e.flip(0).clamp_min(0), v.flip(1)
    total = float(e.sum())
    if total <= 0:
        return mx, v[:, :1]
    k = int(torch.searchsorted(torch.cumsum(e, 0) / total, torch.tensor(keep, dtype=torch.float64))) + 1
    return mx, v[:, : max(1, min(k, max_dims, x.shape[1]))]


def _whitener(c: torch.Tensor, eps: float) -> torch.Tensor:
    e, v = torch.linalg.eigh(c)
    return v @ torch.diag(1.0 / torch.sqrt(e.clamp_min(0) + eps * max(float(e.max()), 1e-12))) @ v.t()


@dataclass
class Svcca:
    """SVCCA (Raghu et al. 2017) fit on training rows, scored on held-out rows.

    SVD keeps the directions of each side that explain ``keep`` of its variance; CCA on those gives
    canonical directions. The in-sample mean canonical correlation is inflated whenever the number
    of rows is not many times the number of kept dimensions (with N <= d it is 1 for any data), so
    the held-out value, from the same directions applied to test rows, is the one to read.
    """

    keep: float = 0.99
    max_dims: int = 256
    eps: float = 1e-6

    def score(self, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> dict[str, Any]:
        _check_pairs(x, y, "SVCCA")
        mx, px = _top_components(x, self.keep, self.max_dims)
        my, py = _top_components(y, self.keep, self.max_dims)
        xs = (x.to(torch.float64) - mx) @ px
        ys = (y.to(torch.float64) - my) @ py
        n = xs.shape[0]
        cxx, cyy, cxy = xs.t() @ xs / n, ys.t() @ ys / n, xs.t() @ ys / n
        wx, wy = _whitener(cxx, self.eps), _whitener(cyy, self.eps)
        u, s, vh = torch.linalg.svd(wx @ cxy @ wy, full_matrices=False)
        k = min(px.shape[1], py.shape[1])
        a, b = wx @ u[:, :k], wy @ vh.t()[:, :k]
        xt = ((x_test.to(torch.float64) - mx) @ px) @ a
        yt = ((y_test.to(torch.float64) - my) @ py) @ b
        held = _column_corr(xt, yt)
        return {
            "svcca": float(held.mean()),
            "svcca_in_sample": float(s[:k].clamp(max=1.0).mean()),
            "dims_a": int(px.shape[1]),
            "dims_b": int(py.shape[1]),
            "rows_per_dim": n / max(px.shape[1], py.shape[1]),
        }


def _column_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of matching columns (0 where a column is constant)."""
    constant = (a.amax(0) == a.amin(0)) | (b.amax(0) == b.amin(0))  # exact test: mean-centring leaves rounding noise
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = a.norm(dim=0) * b.norm(dim=0)
    out = (a * b).sum(0) / den.clamp_min(1e-30)
    return torch.where(constant | (den <= 0), torch.zeros_like(out), out)
