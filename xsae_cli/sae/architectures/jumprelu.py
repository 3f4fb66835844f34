"""JumpReLU SAE (Rajamanoharan et al. 2024): a learned per-latent threshold, an L0 penalty.

The jump is not differentiable; both the codes and the L0 count pass gradients to the threshold
through straight-through estimators with a rectangle kernel of width ``jumprelu_bandwidth``
(SAELens's JumpReLU does the same).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from xsae_cli.sae.base import SparseAutoencoder, fired_dense, mse_loss
from xsae_cli.sae.registry import ExtraTensor, register_sae_class


def _rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre * (pre > threshold)``; the threshold gets the rectangle-kernel pseudo-gradient.

    d/dθ is ``-(θ / ε) K((pre - θ) / ε)`` (the jump of height θ smoothed over a window ε), the
    input gets the ordinary gradient where the unit is open.
    """

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold) if ctx.needs_input_grad[0] else None
        grad_t = None
        if ctx.needs_input_grad[1]:
            grad_t = -((threshold / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0)
        return grad_pre, grad_t, None


class _Step(torch.autograd.Function):
    """Heaviside ``pre > threshold`` (the L0 count); pseudo-gradient ``-(1/ε) K((pre - θ)/ε)`` to θ only."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_t = -((1.0 / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0) if ctx.needs_input_grad[1] else None
        return None, grad_t, None


class JumpReluSae(SparseAutoencoder):
    """JumpReLU codes ``pre * (pre > θ)`` with a learned per-latent θ and an L0 penalty.

    θ is a plain parameter (SAELens's choice: Adam moves a log-parameter too slowly from a small
    init) kept >= 0 by projection before each training step.
    """

    threshold: nn.Parameter  # [d_sae], created from the registration below

    def _codes(self, x_n: Tensor) -> Tensor:
        pre = self._pre(self._centred(x_n)).to(self.dtype)
        return pre * (pre > self.threshold)

    def _train(self, x_n: Tensor, dead_mask: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        with torch.no_grad():
            self.threshold.clamp_(min=0.0)
        pre = self._pre(self._centred(x_n), training=True).to(self.dtype)
        eps = float(self.cfg.jumprelu_bandwidth)
        codes = _JumpReLU.apply(pre, self.threshold, eps)
        x_hat = self._decode_raw(codes)
        mse = mse_loss(x_hat, x_n)
        l0 = _Step.apply(pre, self.threshold, eps).sum(-1).mean()
        loss = mse + self.cfg.l0_coefficient * l0
        return x_hat, loss, {"mse": mse, "l0": l0, "l0_loss": self.cfg.l0_coefficient * l0}, fired_dense(codes.detach())


register_sae_class(
    "jumprelu",
    JumpReluSae,
    coefficients=("l0_coefficient",),
    tensors={"threshold": ExtraTensor("parameter", init="jumprelu_init_threshold")},
)
