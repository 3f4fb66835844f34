"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): nested prefixes that each reconstruct.

Latents ``[0, w_1)``, ``[0, w_2)``, ..., ``[0, d_sae)`` (``matryoshka_widths``) must each reconstruct
the input on their own: the loss is the sum of every prefix's squared error. The early latents
then learn the general, frequent directions, and a specific latent cannot absorb a general one (a
"starts with S" latent firing everywhere but on "short"), which the sparse-probing and absorption
evaluations measure. Selection and inference are BatchTopK's (top ``k * N`` over the batch in
training, the learned threshold at inference), so the files are SAELens's ``jumprelu`` (as
SAELens saves a trained ``matryoshka_batchtopk``); SAELens's training checkpoints
(``architecture: matryoshka_batchtopk``, ``matryoshka_widths`` in cfg.json) are read too.

Cost: the prefixes do not need one decode each. The selected codes are split by level (their
columns are sorted within each row), each level's slice of the decoder runs one sparse product
over its own codes only, and the prefix reconstructions are running sums of those: the sparse
work is one decode's, plus one ``[N, d_in]`` add and squared error per level.
``benchmarks/sae_family.py`` measures the step against a plain BatchTopK of the same width (one
thread, loaded 2-core CPU, 4 levels): 1.14x at d_in 576, d_sae 4608, batch 4096; 1.40x at d_in
256, d_sae 2048, batch 2048, where the per-level work weighs more (RESULTS.md, issue 20).
"""

from __future__ import annotations

import itertools
import numbers
from typing import Any

import torch
from torch import Tensor

from xsae_cli.core.errors import XsaeError
from xsae_cli.sae.architectures.batchtopk import BatchTopKSae
from xsae_cli.sae.architectures.batchtopk import _from_saelens as _batchtopk_from_saelens
from xsae_cli.sae.base import SaeConfig
from xsae_cli.sae.kernels import Pattern, SparseDecode
from xsae_cli.sae.registry import ExtraTensor, register_sae_class

NAME = "matryoshka_batchtopk"


def levels_of(cfg: SaeConfig) -> list[int]:
    """The prefix widths, ending in ``d_sae`` (added when the widths stop short, as SAELens does)."""
    widths = [int(w) for w in cfg.options.get("matryoshka_widths") or ()]
    d_sae = int(cfg.d_sae)
    return widths if widths and widths[-1] == d_sae else [*widths, d_sae]


def check_widths(widths: Any, d_sae: int | None) -> None:
    """Refuse widths that are missing, not positive integers, not increasing, or beyond ``d_sae``."""
    fix = "e.g. --matryoshka-widths 512,2048 (strictly increasing, each at most d_sae; d_sae is added as the last level)"
    if not widths:
        raise XsaeError(f"a {NAME} SAE needs matryoshka_widths (the nested prefix sizes)", fix)
    if isinstance(widths, (str, bytes)) or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and int(w) >= 1 for w in widths):
        raise XsaeError(f"matryoshka_widths must be positive integers (got {widths!r})", fix)
    text = ",".join(str(int(w)) for w in widths)
    if any(b <= a for a, b in itertools.pairwise(widths)):
        raise XsaeError(f"matryoshka_widths {text} are not strictly increasing", fix)
    if d_sae is not None and int(widths[-1]) > int(d_sae):
        raise XsaeError(f"matryoshka_widths {text} exceed d_sae={d_sae}", "lower the widths or raise --d-sae / --expansion")


def _validate(cfg: SaeConfig) -> None:
    check_widths(list(cfg.options.get("matryoshka_widths") or ()), int(cfg.d_sae))


class MatryoshkaBatchTopKSae(BatchTopKSae):
    """BatchTopK whose every prefix ``[0, w)`` of ``matryoshka_widths`` is trained to reconstruct."""

    def _train(self, x_n: Tensor, dead_mask: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        vals, p, xc, pre = self._sparse_codes(x_n, training=True)
        n = x_n.shape[0]
        levels = levels_of(self.cfg)
        starts = [0, *levels[:-1]]
        sizes = [hi - lo for lo, hi in zip(starts, levels, strict=True)]
        chunks = self._w_dec().split(sizes, dim=0)  # one gradient concatenation, not a full-size copy per level
        with torch.no_grad():
            group = torch.bucketize(p.cols, torch.tensor(levels[:-1], device=p.cols.device), right=True)
            rows = p.rows
        recon = self.b_dec.expand(n, -1)
        terms: dict[str, Tensor] = {}
        total = x_n.new_zeros(())
        for g, (lo, width) in enumerate(zip(starts, sizes, strict=True)):
            with torch.no_grad():
                sel = (group == g).nonzero().squeeze(1)
                sub = Pattern.from_flat(rows.index_select(0, sel) * width + (p.cols.index_select(0, sel) - lo), n, width, p.backend)
            recon = recon + SparseDecode.apply(vals.index_select(0, sel), chunks[g], sub)
            err = (recon - x_n).reshape(-1)
            level_mse = torch.dot(err, err) / n
            total = total + level_mse
            if g < len(levels) - 1:
                terms[f"mse_{levels[g]}"] = level_mse
        x_hat = recon
        mse = level_mse
        aux = self._auxk(x_n, xc, pre, (x_hat - x_n).detach(), dead_mask)
        del pre
        loss = total + self.cfg.aux_k_coefficient * aux if aux.requires_grad else total
        with torch.no_grad():
            positive = vals.detach() > 0
            fired = torch.zeros(int(self.cfg.d_sae), dtype=torch.long, device=vals.device).index_add_(0, p.cols, positive.long())
            l0 = positive.sum(dtype=torch.float32) / n
            self._after_step(vals.detach(), positive)
        return x_hat, loss, {"mse": mse, "aux": aux, "l0": l0, **terms}, fired


def _from_saelens(raw: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    return _batchtopk_from_saelens(raw, tensors)


register_sae_class(
    NAME,
    MatryoshkaBatchTopKSae,
    uses_k=True,
    saelens="jumprelu",
    saelens_read=(NAME,),
    bf16_selection=True,
    coefficients=("aux_k_coefficient",),
    tensors={"threshold": ExtraTensor("buffer")},
    options={"matryoshka_widths": []},
    saelens_import=_from_saelens,
    validate=_validate,
)
