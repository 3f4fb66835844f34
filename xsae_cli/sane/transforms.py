"""Weight-space transforms for the lineage benchmark: what a model's descendants look like.

Every transform maps a state dict (name -> tensor) to a new one and leaves the input untouched.

Function-preserving (the network computes the same logits, up to float rounding):

- ``perm_mlp``: permute the hidden neurons of every MLP (up/gate rows and biases, down columns);
- ``perm_heads``: permute the attention heads of every layer (with grouped-query attention the
  key/value groups are permuted and the query heads move with their group, then shuffled inside it);
- ``perm_resid``: permute the residual-stream coordinates: the columns of every tensor that reads
  the residual stream, the rows (and biases) of every tensor that writes it, embeddings and norm
  weights. LayerNorm and RMSNorm are permutation-equivariant, so this is exact;
- ``perm_full``: all three at once;
- ``norm_rescale``: multiply each pre-norm's weight (and bias) by a random positive factor per
  coordinate and divide the input columns of the linears it feeds by the same factor. Where a
  norm cannot be compensated (post-LN BERT, whose norm output *is* the residual stream; a final
  norm before a head tied to the input embedding) the attention is rescaled instead: query rows
  by ``s``, key rows by ``1/s`` (no rotary embedding in BERT, so q.k is unchanged), value rows by
  ``s`` and the output projection's columns by ``1/s``.

Not function-preserving: Gaussian noise (``noise_<rel>``, relative to each tensor's std),
magnitude pruning (``prune_<percent>``), an int8 round trip (per-tensor absmax), and fine-tuning
(:func:`finetune`, on the built-in corpus).

Supported layouts: GPT-2 (Conv1D, fused c_attn), GPT-NeoX (fused per-head query_key_value),
Llama/Mistral/Qwen2/Gemma (``model.layers.N.self_attn.q_proj``...) and BERT encoders.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xsae_cli.core.errors import XsaeError

PERMUTATIONS = ("perm_mlp", "perm_heads", "perm_resid", "perm_full")
FUNCTION_PRESERVING = (*PERMUTATIONS, "norm_rescale")
LLAMA_LIKE = ("llama", "mistral", "qwen2", "gemma")
ARCHS = ("gpt2", "gpt_neox", *LLAMA_LIKE, "bert")


@dataclass(frozen=True)
class Arch:
    """What the transforms need to know about a model: its type and attention shape."""

    model_type: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: Any) -> Arch:
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        mt = get("model_type")
        if mt not in ARCHS:
            raise XsaeError(f"lineage transforms do not know model type '{mt}'", f"use one of {', '.join(ARCHS)}")
        d = get("n_embd") if mt == "gpt2" else get("hidden_size")
        heads = get("n_head") if mt == "gpt2" else get("num_attention_heads")
        layers = get("n_layer") if mt == "gpt2" else get("num_hidden_layers")
        kv = get("num_key_value_heads") or heads
        hd = get("head_dim") or d // heads
        tied = bool(get("tie_word_embeddings", mt in ("gpt2", "gemma")))
        return cls(mt, int(layers), int(d), int(heads), int(kv), int(hd), tied)


def _take(t: Any, axis: int, idx: Any) -> Any:
    return t.index_select(axis, idx)


def _blocks(perm: Any, size: int) -> Any:
    """Block permutation: block ``perm[i]`` of ``size`` indices goes to place ``i``."""
    import torch

    return (perm[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


class _Perms:
    """The random permutations of one transform: residual, per-layer MLP and heads."""

    def __init__(self, state: dict[str, Any], arch: Arch, g: Any, mlp: bool, heads: bool, resid: bool) -> None:
        import torch

        self.g = g
        self.arch = arch
        self.resid = torch.randperm(arch.d_model, generator=g) if resid else None
        self.do_mlp = mlp
        self.do_heads = heads
        self.mlp_cache: dict[int, Any] = {}
        self.head_cache: dict[int, tuple[Any, Any]] = {}

    def mlp(self, layer: int, size: int) -> Any:
        import torch

        if not self.do_mlp:
            return None
        if layer not in self.mlp_cache:
            self.mlp_cache[layer] = torch.randperm(size, generator=self.g)
        return self.mlp_cache[layer]

    def heads(self, layer: int) -> tuple[Any, Any] | tuple[None, None]:
        """(query-head order, kv-head order) as head indices."""
        import torch

        if not self.do_heads:
            return None, None
        if layer not in self.head_cache:
            a = self.arch
            groups = a.n_heads // a.n_kv_heads
            kv = torch.randperm(a.n_kv_heads, generator=self.g)
            q = torch.cat([kv[i] * groups + torch.randperm(groups, generator=self.g) for i in range(a.n_kv_heads)])
            self.head_cache[layer] = (q, kv)
        return self.head_cache[layer]


LAYER_RE = re.compile(r"(?:^|\.)(?:h|layers|layer)\.(\d+)\.")


def _layer(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def permute(state: dict[str, Any], arch: Arch, kind: str, seed: int) -> dict[str, Any]:
    """A function-preserving permutation (``perm_mlp``, ``perm_heads``, ``perm_resid``, ``perm_full``)."""
    import torch

    if kind not in PERMUTATIONS:
        raise XsaeError(f"unknown permutation '{kind}'", f"use one of {', '.join(PERMUTATIONS)}")
    g = torch.Generator().manual_seed(seed)
    full = kind == "perm_full"
    p = _Perms(state, arch, g, full or kind == "perm_mlp", full or kind == "perm_heads", full or kind == "perm_resid")
    rule = {"gpt2": _rule_gpt2, "gpt_neox": _rule_neox, "bert": _rule_bert}.get(arch.model_type, _rule_llama)
    out = {}
    for name, t in state.items():
        if not torch.is_tensor(t) or not t.is_floating_point():
            out[name] = t.clone() if torch.is_tensor(t) else t
            continue
        x = t
        for axis, idx in rule(name, t, arch, p):
            if idx is not None:
                x = _take(x, axis, idx)
        out[name] = x.clone() if x is t else x
    return out


Rule = Callable[[str, Any, Arch, _Perms], list[tuple[int, Any]]]


def _head_index(p: _Perms, layer: int, kind: str) -> Any:
    """Index over a projection's head axis (``q``: query heads, ``kv``: key/value heads)."""
    q, kv = p.heads(layer)
    if q is None:
        return None
    return _blocks(q if kind == "q" else kv, p.arch.head_dim)


