"""BatchTopK SAE (Bussmann et al. 2024): top ``k * N`` over the batch in training, a threshold at inference.

Saved as SAELens saves a trained BatchTopK: its inference rule *is* a JumpReLU with the learned
global threshold, so the files say ``architecture: jumprelu`` (and SAELens loads them as such);
SAELens's own BatchTopK training checkpoints (``architecture: batchtopk``) are read too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from xsae_cli.sae.architectures.topk import TopKSae
from xsae_cli.sae.kernels import Pattern, global_topk
from xsae_cli.sae.registry import ExtraTensor, register_sae_class


class BatchTopKSae(TopKSae):
    """Top ``k * N`` of ReLU(pre) over the whole batch in training; a learned threshold at inference.

    The threshold is an EMA of the smallest selected activation (SAELens's rule), kept in the
    ``threshold [d_sae]`` buffer so the SAE saves and runs as a JumpReLU SAE. It starts from the
    first batch's value instead of SAELens's 0, so early evaluations are meaningful.
    """

    threshold: Tensor  # buffer [d_sae], created from the registration below

    def _select(self, pre: Tensor, training: bool) -> tuple[Pattern, Tensor]:
        n, d_sae = pre.shape
        if training:
            flat = global_topk(pre, self.k * n)
        else:  # JumpReLU semantics: every latent above the threshold (and above zero)
            keep = (pre > self.threshold.to(pre.dtype)) & (pre > 0)
            flat = keep.reshape(-1).nonzero().squeeze(1)
        return Pattern.from_flat(flat, n, d_sae, self.sparse_backend), pre.reshape(-1).index_select(0, flat)

    def _after_step(self, values: Tensor, positive: Tensor) -> None:
        """EMA towards the smallest positive kept code; written without host syncs (CUDA)."""
        smallest = torch.where(positive, values, torch.full_like(values, math.inf)).min().to(self.threshold.dtype)
        lr = float(self.cfg.batchtopk_threshold_lr)
        first = (self.threshold == 0).all()
        moved = torch.where(first, smallest, self.threshold * (1 - lr) + smallest * lr)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), moved, self.threshold))


def _from_saelens(raw: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """A SAELens BatchTopK *training* checkpoint keeps one scalar ``topk_threshold``: spread it per latent."""
    if "topk_threshold" in tensors and "threshold" not in tensors:
        tensors = dict(tensors)
        tensors["threshold"] = torch.full((int(raw["d_sae"]),), float(tensors.pop("topk_threshold")))
    return tensors


register_sae_class(
    "batchtopk",
    BatchTopKSae,
    uses_k=True,
    saelens="jumprelu",
    saelens_read=("batchtopk",),
    bf16_selection=True,
    coefficients=("aux_k_coefficient",),
    tensors={"threshold": ExtraTensor("buffer")},
    saelens_import=_from_saelens,
)
