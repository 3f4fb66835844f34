"""The Procrustes mapper: the best rotation (or isometric embedding) times one scale, fit on train rows."""

from __future__ import annotations

import numpy as np
import torch

from xsae_cli.align.linear import LinearMap, _check_pairs, centred_cross
from xsae_cli.align.mappers import register_mapper


class Procrustes:
    """Centred orthogonal Procrustes with one isotropic scale.

    Equal widths: ``scipy.linalg.orthogonal_procrustes``. Different widths (576 vs 384): the
    narrower side is zero-padded and the square problem solved exactly, which gives a
    *semi-orthogonal* map ``R = U V^T`` from the thin SVD ``Xc^T Yc = U S V^T``: with d_x < d_y an
    isometric embedding (``R R^T = I``); with d_x > d_y the first d_y columns of a rotation
    (``R^T R = I``), i.e. a rotation followed by dropping coordinates. No PCA step. The scale is
    the least-squares one for that R, ``trace(R^T Xc^T Yc) / ||Xc R||^2``; without it two models
    with residual norms of ~100 and ~10 could not be compared at all.
    """

    name = "procrustes"
    linear = True
    describes = "centred orthogonal Procrustes with one isotropic scale; for different widths the semi-orthogonal SVD solution (no PCA)"

    def fit(self, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None) -> LinearMap:
        _check_pairs(x, y, "Procrustes")
        mx, my = x.float().mean(0, dtype=torch.float64), y.float().mean(0, dtype=torch.float64)
        m = centred_cross(x, y, mx, my)
        if m.shape[0] == m.shape[1]:
            from scipy.linalg import orthogonal_procrustes

            # orthogonal_procrustes(A, B) depends on A^T B only, so (I, Xc^T Yc) gives the
            # solution for (Xc, Yc) without forming the centred [N, d] matrices.
            r_np, _ = orthogonal_procrustes(np.eye(m.shape[0]), m.numpy())
            r = torch.from_numpy(r_np)
        else:
            u, _s, vh = torch.linalg.svd(m, full_matrices=False)
            r = u @ vh
        # Least-squares scale for this R: trace(R^T Xc^T Yc) / ||Xc R||^2 (for a semi-orthogonal R,
        # ||Xc R|| counts only the directions R keeps).
        xr = centred_cross(x, x, mx, mx) @ r
        den = float((r * xr).sum())
        scale = float((r * m).sum()) / den if den > 0 else 0.0
        return LinearMap(r * scale, mx, my, {"scale": scale, "semi_orthogonal": m.shape[0] != m.shape[1]})


register_mapper(Procrustes)
