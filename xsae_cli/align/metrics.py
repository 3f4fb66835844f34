"""Held-out scores of a mapping: in the target's own space and in the target SAE's latent space.

What each number means, and why it is computed this way:

* ``r2`` / ``fvu``: 1 - SSE/SST and SSE/SST over all dimensions, with SST about the *training*
  mean of the target, so predicting that mean scores 0 (and anything worse than it is negative).
* ``cosine``: mean cosine of prediction and target per token, both centred on the training mean.
  Uncentred cosine between residual streams is high for any two tokens (they share a large mean
  direction), which is how "cosine 0.8" can mean nothing; centred, the mean predictor scores 0.
* ``latent_r``: mean Pearson correlation, over latents of the target SAE that fire on the test
  rows, between each latent's predicted and true codes.
* ``f1``: per-token F1 between the predicted and the true active sets (the predicted set is the
  top-k of the predicted codes for code mappers, the SAE's own encoding for activation mappers).
* ``matched``: one-to-one pairs of predicted and true latents (Hungarian assignment on the test
  correlation matrix) whose correlation is above a threshold, with the median retrieval rank of
  the partner (1 = each true latent's best-correlated predicted latent is its partner). Latent
  index i of one SAE and index i of another mean nothing by themselves; only the assignment does.
* ``l0`` / ``freq_r``: sparsity similarity: mean active latents per token of the predicted codes
  next to the true ones, and the correlation of log firing frequencies across latents.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from xsae_cli.align.linear import _column_corr, cross, r2_score

MIN_FIRES = 5  # a latent that fires on fewer test rows has no meaningful correlation


def regression_scores(y_hat: torch.Tensor, y: torch.Tensor, train_mean: torch.Tensor) -> dict[str, float]:
    """R^2, FVU and centred cosine of predictions ``y_hat`` for targets ``y``."""
    r2 = r2_score(y_hat, y, train_mean)
    pc = y_hat.float() - train_mean.float()
    tc = y.float() - train_mean.float()
    pn, tn = pc.norm(dim=1), tc.norm(dim=1)
    # A prediction within float rounding of the training mean has no direction: cosine 0, not noise.
    flat = pn <= 1e-5 * float(tn.mean()) if tn.numel() else pn <= 0
    den = pn * tn
    cos = torch.where(flat | (den <= 0), torch.zeros_like(den), (pc * tc).sum(1) / den.clamp_min(1e-30))
    return {"r2": r2, "fvu": 1.0 - r2 if math.isfinite(r2) else float("nan"), "cosine": float(cos.double().mean())}


def topk_codes(codes: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest positive entries per row (the active set a TopK SAE would give)."""
    k = max(1, min(int(k), codes.shape[1]))
    vals, idx = codes.clamp_min(0).topk(k, dim=1)
    return torch.zeros_like(codes).scatter_(1, idx, vals)


