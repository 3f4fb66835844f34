"""TopK SAE (Gao et al. 2024 / sparsify): the k largest ReLU pre-activations per token, AuxK.

Training runs one dense matmul (the pre-activations) and otherwise only sparse products
(:mod:`xsae_cli.sae.kernels`); BatchTopK (``batchtopk.py``) reuses everything but the selection.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xsae_cli.sae.base import SaeConfig, SparseAutoencoder
from xsae_cli.sae.kernels import GatherLinear, Pattern, SparseDecode
from xsae_cli.sae.registry import register_sae_class


class TopKSae(SparseAutoencoder):
    """k largest of ReLU(pre) per token; AuxK revives dead latents (Gao et al. 2024 / sparsify).

    Training runs one dense matmul (the pre-activations) and otherwise only sparse products.
    """

    @property
    def k(self) -> int:
        """Active latents per token (the registration says topk uses k, so the config holds one)."""
        return int(self.cfg.k or 0)

    def _select(self, pre: Tensor, training: bool) -> tuple[Pattern, Tensor]:
        """Pattern and pre-activation values of the selected latents (TopK: k per row)."""
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return Pattern.from_topk(idx, int(self.cfg.d_sae), self.sparse_backend), vals.reshape(-1)

    def _sparse_codes(self, x_n: Tensor, training: bool) -> tuple[Tensor, Pattern, Tensor, Tensor]:
        """(values, pattern, centred input, dense pre-activations) of the selected latents.

        Selection runs without autograd; the values are re-attached through :class:`GatherLinear`,
        which reuses them when they were computed in the weights' dtype and recomputes them
        exactly (nnz dot products) after a bf16 selection.
        """
        with torch.no_grad():
            xc = self._centred(x_n)
            pre = self._pre(xc, training=training, scratch=training)
            pattern, vals = self._select(pre, training)
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        raw = GatherLinear.apply(x_n, b_dec, self.W_enc, self.b_enc, xc, pattern, vals if pre.dtype == self.dtype else None)
        return F.relu(raw), pattern, xc, pre

    def _codes(self, x_n: Tensor) -> Tensor:
        vals, p, _, _ = self._sparse_codes(x_n, training=False)
        codes = x_n.new_zeros(p.n_rows * p.n_cols)
        codes = codes.index_put((p.rows * p.n_cols + p.cols,), vals)
        return codes.reshape(p.n_rows, p.n_cols)

    def _reconstruct(self, x_n: Tensor) -> Tensor:
        vals, p, _, _ = self._sparse_codes(x_n, training=False)
        return SparseDecode.apply(vals, self._w_dec(), p) + self.b_dec

    def _train(self, x_n: Tensor, dead_mask: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        vals, p, xc, pre = self._sparse_codes(x_n, training=True)
        x_hat = SparseDecode.apply(vals, self._w_dec(), p) + self.b_dec
        err = x_hat - x_n
        n = x_n.shape[0]
        flat = err.reshape(-1)
        mse = torch.dot(flat, flat) / n  # one pass, no [N, d_in] temporary
        aux = self._auxk(x_n, xc, pre, err.detach(), dead_mask)
        del pre
        loss = mse + self.cfg.aux_k_coefficient * aux if aux.requires_grad else mse
        with torch.no_grad():
            positive = vals.detach() > 0
            fired = torch.zeros(int(self.cfg.d_sae), dtype=torch.long, device=vals.device).index_add_(0, p.cols, positive.long())
            l0 = positive.sum(dtype=torch.float32) / n
            self._after_step(vals.detach(), positive)
        return x_hat, loss, {"mse": mse, "aux": aux, "l0": l0}, fired

    def _after_step(self, values: Tensor, positive: Tensor) -> None:
        """Hook for state that follows the training codes (BatchTopK's threshold)."""

    def _auxk(self, x_n: Tensor, xc: Tensor, pre: Tensor, err: Tensor, dead_mask: Tensor | None) -> Tensor:
        """AuxK: the top aux_k *dead* latents reconstruct the main reconstruction's error.

        Scaled by min(dead / aux_k, 1) as sparsify and SAELens do, so a handful of dead latents
        does not get the weight of many. Unlike sparsify (whose fused encoder drops this gradient),
        the loss reaches the encoder as well as the decoder, as in Gao et al. The dead latents'
        pre-activations are read from the forward's matrix: no second matmul.
        """
        zero = err.new_zeros(())
        if dead_mask is None:
            return zero
        dead = dead_mask.to(device=err.device, dtype=torch.bool).reshape(-1).nonzero().squeeze(1)
        n_dead = dead.numel()
        if n_dead == 0:
            return zero
        aux_k = self.cfg.effective_aux_k
        scale = min(n_dead / aux_k, 1.0)
        k = min(aux_k, n_dead)
        with torch.no_grad():
            vals, local = pre.index_select(1, dead).topk(k, dim=-1, sorted=False)
            p = Pattern.from_topk(dead[local], int(self.cfg.d_sae), self.sparse_backend)
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        raw = GatherLinear.apply(x_n, b_dec, self.W_enc, self.b_enc, xc, p, vals.reshape(-1) if pre.dtype == self.dtype else None)
        e_hat = SparseDecode.apply(F.relu(raw), self._w_dec(), p)
        return scale * (e_hat + err).pow(2).sum() / x_n.shape[0]


def _saelens_cfg(cfg: SaeConfig) -> dict[str, Any]:
    """SAELens's TopK config holds k; xsae's decoder is never rescaled at run time."""
    return {"k": int(cfg.k or 0), "rescale_acts_by_decoder_norm": False}


register_sae_class(
    "topk",
    TopKSae,
    uses_k=True,
    sparsify="topk",
    bf16_selection=True,
    coefficients=("aux_k_coefficient",),
    saelens_cfg=_saelens_cfg,
)
