"""Causal test of a mapping: push one model along a latent's direction mapped from the other.

For a latent of the source SAE: its decoder direction (unit norm) is mapped into the target's
residual stream by a linear mapper (only the linear part: a direction is a difference of two
activations, so the bias cancels), scaled to ``strength`` x the median token norm of the target
layer, and added at every content position of held-out windows. What changes downstream is read
two ways:

* a model with an LM head (a causal LM): KL(clean || steered) of its next-token distribution,
  and the tokens whose log-probability rises most on average ("promoted");
* a model without one (MiniLM, a BERT sentence encoder): there is no next-token distribution,
  so no KL is reported. Promoted tokens come from an *embedding lens*: the change of the final
  hidden state, averaged over positions, projected on the input embedding matrix (BERT's MLM head
  would be tied to it; this checkpoint no longer has that head). It says which token embeddings
  the change points towards, not what the model would predict.

The same latent pushed through the source model's own residual stream (its own direction, same
relative strength) gives the tokens it promotes there; the overlap of the two top-token lists is
compared, as strings normalised across tokenizers, with the overlap a random direction of the same
norm gets in the target. Special positions (BOS/CLS/EOS/SEP) are never pushed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from xsae_cli.data.corpus import TokenContexts

READOUT_LM = "next-token distribution (LM head)"
READOUT_LENS = "embedding lens (no LM head: final hidden state projected on the input embeddings; no KL)"


def has_lm_head(model: Any) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None


def normalise_token(text: str) -> str:
    """A token's text comparable across tokenizers: no leading-space marks, no '##', lower case."""
    t = text.replace("Ġ", " ").replace("▁", " ").strip()
    t = t.removeprefix("##")
    return t.lower()


def overlap(a: Sequence[str], b: Sequence[str]) -> float:
    """Fraction of the top tokens of ``a`` whose normalised text is among those of ``b``."""
    sa = {normalise_token(t) for t in a if normalise_token(t)}
    sb = {normalise_token(t) for t in b if normalise_token(t)}
    return len(sa & sb) / max(1, len(sa))


@dataclass
class _Batch:
    ids: torch.Tensor
    att: torch.Tensor
    keep: torch.Tensor  # True at positions never pushed (special, pad)
    clean: torch.Tensor  # [positions, vocab] log-probs (LM) or [positions, d] final hidden states


class Readout:
    """A model and a few held-out windows, with the clean outputs cached (one clean pass for every layer)."""

    def __init__(self, model: Any, tokenizer: Any, contexts: TokenContexts, *, batch_contexts: int = 4) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.lm = has_lm_head(model)
        self.device = next(model.parameters()).device
        if self.lm:
            self.unembed = None
        else:
            self.unembed = model.get_input_embeddings().weight.detach().float().cpu()
        self.batches: list[_Batch] = []
        for s in range(0, len(contexts), batch_contexts):
            sub = contexts.select(slice(s, s + batch_contexts))
            width = int(sub.attention_mask.sum(1).max())
            ids, att, special = sub.input_ids[:, :width], sub.attention_mask[:, :width], sub.special_mask[:, :width]
            b = _Batch(ids, att, special, torch.empty(0))
            b.clean = self._run(b, None, None)
            self.batches.append(b)

    @property
    def kind(self) -> str:
        return READOUT_LM if self.lm else READOUT_LENS

    @torch.no_grad()
    def _run(self, b: _Batch, hook: str | None, vector: torch.Tensor | None) -> torch.Tensor:
        from xsae_cli.sae.evaluate import spliced

        ids, att = b.ids.to(self.device), b.att.to(self.device)
        content = ~b.keep
        if vector is None or hook is None:
            out = self.model(input_ids=ids, attention_mask=att)
        else:
            v = vector.to(self.device)
            with spliced(self.model, hook, lambda h: h + v.to(h.dtype), keep=b.keep):
                out = self.model(input_ids=ids, attention_mask=att)
        if self.lm:
            return F.log_softmax(out.logits.float(), -1)[content.to(self.device)].cpu()
        return out.last_hidden_state.float()[content.to(self.device)].cpu()

    def effect(self, hook: str, vector: torch.Tensor, top: int) -> dict[str, Any]:
        """KL (LM only) and the top promoted tokens when ``vector`` is added to the output of ``hook``."""
        kl_sum, n = 0.0, 0
        delta: torch.Tensor | None = None
        for b in self.batches:
            steered = self._run(b, hook, vector)
            if self.lm:
                kl_sum += float((b.clean.exp() * (b.clean - steered)).sum())
            d = (steered - b.clean).sum(0)
            delta = d if delta is None else delta + d
            n += int(steered.shape[0])
        assert delta is not None
        delta = delta / max(1, n)
        if not self.lm:
            assert self.unembed is not None
            delta = self.unembed @ delta
        ids = delta.topk(top).indices.tolist()
        return {"kl": kl_sum / max(1, n) if self.lm else None, "promoted": [self.tokenizer.decode([i]) for i in ids], "positions": n}


