"""What each latent responds to: top-activating contexts, activation histograms, logit lens.

Written as one JSON file that `xsae viz features` turns into a dashboard, so the heavy pass over
text happens once, where the model is, and the page can be built anywhere.

One pass over held-out contexts keeps, per latent, a running top-N of (activation, token
position) with one ``torch.topk`` over the merged candidates per batch: memory stays
``d_sae x N`` whatever the number of tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from xsae_cli.core.console import progress
from xsae_cli.sae.models import SparseAutoencoder

HIST_EDGES = [0.0] + [10 ** (e / 8) for e in range(-24, 25)]  # 0, then log-spaced 1e-3 .. 1e3


@torch.inference_mode()
def feature_summary(
    model: Any,
    tokenizer: Any,
    sae: SparseAutoencoder,
    hook: str,
    contexts: Any,
    *,
    site: str = "output",
    top_n: int = 8,
    window: int = 12,
    latents: list[int] | None = None,
    logit_lens_k: int = 8,
    batch_contexts: int = 8,
) -> dict[str, Any]:
    """Per-latent top contexts, histogram, frequency and logit lens over ``contexts``."""
    from xsae_cli.data.activations import ActivationStore

    store = ActivationStore(model, tokenizer, [hook], contexts, site=site, batch_contexts=batch_contexts, drop_special=False, shuffle=False)
    sae_device = next(sae.parameters()).device
    d_sae = sae.cfg.d_sae
    ids = contexts.input_ids
    special = contexts.special_mask
    n_ctx, ctx_len = ids.shape
    top_vals = torch.full((d_sae, top_n), -math.inf)
    top_pos = torch.full((d_sae, top_n), -1, dtype=torch.long)
    edges = torch.tensor(HIST_EDGES)
    hist = torch.zeros(d_sae, len(HIST_EDGES), dtype=torch.long)
    fires = torch.zeros(d_sae, dtype=torch.long)
    act_sum = torch.zeros(d_sae, dtype=torch.float64)
    n_tokens = 0
    with progress() as bar:
        task = bar.add_task("latent statistics", total=n_ctx, unit="contexts")
        for start in range(0, n_ctx, batch_contexts):
            batch_ids = ids[start : start + batch_contexts]
            mask = contexts.attention_mask[start : start + batch_contexts] if contexts.attention_mask is not None else None
            acts = store.capture(batch_ids, mask)[hook]
            keep = ~special[start : start + batch_contexts].reshape(-1)
            codes = sae.encode(acts.reshape(-1, acts.shape[-1]).to(sae_device, torch.float32)).float().cpu()
            codes[~keep] = 0
            n_tokens += int(keep.sum())
            positions = torch.arange(start * ctx_len, start * ctx_len + codes.shape[0])
            k = min(top_n, codes.shape[0])
            vals, idx = codes.T.topk(k, dim=1)
            merged_vals = torch.cat([top_vals, vals], dim=1)
            merged_pos = torch.cat([top_pos, positions[idx]], dim=1)
            best = merged_vals.topk(top_n, dim=1)
            top_vals, top_pos = best.values, merged_pos.gather(1, best.indices)
            active = codes > 0
            fires += active.sum(0)
            act_sum += codes.sum(0, dtype=torch.float64)
            bucket = torch.bucketize(codes, edges, right=True).clamp_max(len(HIST_EDGES) - 1)
            bucket[~active] = 0
            hist.scatter_add_(1, bucket.T.contiguous(), active.T.long())
            bar.update(task, advance=batch_ids.shape[0])

    lens = _logit_lens(model, tokenizer, sae, logit_lens_k)
    chosen = latents if latents is not None else list(range(d_sae))
    windows = _windows(store, hook, sae, contexts, top_vals, top_pos, chosen, window, batch_contexts, sae_device)
    out_latents = []
    for i in chosen:
        entry: dict[str, Any] = {
            "id": i,
            "frequency": float(fires[i]) / max(1, n_tokens),
            "mean_act": float(act_sum[i] / max(1, int(fires[i]))),
            "max_act": float(top_vals[i, 0]) if top_vals[i, 0] > -math.inf else 0.0,
            "histogram": {"edges": HIST_EDGES, "counts": hist[i, 1:].tolist()},
            "top_contexts": [
                {"tokens": _tokens(tokenizer, ids[c, lo:hi]), "acts": acts, "max_index": t - lo, "max_act": round(v, 4), "context": c}
                for (v, c, t, lo, hi, acts) in windows.get(i, [])
            ],
        }
        if lens is not None:
            entry["logit_lens"] = {"promoted": lens["promoted"][i], "suppressed": lens["suppressed"][i]}
        out_latents.append(entry)
    return {
        "hook": hook,
        "d_in": sae.cfg.d_in,
        "d_sae": d_sae,
        "architecture": sae.cfg.arch,
        "n_tokens": n_tokens,
        "n_contexts": n_ctx,
        "dead_fraction": float((fires == 0).float().mean()),
        "latents": out_latents,
    }


def _windows(store: Any, hook: str, sae: SparseAutoencoder, contexts: Any, top_vals: torch.Tensor, top_pos: torch.Tensor, chosen: list[int], window: int, batch_contexts: int, device: Any) -> dict[int, list[tuple]]:
    """Each chosen latent's activations around its top tokens: one more forward per needed context."""
    ctx_len = contexts.input_ids.shape[1]
    wanted: dict[int, list[tuple[int, float, int]]] = {}
    for i in chosen:
        for v, p in zip(top_vals[i].tolist(), top_pos[i].tolist()):
            if p >= 0 and v > 0:
                c, t = divmod(p, ctx_len)
                wanted.setdefault(c, []).append((i, v, t))
    out: dict[int, list[tuple]] = {}
    needed = sorted(wanted)
    for start in range(0, len(needed), batch_contexts):
        group = needed[start : start + batch_contexts]
        sel = torch.tensor(group)
        mask = contexts.attention_mask[sel] if contexts.attention_mask is not None else None
        acts = store.capture(contexts.input_ids[sel], mask)[hook]
        for row, c in enumerate(group):
            codes = sae.encode(acts[row].to(device, torch.float32)).float().cpu()
            codes[contexts.special_mask[c]] = 0
            for i, v, t in wanted[c]:
                lo, hi = max(0, t - window), min(ctx_len, t + window // 2 + 1)
                out.setdefault(i, []).append((v, c, t, lo, hi, [round(a, 4) for a in codes[lo:hi, i].tolist()]))
    for i in out:
        out[i].sort(key=lambda w: -w[0])
    return out


def _tokens(tokenizer: Any, ids: torch.Tensor) -> list[str]:
    return [tokenizer.decode([int(t)]) for t in ids]


def _logit_lens(model: Any, tokenizer: Any, sae: SparseAutoencoder, k: int) -> dict[str, list[list[list[Any]]]] | None:
    """Tokens each decoder direction promotes and suppresses through the unembedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or head.weight.shape[1] != sae.cfg.d_in:
        return None
    w_u = head.weight.detach().float().cpu()  # [vocab, d_in]
    promoted, suppressed = [], []
    for chunk in torch.split(sae.W_dec.detach().float().cpu(), 1024):
        logits = chunk @ w_u.T
        top = logits.topk(k, dim=1)
        bot = (-logits).topk(k, dim=1)
        promoted += [[[tokenizer.decode([int(t)]), round(float(v), 3)] for t, v in zip(ti, tv)] for ti, tv in zip(top.indices, top.values)]
        suppressed += [[[tokenizer.decode([int(t)]), round(-float(v), 3)] for t, v in zip(ti, tv)] for ti, tv in zip(bot.indices, bot.values)]
    return {"promoted": promoted, "suppressed": suppressed}
