"""What each latent responds to: top-activating contexts, activation histograms, logit lens.

Written as one JSON file that `xsae viz features` turns into a dashboard, so the heavy pass over
text happens once, where the model is, and the page can be built anywhere.

One pass over held-out contexts keeps, per latent, a running top-N of (activation, token
position) with one ``torch.topk`` over the merged candidates per batch: memory stays
``d_sae x N`` whatever the number of tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from xsae_cli.core.console import progress
from xsae_cli.sae.models import SparseAutoencoder

FORMAT = "xsae-features"
HIST_EDGES = [0.0] + [10 ** (e / 8) for e in range(-24, 25)]  # 0, then log-spaced 1e-3 .. 1e3


Capture = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]  # (ids, mask) -> [batch, tokens, d_in]


@torch.inference_mode()
def summarize_latents(
    capture: Capture,
    sae: SparseAutoencoder,
    ids: torch.Tensor,
    attention: torch.Tensor | None,
    excluded: torch.Tensor,
    token_text: Callable[[int], str],
    *,
    hook: str,
    top_n: int = 8,
    window: int = 12,
    latents: list[int] | None = None,
    batch_contexts: int = 8,
    unembed: torch.Tensor | None = None,
    lens_k: int = 8,
    top_tokens_k: int = 5,
    reconstruction: bool = False,
) -> dict[str, Any]:
    """The one features-summary schema of every group (``xsae viz features`` reads it).

    ``capture(ids, mask)`` runs the model to the hook and returns its activations; ``excluded``
    ``[contexts, tokens]`` marks positions that never count (padding, BOS/EOS). Per latent: firing
    frequency, mean and max activation, a log-spaced histogram, the top-N contexts (tokens and the
    latent's activation on each), the tokens carrying most of its activation mass and, when the
    model's unembedding ``unembed [vocab, d_in]`` is given, the logit lens. ``reconstruction``
    adds FVU / L0 / dead of the SAE on the same tokens.
    """
    from xsae_cli.sae.metrics import RunningStats

    sae_device = next(sae.parameters()).device
    d_sae = sae.cfg.d_sae
    n_ctx, ctx_len = ids.shape
    top_vals = torch.full((d_sae, top_n), -math.inf)
    top_pos = torch.full((d_sae, top_n), -1, dtype=torch.long)
    edges = torch.tensor(HIST_EDGES)
    hist = torch.zeros(d_sae, len(HIST_EDGES), dtype=torch.long)
    fires = torch.zeros(d_sae, dtype=torch.long)
    act_sum = torch.zeros(d_sae, dtype=torch.float64)
    mass_idx: list[torch.Tensor] = []  # (latent, token id) of every nonzero code, and its value:
    mass_val: list[torch.Tensor] = []  # sparse, so memory follows the codes, not d_sae x vocab
    stats = RunningStats(sae.cfg.d_in, d_sae) if reconstruction else None
    n_tokens = 0
    with progress() as bar:
        task = bar.add_task("latent statistics", total=n_ctx, unit="contexts")
        for start in range(0, n_ctx, batch_contexts):
            batch_ids = ids[start : start + batch_contexts]
            mask = attention[start : start + batch_contexts] if attention is not None else None
            acts = capture(batch_ids, mask)
            keep = ~excluded[start : start + batch_contexts].reshape(-1)
            flat = acts.reshape(-1, acts.shape[-1]).to(sae_device, torch.float32)
            codes_dev = sae.encode(flat)
            if stats is not None:
                kept = keep.to(sae_device)
                stats.update(flat[kept], sae.decode(codes_dev)[kept], codes_dev[kept])
            codes = codes_dev.float().cpu()
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
            rows, cols = active.nonzero(as_tuple=True)
            mass_idx.append(torch.stack([cols, batch_ids.reshape(-1)[rows].long()]))
            mass_val.append(codes[rows, cols].double())
            bar.update(task, advance=batch_ids.shape[0])

    lens = _logit_lens(unembed, sae, token_text, lens_k) if unembed is not None and unembed.shape[1] == sae.cfg.d_in else None
    chosen = latents if latents is not None else list(range(d_sae))
    windows = _windows(capture, sae, ids, attention, excluded, top_vals, top_pos, chosen, window, batch_contexts, sae_device)
    top_tokens = _top_tokens(mass_idx, mass_val, d_sae, top_tokens_k)
    out_latents = []
    for i in chosen:
        entry: dict[str, Any] = {
            "id": i,
            "frequency": float(fires[i]) / max(1, n_tokens),
            "mean_act": float(act_sum[i] / max(1, int(fires[i]))),
            "max_act": float(top_vals[i, 0]) if top_vals[i, 0] > -math.inf else 0.0,
            "histogram": {"edges": HIST_EDGES, "counts": hist[i, 1:].tolist()},
            "top_tokens": [[token_text(t), share] for t, share in top_tokens.get(i, [])],
            "top_contexts": [
                {"tokens": [token_text(int(t)) for t in ids[c, lo:hi]], "acts": acts, "max_index": t - lo, "max_act": round(v, 4), "context": c} for (v, c, t, lo, hi, acts) in windows.get(i, [])
            ],
        }
        if lens is not None:
            entry["logit_lens"] = {"promoted": lens["promoted"][i], "suppressed": lens["suppressed"][i]}
        out_latents.append(entry)
    summary: dict[str, Any] = {
        "format": FORMAT,
        "hook": hook,
        "d_in": sae.cfg.d_in,
        "d_sae": d_sae,
        "architecture": sae.cfg.arch,
        "n_tokens": n_tokens,
        "n_contexts": n_ctx,
        "dead_fraction": float((fires == 0).float().mean()),
        "latents": out_latents,
    }
    if stats is not None:
        summary["reconstruction"] = stats.compute()
    return summary


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
    """:func:`summarize_latents` for a hook of a transformers model over tokenised ``contexts``."""
    from xsae_cli.data.activations import ActivationStore

    store = ActivationStore(model, tokenizer, [hook], contexts, site=site, batch_contexts=batch_contexts, drop_special=False, shuffle=False)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    unembed = head.weight.detach().float().cpu() if head is not None else None
    return summarize_latents(
        lambda ids, mask: store.capture(ids, mask)[hook],
        sae,
        contexts.input_ids,
        contexts.attention_mask,
        contexts.special_mask,
        lambda t: tokenizer.decode([t]),
        hook=hook,
        top_n=top_n,
        window=window,
        latents=latents,
        batch_contexts=batch_contexts,
        unembed=unembed,
        lens_k=logit_lens_k,
    )


def _top_tokens(idx: list[torch.Tensor], val: list[torch.Tensor], d_sae: int, k: int) -> dict[int, list[tuple[int, float]]]:
    """Per latent, the k tokens carrying most of its activation mass, as (token id, share of the mass)."""
    if not idx:
        return {}
    i = torch.cat(idx, 1)
    v = torch.cat(val)
    if i.numel() == 0:
        return {}
    vocab = int(i[1].max()) + 1
    m = torch.sparse_coo_tensor(i, v, (d_sae, vocab)).coalesce().to_sparse_csr()
    crow, cols, vals = m.crow_indices(), m.col_indices(), m.values()
    out: dict[int, list[tuple[int, float]]] = {}
    for lat in (crow[1:] > crow[:-1]).nonzero().squeeze(1).tolist():
        a, b = int(crow[lat]), int(crow[lat + 1])
        row = vals[a:b]
        top = row.topk(min(k, b - a))
        total = float(row.sum())
        out[lat] = [(int(cols[a + j]), round(float(x) / total, 4)) for x, j in zip(top.values.tolist(), top.indices.tolist())]
    return out


def _windows(
    capture: Capture,
    sae: SparseAutoencoder,
    ids: torch.Tensor,
    attention: torch.Tensor | None,
    excluded: torch.Tensor,
    top_vals: torch.Tensor,
    top_pos: torch.Tensor,
    chosen: list[int],
    window: int,
    batch_contexts: int,
    device: Any,
) -> dict[int, list[tuple]]:
    """Each chosen latent's activations around its top tokens: one more forward per needed context."""
    ctx_len = ids.shape[1]
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
        acts = capture(ids[sel], attention[sel] if attention is not None else None)
        for row, c in enumerate(group):
            codes = sae.encode(acts[row].to(device, torch.float32)).float().cpu()
            codes[excluded[c]] = 0
            real = int((~excluded[c]).nonzero().max()) + 1 if attention is None else int(attention[c].sum())
            for i, v, t in wanted[c]:
                lo, hi = max(0, t - window), min(max(real, t + 1), t + window // 2 + 1)
                out.setdefault(i, []).append((v, c, t, lo, hi, [round(a, 4) for a in codes[lo:hi, i].tolist()]))
    for i in out:
        out[i].sort(key=lambda w: -w[0])
    return out


def _logit_lens(w_u: torch.Tensor, sae: SparseAutoencoder, token_text: Callable[[int], str], k: int) -> dict[str, list[list[list[Any]]]]:
    """Tokens each decoder direction promotes and suppresses through the unembedding ``w_u [vocab, d_in]``."""
    promoted, suppressed = [], []
    for chunk in torch.split(sae.W_dec.detach().float().cpu(), 1024):
        logits = chunk @ w_u.T
        top = logits.topk(min(k, w_u.shape[0]), dim=1)
        bot = (-logits).topk(min(k, w_u.shape[0]), dim=1)
        promoted += [[[token_text(int(t)), round(float(v), 3)] for t, v in zip(ti, tv)] for ti, tv in zip(top.indices, top.values)]
        suppressed += [[[token_text(int(t)), round(-float(v), 3)] for t, v in zip(ti, tv)] for ti, tv in zip(bot.indices, bot.values)]
    return {"promoted": promoted, "suppressed": suppressed}