def _rule_llama(name: str, t: Any, a: Arch, p: _Perms) -> list[tuple[int, Any]]:
    r = p.resid
    layer = _layer(name)
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return [(1, r)]
    if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, model.norm
        return [(0, r)]
    if layer is None:
        return []
    last = name.split(".")[-2]
    is_w = name.endswith(".weight")
    if last in ("q_proj", "k_proj", "v_proj"):
        h = _head_index(p, layer, "q" if last == "q_proj" else "kv")
        return [(0, h), (1, r)] if is_w else [(0, h)]
    if last == "o_proj":
        return [(0, r), (1, _head_index(p, layer, "q"))] if is_w else [(0, r)]
    if last in ("gate_proj", "up_proj"):
        m = p.mlp(layer, t.shape[0])
        return [(0, m), (1, r)] if is_w else [(0, m)]
    if last == "down_proj":
        return [(0, r), (1, p.mlp(layer, t.shape[1]))] if is_w else [(0, r)]
    return []


def _rule_gpt2(name: str, t: Any, a: Arch, p: _Perms) -> list[tuple[int, Any]]:
    """GPT-2's Conv1D weights are [in, out]."""
    import torch

    r = p.resid
    layer = _layer(name)
    if name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
        return [(1, r)]
    if layer is None:
        return [(0, r)] if ".ln_f." in name else []
    is_w = name.endswith(".weight")
    if ".ln_1." in name or ".ln_2." in name:
        return [(0, r)]
    if ".attn.c_attn." in name:
        h = _head_index(p, layer, "q")
        qkv = None if h is None else torch.cat([h + i * a.d_model for i in range(3)])
        return [(0, r), (1, qkv)] if is_w else [(0, qkv)]
    if ".attn.c_proj." in name:
        return [(0, _head_index(p, layer, "q")), (1, r)] if is_w else [(0, r)]
    if ".mlp.c_fc." in name:
        m = p.mlp(layer, t.shape[-1])
        return [(0, r), (1, m)] if is_w else [(0, m)]
    if ".mlp.c_proj." in name:
        return [(0, p.mlp(layer, t.shape[0])), (1, r)] if is_w else [(0, r)]
    return []