def active_f1(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Mean per-token F1 between the sets of active latents (rows with both sets empty are skipped)."""
    p, t = pred > 0, true > 0
    inter = (p & t).sum(1).double()
    size = p.sum(1).double() + t.sum(1).double()
    valid = size > 0
    return float((2 * inter[valid] / size[valid]).mean()) if bool(valid.any()) else float("nan")


def correlation_matrix(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Pearson correlations ``[d_pred, d_true]`` between every predicted and every true column.

    Sparse-aware (codes hold k nonzeros per row); constant columns correlate 0 with everything.
    """
    n = pred.shape[0]
    mp, mt = pred.float().sum(0, dtype=torch.float64) / n, true.float().sum(0, dtype=torch.float64) / n
    cov = cross(pred, true) / n - torch.outer(mp, mt)
    sp = (pred.float().pow(2).sum(0, dtype=torch.float64) / n - mp**2).clamp_min(0).sqrt()
    st = (true.float().pow(2).sum(0, dtype=torch.float64) / n - mt**2).clamp_min(0).sqrt()
    den = torch.outer(sp, st)
    return torch.where(den > 1e-12, cov / den.clamp_min(1e-30), torch.zeros_like(cov)).float()


def hungarian_matches(corr: torch.Tensor, threshold: float, true_alive: torch.Tensor | None = None) -> dict[str, Any]:
    """One-to-one assignment on ``corr [d_pred, d_true]``; count pairs above ``threshold`` and their ranks."""
    from scipy.optimize import linear_sum_assignment

    cols = torch.nonzero(true_alive).flatten() if true_alive is not None else torch.arange(corr.shape[1])
    if cols.numel() == 0:
        return {"matched": 0, "matched_fraction": 0.0, "median_rank": None, "top1_fraction": None}
    sub = corr[:, cols].numpy().astype(np.float64)
    rows, picked = linear_sum_assignment(np.nan_to_num(sub, nan=0.0), maximize=True)
    values = sub[rows, picked]
    good = values >= threshold
    ranks = []
    for r, c in zip(rows[good], picked[good]):
        ranks.append(int((sub[:, c] > sub[r, c]).sum()) + 1)  # 1 = the partner is this latent's best predictor
    return {
        "matched": int(good.sum()),
        "matched_fraction": float(good.sum()) / len(cols),
        "median_rank": float(np.median(ranks)) if ranks else None,
        "top1_fraction": float(np.mean([r == 1 for r in ranks])) if ranks else None,
        "mean_matched_r": float(values[good].mean()) if good.any() else None,
    }


def code_scores(
    pred: torch.Tensor,
    true: torch.Tensor,
    *,
    active_pred: torch.Tensor | None = None,
    k: int | None = None,
    threshold: float = 0.5,
    hungarian: bool = True,
) -> dict[str, Any]:
    """Scores in the target SAE's latent space.

    ``pred`` are predicted codes (dense predictions of a code mapper, or the SAE's encoding of
    mapped activations); ``active_pred`` the sparse codes whose support is the predicted active set
    (default: top-``k`` of ``pred``, with k the true mean L0 when not given).
    """
    fires = (true > 0).sum(0)
    alive = fires >= MIN_FIRES
    same_space = pred.shape[1] == true.shape[1]
    out: dict[str, Any] = {"alive": int(alive.sum())}
    true_l0 = float((true > 0).sum(1).float().mean())
    if active_pred is None:
        active_pred = topk_codes(pred, k if k is not None else max(1, round(true_l0)))
    if same_space:
        r = _column_corr(pred.float(), true.float())
        out["latent_r"] = float(r[alive].mean()) if bool(alive.any()) else float("nan")
        out["f1"] = active_f1(active_pred, true)
        pf = (active_pred > 0).float().mean(0).double()
        tf = (true > 0).float().mean(0).double()
        lp, lt = torch.log10(pf + 1e-5), torch.log10(tf + 1e-5)
        out["freq_r"] = float(_column_corr(lp[:, None], lt[:, None])[0])
    out["l0"] = float((active_pred > 0).sum(1).float().mean())
    out["l0_true"] = true_l0
    if hungarian:
        out.update(hungarian_matches(correlation_matrix(pred, true), threshold, alive))
    return out


def mean_code_scores(train_true: torch.Tensor, true: torch.Tensor, k: int | None, threshold: float) -> dict[str, Any]:
    """Scores of predicting the training mean code for every row: the floor every mapper must clear.

    Its latent correlations are 0 by construction (a constant); its F1 is not: always guessing the
    most frequent latents gets some right, which is exactly why F1 needs this baseline next to it.
    """
    mean = train_true.float().mean(0, keepdim=True).expand(true.shape[0], -1)
    scores = code_scores(mean.contiguous(), true, k=k, threshold=threshold, hungarian=False)
    scores.update({"matched": 0, "matched_fraction": 0.0, "median_rank": None, "top1_fraction": None, "mean_matched_r": None})
    return scores
