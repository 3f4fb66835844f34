"""SAE quality metrics as plain tensor functions, plus accumulators that make them exact over many batches.

Definitions follow sparsify and SAELens so numbers compare across tools:

- FVU (fraction of variance unexplained) = sum of squared errors / total variance, the total
  variance taken about the per-dimension mean of the evaluated set. Explained variance = 1 - FVU.
- MSE = mean squared error per element.
- L0 = mean number of nonzero codes per token.
- dead fraction = latents that never fired; dense fraction = latents firing on more than a given
  share of tokens.

FVU over many batches is not the mean of per-batch FVUs (each batch has its own mean and
variance); :class:`RunningStats` keeps per-dimension sums in float64 and computes it once over the
whole set. Model-level metrics (CE-loss recovered, KL) need the language model and plug into
:meth:`RunningStats.add` as named scalar sums.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

#: A latent firing on more than this share of tokens counts as dense (SAELens's dashboards
#: flag log10 density > -1).
DENSE_THRESHOLD = 0.1


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def total_variance(x: Tensor) -> Tensor:
    """Sum over tokens and dimensions of the squared deviation from the per-dimension mean."""
    x = _flat(x).to(torch.float64)
    return (x - x.mean(0)).pow(2).sum()


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained over the tokens given (0 perfect, 1 = predicting the mean)."""
    x, x_hat = _flat(x).to(torch.float64), _flat(x_hat).to(torch.float64)
    return (x - x_hat).pow(2).sum() / total_variance(x).clamp_min(torch.finfo(torch.float64).tiny)


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    return 1.0 - fvu(x, x_hat)


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean squared error per element."""
    return (x.to(torch.float64) - x_hat.to(torch.float64)).pow(2).mean()


def l0(codes: Tensor) -> Tensor:
    """Mean number of nonzero codes per token."""
    return (_flat(codes) != 0).sum(-1, dtype=torch.float64).mean()


def fire_counts(codes: Tensor) -> Tensor:
    """Tokens on which each latent is nonzero, [d_sae] int64 (input of the two fractions below)."""
    return (_flat(codes) != 0).sum(0, dtype=torch.long)


def dead_fraction(fire_counts: Tensor) -> Tensor:
    """Share of latents that fired on no token."""
    return (fire_counts == 0).to(torch.float64).mean()


def dense_fraction(fire_counts: Tensor, n_tokens: int, threshold: float = DENSE_THRESHOLD) -> Tensor:
    """Share of latents firing on more than ``threshold`` of ``n_tokens`` tokens."""
    if n_tokens <= 0:
        return torch.zeros((), dtype=torch.float64)
    return (fire_counts.to(torch.float64) / n_tokens > threshold).to(torch.float64).mean()


class RunningStats:
    """Accumulate reconstruction metrics over batches; :meth:`compute` gives whole-set values.

    Keeps per-dimension sums of x and x^2 and the summed squared error in float64, so FVU is
    exactly what :func:`fvu` would give on the concatenated set, without holding the set.
    Total variance is ``sum(x^2) - n * mean^2`` per dimension; float64 keeps the cancellation
    harmless for activations with large offsets (up to ~1e6 tokens of |x| ~ 1e3 lose < 1e-6).
    """

    def __init__(self, d_in: int, d_sae: int | None = None) -> None:
        self.d_in = d_in
        self.d_sae = d_sae
        self.n_tokens = 0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_x2 = torch.zeros(d_in, dtype=torch.float64)
        self.sq_err = 0.0
        self.fires = torch.zeros(d_sae, dtype=torch.long) if d_sae else None
        self.scalars: dict[str, list[float]] = {}  # name -> [weighted sum, weight]

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, codes: Tensor | None = None, fired: Tensor | None = None) -> None:
        """Add one batch; per-latent firing comes from ``codes`` or from ``fired`` (counts for this batch)."""
        x64 = _flat(x).to(torch.float64)
        self.n_tokens += x64.shape[0]
        self.sum_x += x64.sum(0).cpu()
        self.sum_x2 += x64.pow(2).sum(0).cpu()
        self.sq_err += float((x64 - _flat(x_hat).to(torch.float64)).pow(2).sum())
        if codes is not None:
            fired = fire_counts(codes)
        if fired is not None:
            if self.fires is None:
                self.fires = torch.zeros(fired.shape[-1], dtype=torch.long)
            self.fires += fired.to(torch.long).cpu()

    def add(self, name: str, value: float, weight: float = 1.0) -> None:
        """Accumulate a named per-batch scalar as a weighted mean (CE loss, KL, ... per token)."""
        acc = self.scalars.setdefault(name, [0.0, 0.0])
        acc[0] += float(value) * weight
        acc[1] += weight

    def total_variance(self) -> float:
        if self.n_tokens == 0:
            return 0.0
        mean = self.sum_x / self.n_tokens
        return float((self.sum_x2 - self.n_tokens * mean.pow(2)).clamp_min(0).sum())

    def fvu(self) -> float:
        tv = self.total_variance()
        return self.sq_err / tv if tv > 0 else math.nan

    def compute(self) -> dict[str, Any]:
        """Whole-set metrics as plain floats (JSON-ready)."""
        n = self.n_tokens
        out: dict[str, Any] = {"n_tokens": n}
        if n == 0:
            return out
        f = self.fvu()
        out.update(fvu=f, explained_variance=1.0 - f, mse=self.sq_err / (n * self.d_in))
        if self.fires is not None:
            out["l0"] = float(self.fires.sum()) / n  # every nonzero code is one firing
            out["dead_fraction"] = float(dead_fraction(self.fires))
            out["dense_fraction"] = float(dense_fraction(self.fires, n))
        for name, (total, weight) in self.scalars.items():
            out[name] = total / weight if weight else math.nan
        return out


class FiringTracker:
    """Tokens since each latent last fired: the dead-latent mask that AuxK and logs need.

    A latent is dead once it has gone ``threshold`` tokens without firing (OpenAI/sparsify count
    tokens, not steps, so the rule does not depend on the batch size).
    """

    def __init__(self, d_sae: int, device: torch.device | str | None = None) -> None:
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, fired: Tensor, n_tokens: int) -> None:
        """``fired``: per-latent counts (or booleans) for a batch of ``n_tokens`` tokens."""
        fired = fired.to(self.since_fired.device)
        self.since_fired += n_tokens
        self.since_fired[fired > 0] = 0

    def dead_mask(self, threshold: int) -> Tensor:
        return self.since_fired >= threshold

    def state_dict(self) -> dict[str, Tensor]:
        return {"since_fired": self.since_fired}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.since_fired.copy_(state["since_fired"])