def _rule_neox(name: str, t: Any, a: Arch, p: _Perms) -> list[tuple[int, Any]]:
    """GPT-NeoX's query_key_value rows are laid out [head, (q|k|v), head_dim]."""
    r = p.resid
    layer = _layer(name)
    if name.endswith(("embed_in.weight", "embed_out.weight", "lm_head.weight")):
        return [(1, r)]
    if layer is None:
        return [(0, r)] if "final_layer_norm" in name else []
    is_w = name.endswith(".weight")
    if "layernorm" in name:
        return [(0, r)]
    if ".attention.query_key_value." in name:
        q, _kv = p.heads(layer)
        h = None if q is None else _blocks(q, 3 * a.head_dim)
        return [(0, h), (1, r)] if is_w else [(0, h)]
    if ".attention.dense." in name:
        return [(0, r), (1, _head_index(p, layer, "q"))] if is_w else [(0, r)]
    if ".mlp.dense_h_to_4h." in name:
        m = p.mlp(layer, t.shape[0])
        return [(0, m), (1, r)] if is_w else [(0, m)]
    if ".mlp.dense_4h_to_h." in name:
        return [(0, r), (1, p.mlp(layer, t.shape[1]))] if is_w else [(0, r)]
    return []


def _rule_bert(name: str, t: Any, a: Arch, p: _Perms) -> list[tuple[int, Any]]:
    """BERT is post-LN: every LayerNorm output is the residual stream. The pooler's output (and an
    MLM head's logits) are unchanged; the last hidden state comes out with permuted coordinates."""
    r = p.resid
    layer = _layer(name)
    is_w = name.endswith(".weight")
    if name.endswith(("word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight", "decoder.weight")):
        return [(1, r)]
    if "embeddings.LayerNorm" in name:
        return [(0, r)]
    if name.startswith(("pooler.", "bert.pooler.")):
        return [(1, r)] if is_w else []
    if "predictions.transform.dense" in name:  # MLM head: its output meets the tied decoder
        return [(0, r), (1, r)] if is_w else [(0, r)]
    if "predictions.transform.LayerNorm" in name or name.endswith("predictions.bias"):
        return [(0, r)] if "LayerNorm" in name else []
    if layer is None:
        return []
    if ".attention.self." in name:
        h = _head_index(p, layer, "q")
        return [(0, h), (1, r)] if is_w else [(0, h)]
    if ".attention.output.dense." in name:
        return [(0, r), (1, _head_index(p, layer, "q"))] if is_w else [(0, r)]
    if "LayerNorm" in name:
        return [(0, r)]
    if ".intermediate.dense." in name:
        m = p.mlp(layer, t.shape[0])
        return [(0, m), (1, r)] if is_w else [(0, m)]
    if ".output.dense." in name:
        return [(0, r), (1, p.mlp(layer, t.shape[1]))] if is_w else [(0, r)]
    return []


def norm_readers(arch: Arch, names: Any) -> list[tuple[str, list[str], bool, bool]]:
    """Pre-norms whose per-coordinate gain a following linear can absorb: ``(norm, readers,
    conv1d, gemma)`` with tensor prefixes. ``gemma``: the stored weight is ``gain - 1``.

    Shared by :func:`norm_rescale` (which moves scale between the two) and the canonical form
    (which folds the gain into the readers): the same table, so the two stay exact inverses.
    """
    names = set(names)
    mt = arch.model_type
    out: list[tuple[str, list[str], bool, bool]] = []
    for i in range(arch.n_layers):
        if mt == "gpt2":
            pre = f"transformer.h.{i}"
            out += [(f"{pre}.ln_1", [f"{pre}.attn.c_attn"], True, False), (f"{pre}.ln_2", [f"{pre}.mlp.c_fc"], True, False)]
        elif mt == "gpt_neox":
            pre = f"gpt_neox.layers.{i}"
            out += [(f"{pre}.input_layernorm", [f"{pre}.attention.query_key_value"], False, False), (f"{pre}.post_attention_layernorm", [f"{pre}.mlp.dense_h_to_4h"], False, False)]
        elif mt in LLAMA_LIKE:
            pre = f"model.layers.{i}"
            gem = mt == "gemma"
            out += [(f"{pre}.input_layernorm", [f"{pre}.self_attn.{x}_proj" for x in "qkv"], False, gem), (f"{pre}.post_attention_layernorm", [f"{pre}.mlp.gate_proj", f"{pre}.mlp.up_proj"], False, gem)]
    if not arch.tied:
        if mt == "gpt_neox":
            out.append(("gpt_neox.final_layer_norm", ["embed_out" if "embed_out.weight" in names else "lm_head"], False, False))
        elif mt in LLAMA_LIKE and "lm_head.weight" in names:
            out.append(("model.norm", ["lm_head"], False, mt == "gemma"))
    # Only pairs whose tensors are all there (a model saved in part keeps the blocks it has).
    return [(n, r, c, g) for n, r, c, g in out if n + ".weight" in names and all(x + ".weight" in names for x in r)]


