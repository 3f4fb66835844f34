"""The ridge mapper: regularised least squares in closed form, the penalty chosen on validation rows."""

from __future__ import annotations

import torch

from xsae_cli.align.linear import LinearMap, _check_pairs, centred_cross, r2_score
from xsae_cli.align.mappers import register_mapper


class Ridge:
    """Ridge least squares in closed form; the penalty is chosen on the validation rows.

    One eigendecomposition of the centred ``X^T X`` serves every candidate: ``W(alpha) = V
    diag(1/(e + alpha)) V^T X^T Y``. Candidates are ``alpha = c * mean(e)`` for c in ``grid``,
    so the grid means the same thing for activations of norm 100 and codes of norm 1.
    """

    name = "ridge"
    linear = True
    describes = "closed form, penalty chosen on val from alpha = c * mean eigenvalue of X^T X, c in 1e-5..100"

    def __init__(self, grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)) -> None:
        self.grid = grid

    def fit(self, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None) -> LinearMap:
        _check_pairs(x, y, "ridge")
        mx, my = x.float().mean(0, dtype=torch.float64), y.float().mean(0, dtype=torch.float64)
        g = centred_cross(x, x, mx, mx)
        b = centred_cross(x, y, mx, my)
        e, v = torch.linalg.eigh(g)
        e = e.clamp_min(0)
        vb = (v.t() @ b).float()
        vf = v.float()  # candidates in float32: V is orthonormal, so nothing is lost that R^2 could see
        base = float(e.mean()) or 1.0
        if x_val is None or y_val is None or x_val.shape[0] == 0:
            alphas = [base * 1e-3]
        else:
            alphas = [base * c for c in self.grid]
        best: tuple[float, float, torch.Tensor] | None = None
        curve = []
        for alpha in alphas:
            w = (vf @ (vb / (e + alpha).float()[:, None])).double()
            if x_val is not None and y_val is not None and x_val.shape[0]:
                score = r2_score(LinearMap(w, mx, my).predict(x_val), y_val, my)
            else:
                score = 0.0
            curve.append([alpha / base, score])
            if best is None or score > best[1]:
                best = (alpha, score, w)
        assert best is not None
        return LinearMap(best[2], mx, my, {"alpha": best[0], "alpha_relative": best[0] / base, "val_r2": best[1], "val_curve": curve})


register_mapper(Ridge)
