"""ReLU SAE with a decoder-norm-weighted L1 penalty (SAELens's "standard", Anthropic April 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from xsae_cli.sae.base import SparseAutoencoder, fired_dense, mse_loss
from xsae_cli.sae.registry import register_sae_class


class ReluSae(SparseAutoencoder):
    """ReLU codes with an L1 penalty on ``codes * ||W_dec row||`` (SAELens standard, Anthropic April 2024).

    Weighting by the decoder norms makes the penalty invariant to moving scale between codes and
    decoder rows, so the decoder needs no unit-norm constraint (it starts unit norm).
    """

    def _codes(self, x_n: Tensor, training: bool = False) -> Tensor:
        return F.relu(self._pre(self._centred(x_n), training=training).to(self.dtype))

    def _train(self, x_n: Tensor, dead_mask: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        codes = self._codes(x_n, training=True)
        x_hat = self._decode_raw(codes)
        mse = mse_loss(x_hat, x_n)
        l1 = (codes * self.W_dec.norm(dim=1)).sum(-1).mean()
        loss = mse + self.cfg.l1_coefficient * l1
        with torch.no_grad():
            l0 = (codes > 0).sum(-1, dtype=torch.float32).mean()
        return x_hat, loss, {"mse": mse, "l1": l1, "l0": l0}, fired_dense(codes.detach())


register_sae_class("relu", ReluSae, saelens="standard", coefficients=("l1_coefficient",), unit_norm_decoder=False)