def bert_attention(names: Any) -> list[str]:
    """Attention prefixes (``...encoder.layer.N.attention``) of a BERT state dict, in layer order."""
    found = {}
    for k in names:
        m = re.search(r"^(.*encoder\.layer\.(\d+)\.attention)\.self\.query\.weight$", k)
        if m:
            found[int(m.group(2))] = m.group(1)
    return [found[i] for i in sorted(found)]


def norm_rescale(state: dict[str, Any], arch: Arch, seed: int, spread: float = 2.0) -> dict[str, Any]:
    """Function-preserving rescaling (see the module docstring); factors log-uniform in [1/spread, spread]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}

    def factors(n: int) -> Any:
        return torch.exp((torch.rand(n, generator=g) * 2 - 1) * math.log(spread))

    if arch.model_type == "bert":
        for att in bert_attention(out):
            sq, sv = factors(arch.d_model), factors(arch.d_model)
            for key, f in ((f"{att}.self.query", sq), (f"{att}.self.key", 1 / sq), (f"{att}.self.value", sv)):
                out[key + ".weight"] = out[key + ".weight"] * f[:, None]
                out[key + ".bias"] = out[key + ".bias"] * f
            out[f"{att}.output.dense.weight"] = out[f"{att}.output.dense.weight"] / sv[None, :]
        return out
    for norm, readers, conv1d, gemma in norm_readers(arch, out):
        w = out[norm + ".weight"]
        s = factors(w.shape[0])
        out[norm + ".weight"] = (s * (1 + w) - 1) if gemma else w * s
        if norm + ".bias" in out:
            out[norm + ".bias"] = out[norm + ".bias"] * s
        for lin in readers:
            key = lin + ".weight"
            out[key] = out[key] / (s[:, None] if conv1d else s[None, :])
    return out


def elementwise(state: dict[str, Any], kind: str, seed: int) -> dict[str, Any]:
    """Noise (``noise_<rel std>``), magnitude pruning (``prune_<percent>``, matrices only) or ``int8``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if not torch.is_tensor(t) or not t.is_floating_point() or t.numel() < 2:
            out[name] = t.clone() if torch.is_tensor(t) else t
            continue
        x = t.float()
        if kind.startswith("noise_"):
            rel = float(kind.split("_", 1)[1])
            x = x + rel * x.std() * torch.randn(x.shape, generator=g)
        elif kind.startswith("prune_"):
            frac = int(kind.split("_", 1)[1]) / 100
            if x.dim() >= 2:
                k = int(frac * x.numel())
                if k > 0:
                    thresh = x.abs().reshape(-1).kthvalue(k).values
                    x = torch.where(x.abs() <= thresh, torch.zeros_like(x), x)
        elif kind == "int8":
            scale = x.abs().max().clamp_min(1e-12) / 127
            x = (x / scale).round().clamp(-127, 127) * scale
        else:
            raise XsaeError(f"unknown transform '{kind}'", "use noise_<rel>, prune_<percent>, int8, a permutation or norm_rescale")
        out[name] = x.to(t.dtype)
    return out


def apply(state: dict[str, Any], arch: Arch, kind: str, seed: int) -> dict[str, Any]:
    """One non-training transform by name."""
    if kind in PERMUTATIONS:
        return permute(state, arch, kind, seed)
    if kind == "norm_rescale":
        return norm_rescale(state, arch, seed)
    return elementwise(state, kind, seed)


# --- fine-tuning ---------------------------------------------------------------------------

def corpus_ids(tokenizer: Any, max_chars: int = 200_000) -> Any:
    """The built-in corpus as one token stream (the first ``max_chars`` characters)."""
    import torch

    from xsae_cli.data.corpus import builtin_texts

    text, n = [], 0
    for t in builtin_texts():
        text.append(t)
        n += len(t)
        if n >= max_chars:
            break
    ids = tokenizer("\n\n".join(text), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def finetune(model: Any, ids: Any, steps: int, lr: float, seed: int, batch_size: int = 8, seq_len: int = 64, mlm: bool = False, mask_id: int | None = None) -> None:
    """Fine-tune ``model`` in place on random contexts of ``ids`` (causal LM, or masked LM for BERT).

    Dropout is off (the model stays in eval mode while its gradients are taken), so a fine-tune is
    a deterministic function of the starting weights and ``seed``.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    model.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    hi = ids.numel() - seq_len - 1
    for _ in range(steps):
        starts = torch.randint(0, hi, (batch_size,), generator=g)
        x = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        if mlm:
            labels = x.clone()
            sel = torch.rand(x.shape, generator=g) < 0.15
            labels[~sel] = -100
            x = torch.where(sel, torch.full_like(x, int(mask_id)), x)
            loss = model(input_ids=x, labels=labels).loss
        else:
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
