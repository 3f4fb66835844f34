"""Downstream evaluation: what splicing an SAE into the model does to its next-token predictions.

CE loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean) on held-out text, with the hooked
module's output replaced by the SAE's reconstruction (spliced) or by zeros (zero-ablated); KL is
KL(clean || spliced) per token. Positions the SAE never trained on (BOS, pad, special tokens) keep
their original activation, and only real tokens are scored: their activations have norms
10-140x the median on SmolLM2 and were deliberately left out of training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from xsae_cli.data.activations import resolve_module_name
from xsae_cli.data.hooks import replacing
from xsae_cli.sae.models import SparseAutoencoder


@contextmanager
def spliced(model: torch.nn.Module, hook: str, fn: Any, keep: torch.Tensor | None = None, *, site: str = "output") -> Iterator[None]:
    """Replace ``hook``'s hidden state (its output, or its input) by ``fn(hidden)`` where ``keep`` is False."""
    module = model.get_submodule(resolve_module_name(model, hook))

    def splice(h: torch.Tensor) -> torch.Tensor:
        new = fn(h).to(h.dtype)
        return new if keep is None else torch.where(keep[..., None].to(h.device), h, new)

    with replacing(module, splice, site=site):
        yield


def _token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none").view(input_ids.shape[0], -1)


@torch.inference_mode()
def downstream_metrics(
    model: torch.nn.Module,
    hook: str,
    sae: SparseAutoencoder,
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    batch_contexts: int = 8,
    site: str = "output",
) -> dict[str, float] | None:
    """CE loss clean / spliced / zero-ablated, CE loss recovered and KL; None without an LM head.

    ``site`` is where the SAE read its training activations: the splice replaces the same tensor.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    if not callable(get_head) or get_head() is None:
        return None
    device = next(model.parameters()).device
    totals = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero": 0.0, "kl": 0.0}
    count = 0
    sae_device = next(sae.parameters()).device
    for start in range(0, input_ids.shape[0], batch_contexts):
        ids = input_ids[start : start + batch_contexts].to(device)
        special = special_mask[start : start + batch_contexts].to(device)
        mask = attention_mask[start : start + batch_contexts].to(device) if attention_mask is not None else None
        # Score a prediction only where both the input position and the target are real tokens.
        scored = (~special[:, :-1]) & (~special[:, 1:])
        if not scored.any():
            continue
        kwargs = {"attention_mask": mask} if mask is not None else {}
        clean = model(input_ids=ids, **kwargs).logits
        with spliced(model, hook, lambda h: sae(h.to(sae_device, torch.float32)).to(h.device), keep=special, site=site):
            recon = model(input_ids=ids, **kwargs).logits
        with spliced(model, hook, torch.zeros_like, keep=special, site=site):
            zero = model(input_ids=ids, **kwargs).logits
        n = int(scored.sum())
        totals["ce_clean"] += float(_token_ce(clean, ids)[scored].sum())
        totals["ce_spliced"] += float(_token_ce(recon, ids)[scored].sum())
        totals["ce_zero"] += float(_token_ce(zero, ids)[scored].sum())
        logp = F.log_softmax(clean[:, :-1].float(), -1)
        logq = F.log_softmax(recon[:, :-1].float(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        totals["kl"] += float(kl[scored].sum())
        count += n
    if count == 0:
        return None
    out = {k: v / count for k, v in totals.items()}
    denom = out["ce_zero"] - out["ce_clean"]
    out["ce_loss_recovered"] = (out["ce_zero"] - out["ce_spliced"]) / denom if abs(denom) > 1e-9 else float("nan")
    out["tokens"] = count
    return out