def median_norm(acts: torch.Tensor) -> float:
    return float(acts.float().norm(dim=1).median())


def pick_latents(codes: torch.Tensor, n: int, lo: float = 0.005, hi: float = 0.3) -> list[int]:
    """``n`` latents spread evenly over the firing-frequency range [lo, hi] on held-out rows.

    Chosen by frequency alone (not by how well they map), so the result is not selected for success.
    """
    freq = (codes > 0).float().mean(0)
    ok = torch.nonzero((freq >= lo) & (freq <= hi)).flatten()
    if ok.numel() == 0:
        ok = torch.nonzero(freq > 0).flatten()
    if ok.numel() == 0:
        return []
    ranked = ok[torch.argsort(freq[ok], descending=True)]
    if ranked.numel() <= n:
        return ranked.tolist()
    step = ranked.numel() / n
    return [int(ranked[int(i * step)]) for i in range(n)]


def transfer_latents(
    source: Readout,
    target: Readout,
    source_hook: str,
    target_hook: str,
    directions: torch.Tensor,
    mapped: torch.Tensor,
    latents: Sequence[int],
    freqs: Sequence[float],
    *,
    strength: float,
    norm_source: float,
    norm_target: float,
    top: int = 10,
    seed: int = 0,
    on_step: Any = None,
) -> dict[str, Any]:
    """Push each latent's direction through the source and its mapped direction through the target.

    ``directions [n, d_source]`` are decoder rows; ``mapped [n, d_target]`` where the mapper sends
    them. Every pushed vector has norm ``strength`` x the median token norm of its layer; the random
    direction in the target has the mapped vector's norm.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, latent in enumerate(latents):
        d = directions[i].float()
        u = d / d.norm().clamp_min(1e-12) * strength * norm_source
        m = mapped[i].float()
        v = m / m.norm().clamp_min(1e-12) * strength * norm_target
        r = torch.randn(v.shape[0], generator=gen)
        r = r / r.norm() * v.norm()
        src = source.effect(source_hook, u, top)
        tgt = target.effect(target_hook, v, top)
        rnd = target.effect(target_hook, r, top)
        rows.append(
            {
                "latent": int(latent),
                "frequency": float(freqs[i]),
                "kl": tgt["kl"],
                "kl_random": rnd["kl"],
                "kl_source": src["kl"],
                "overlap": overlap(src["promoted"], tgt["promoted"]),
                "overlap_random": overlap(src["promoted"], rnd["promoted"]),
                "promoted_source": src["promoted"],
                "promoted_target": tgt["promoted"],
                "promoted_random": rnd["promoted"],
            }
        )
        if on_step is not None:
            on_step()

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "readout_source": source.kind,
        "readout_target": target.kind,
        "strength": strength,
        "norm_source": norm_source,
        "norm_target": norm_target,
        "positions": target.batches and sum(int((~b.keep).sum()) for b in target.batches),
        "kl": mean("kl"),
        "kl_random": mean("kl_random"),
        "overlap": mean("overlap"),
        "overlap_random": mean("overlap_random"),
        "latents": rows,
    }
