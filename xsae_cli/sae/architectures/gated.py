"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders").

The encoder has two paths that share ``W_enc``: a *gate* ``pi_gate = (x - b_dec) W_enc + b_gate``
decides which latents are on (Heaviside), a *magnitude* path ``(x - b_dec) (W_enc * exp(r_mag)) +
b_mag`` decides how much. Codes are ``1[pi_gate > 0] * ReLU(pi_mag)``. Because the L1 penalty acts
on ReLU(pi_gate) only, it no longer shrinks the magnitudes of active latents (the bias of a ReLU
SAE). The Heaviside has no gradient, so the gate is trained by the L1 term and by the paper's
auxiliary loss: ``ReLU(pi_gate)`` decoded through a *frozen* copy of the decoder must reconstruct
the input too (eq. 9 of the paper; the stop-gradient keeps the auxiliary task from bending the
decoder that the real codes use). The L1 weight is its own option, ``gated_l1_coefficient`` (default
1.0, SAELens's; ReLU's 5.0 closes every gate: L0 0 on the trainer's planted-dictionary data), best
with ``normalize_activations = expected_average_only_in`` as in SAELens.

Files: SAELens's ``architecture: gated`` (``W_enc, W_dec, b_dec, b_gate, b_mag, r_mag``, no
``b_enc``). xsae keeps the gate bias in ``b_enc`` (every SAE has one, so splicing, PEFT and the
trainer need nothing new) and renames it on the way in and out. One dense matmul serves both
paths: ``pi_mag = (pi_gate - b_gate) * exp(r_mag) + b_mag``.

Unlike SAELens's training class (L1 weighted by decoder norms, auxiliary loss through the live
decoder), xsae keeps the decoder rows unit norm, as the paper does, so the plain L1 is the paper's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xsae_cli.sae.base import SaeConfig, SparseAutoencoder, fired_dense, mse_loss
from xsae_cli.sae.registry import ExtraTensor, register_sae_class


class GatedSae(SparseAutoencoder):
    """Gate ``1[xc W_enc + b_enc > 0]`` times magnitude ``ReLU(xc W_enc exp(r_mag) + b_mag)``.

    ``b_enc`` is the gate bias (SAELens's ``b_gate``); ``r_mag`` and ``b_mag`` start at zero, so
    the two paths start identical.
    """

    r_mag: nn.Parameter  # [d_sae], created from the registration below
    b_mag: nn.Parameter

    def _paths(self, x_n: Tensor) -> tuple[Tensor, Tensor]:
        """(gate pre-activations, magnitude pre-activations) from one matmul."""
        proj = self._centred(x_n) @ self.W_enc
        return proj + self.b_enc, proj * self.r_mag.exp() + self.b_mag

    def _codes(self, x_n: Tensor) -> Tensor:
        gate, mag = self._paths(x_n)
        return (gate > 0).to(mag.dtype) * F.relu(mag)

    def _train(self, x_n: Tensor, dead_mask: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        gate, mag = self._paths(x_n)
        codes = (gate > 0).to(mag.dtype) * F.relu(mag)
        x_hat = self._decode_raw(codes)
        mse = mse_loss(x_hat, x_n)
        gate_act = F.relu(gate)
        l1 = gate_act.sum(-1).mean()
        via_gate = gate_act @ self._w_dec().detach() + self.b_dec.detach()  # the paper's frozen decoder
        aux = mse_loss(via_gate, x_n)
        loss = mse + self.cfg.setting("gated_l1_coefficient") * l1 + aux
        with torch.no_grad():
            l0 = (codes > 0).sum(-1, dtype=torch.float32).mean()
        return x_hat, loss, {"mse": mse, "l1": l1, "aux": aux, "l0": l0}, fired_dense(codes.detach())


def _to_saelens(cfg: SaeConfig, tensors: dict[str, Any]) -> dict[str, Any]:
    out = dict(tensors)
    out["b_gate"] = out.pop("b_enc")
    return out


def _from_saelens(raw: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    out = dict(tensors)
    if "b_gate" in out and "b_enc" not in out:
        out["b_enc"] = out.pop("b_gate")
    return out


register_sae_class(
    "gated",
    GatedSae,
    coefficients=("gated_l1_coefficient",),
    options={"gated_l1_coefficient": 1.0},
    saelens_export=_to_saelens,
    saelens_import=_from_saelens,
    tensors={"r_mag": ExtraTensor("parameter"), "b_mag": ExtraTensor("parameter")},
)
