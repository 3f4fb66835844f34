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

- ``rotate_resid``: fold every pre-norm's gain into its readers (gain -> 1, bias -> bias / gain),
  then rotate the residual stream by one random orthogonal ``Q``: every tensor's residual axis is
  multiplied by ``Q^T`` (readers ``W Q^T``, writers ``Q W``, embeddings' rows, norm biases). A
  norm without a gain commutes with ``Q``: RMSNorm with any orthogonal ``Q``, LayerNorm with one
  that fixes the all-ones direction (``fix_ones``, the default, so the mean it subtracts is kept).
  The head is untied where it was tied (the final norm's gain is folded into it), as in the
  lineage-attack literature (HuRef's invariant terms are built to survive exactly this). Refused
  for post-LN models and where a norm of the residual stream has no readers to absorb its gain.

Not function-preserving: Gaussian noise (``noise_<rel>``, relative to each tensor's std),
magnitude pruning (``prune_<percent>``), an int8 round trip (per-tensor absmax), and fine-tuning
(:func:`finetune`, on the built-in corpus).

Every transform reads the model's layout from its anatomy (:mod:`xsae_cli.zoo.anatomy`: which axis
of which tensor indexes the residual stream, the heads or the MLP neurons), so it covers the
families whose tensor roles are known there: GPT-2 (Conv1D, fused c_attn), GPT-NeoX (fused per-head
query_key_value), Llama/Mistral/Qwen2/Gemma (``model.layers.N.self_attn.q_proj``...) and BERT.
"""

from __future__ import annotations

import math
from typing import Any

from xsae_cli.core.errors import XsaeError
from xsae_cli.zoo.anatomy import (
    HEADS_KV,
    HEADS_Q,
    MLP,
    QKV,
    QKV_CAT,
    QKV_GROUPED,
    QKV_HEADS,
    RESID,
    Anatomy,
    TensorRole,
)

PERMUTATIONS = ("perm_mlp", "perm_heads", "perm_resid", "perm_full")
FUNCTION_PRESERVING = (*PERMUTATIONS, "norm_rescale")
ROTATIONS = ("rotate_resid",)  # function preserving for pre-norm models with an untied head (the rotation unties it)
# What the transforms need to know about a model: its shape and its tensors' roles (zoo/anatomy).
Arch = Anatomy


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


def permute(state: dict[str, Any], arch: Arch, kind: str, seed: int) -> dict[str, Any]:
    """A function-preserving permutation (``perm_mlp``, ``perm_heads``, ``perm_resid``, ``perm_full``)."""
    import torch

    if kind not in PERMUTATIONS:
        raise XsaeError(f"unknown permutation '{kind}'", f"use one of {', '.join(PERMUTATIONS)}")
    g = torch.Generator().manual_seed(seed)
    full = kind == "perm_full"
    p = _Perms(state, arch, g, full or kind == "perm_mlp", full or kind == "perm_heads", full or kind == "perm_resid")
    out = {}
    for name, t in state.items():
        if not torch.is_tensor(t) or not t.is_floating_point():
            out[name] = t.clone() if torch.is_tensor(t) else t
            continue
        x = t
        for axis, idx in permutation_axes(arch.role(name), t, p):
            if idx is not None:
                x = _take(x, axis, idx)
        out[name] = x.clone() if x is t else x
    return out


def _head_index(p: Any, layer: int, kind: str) -> Any:
    """Index over a projection's head axis (``q``: query heads, ``kv``: key/value heads)."""
    q, kv = p.heads(layer)
    if q is None:
        return None
    return _blocks(q if kind == "q" else kv, p.arch.head_dim)


def permutation_axes(role: TensorRole, t: Any, p: Any) -> list[tuple[int, Any]]:
    """``(axis, index)`` for every axis of ``t`` whose space ``p`` permutes (None: not permuted).

    ``p`` gives the orders: ``p.resid``, ``p.mlp(block, size)`` and ``p.heads(block)`` (random in
    :func:`permute`, sorted in the canonical form)."""
    import torch

    out: list[tuple[int, Any]] = []
    for axis, space in role.axes:
        if space == RESID:
            out.append((axis, p.resid))
        elif role.block is None:
            continue
        elif space == MLP:
            out.append((axis, p.mlp(role.block, t.shape[axis])))
        elif space in (HEADS_Q, HEADS_KV):
            out.append((axis, _head_index(p, role.block, "q" if space == HEADS_Q else "kv")))
        elif space == QKV:  # [q | k | v], each over the query heads
            h = _head_index(p, role.block, "q")
            out.append((axis, None if h is None else torch.cat([h + i * (t.shape[axis] // 3) for i in range(3)])))
        elif space == QKV_HEADS:  # [head, (q | k | v), head_dim]
            q, _kv = p.heads(role.block)
            out.append((axis, None if q is None else _blocks(q, 3 * p.arch.head_dim)))
        elif space in (QKV_CAT, QKV_GROUPED):
            q, kv = p.heads(role.block)
            a = p.arch
            out.append((axis, None if q is None else fused_rows(space, q, kv, a.n_heads, a.n_kv_heads, a.head_dim)))
    return out


def fused_rows(space: str, q: Any, kv: Any, nh: int, nkv: int, hd: int) -> Any:
    """Row order of a fused q/k/v map under query-head order ``q`` and key/value order ``kv``:
    ``qkv_cat`` is ``[q heads | k heads | v heads]``, ``qkv_heads`` ``[head, (q|k|v), hd]`` (as
    many key/value heads as query heads), ``qkv_grouped`` ``[group, (its q heads | k | v), hd]``."""
    import torch

    if space == QKV_CAT:
        return torch.cat([_blocks(q, hd), nh * hd + _blocks(kv, hd), (nh + nkv) * hd + _blocks(kv, hd)])
    if space == QKV_HEADS:
        return _blocks(q, 3 * hd)
    group = nh // nkv
    per = (group + 2) * hd  # one group's rows
    rows = []
    for j, g in enumerate(kv.tolist()):
        inner = q[j * group : (j + 1) * group] - g * group  # query heads inside the group, local
        rows.append(g * per + torch.cat([_blocks(inner, hd), group * hd + torch.arange(2 * hd)]))
    return torch.cat(rows)


def norm_rescale(state: dict[str, Any], arch: Arch, seed: int, spread: float = 2.0) -> dict[str, Any]:
    """Function-preserving rescaling (see the module docstring); factors log-uniform in [1/spread, spread]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}

    def factors(n: int) -> Any:
        return torch.exp((torch.rand(n, generator=g) * 2 - 1) * math.log(spread))

    if arch.post_ln:
        for att in arch.attention_prefixes(out):
            sq, sv = factors(arch.d_model), factors(arch.d_model)
            for key, f in ((f"{att}.self.query", sq), (f"{att}.self.key", 1 / sq), (f"{att}.self.value", sv)):
                out[key + ".weight"] = out[key + ".weight"] * f[:, None]
                out[key + ".bias"] = out[key + ".bias"] * f
            out[f"{att}.output.dense.weight"] = out[f"{att}.output.dense.weight"] / sv[None, :]
        return out
    for norm, readers, _conv1d, gemma in arch.norm_readers(out):
        w = out[norm + ".weight"]
        s = factors(w.shape[0])
        out[norm + ".weight"] = (s * (1 + w) - 1) if gemma else w * s
        if norm + ".bias" in out:
            out[norm + ".bias"] = out[norm + ".bias"] * s
        for lin in readers:
            key = lin + ".weight"
            out[key] = out[key] / (s[:, None] if arch.role(key).in_axis == 0 else s[None, :])  # Conv1D readers are [in, out]
    return out


def random_rotation(d: int, seed: int, fix_ones: bool = True) -> Any:
    """A random ``d x d`` orthogonal matrix (Haar, float64); ``fix_ones``: ``Q 1 = 1``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if not fix_ones:
        q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]
    u = torch.full((d, 1), d**-0.5, dtype=torch.float64)
    basis = torch.linalg.qr(torch.cat([u, torch.randn(d, d - 1, generator=g, dtype=torch.float64)], 1)).Q[:, 1:]  # the complement of 1
    inner = random_rotation(d - 1, seed + 1, fix_ones=False)
    return u @ u.t() + basis @ inner @ basis.t()


def rotate_resid(state: dict[str, Any], arch: Arch, seed: int, fix_ones: bool = True) -> dict[str, Any]:
    """Norm gains folded, then the residual stream rotated (see the module docstring)."""
    import torch

    if arch.post_ln:
        raise XsaeError("a post-LN model's norms sit on the residual stream: no rotation of it preserves the function", "use a permutation")
    out = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}
    folded: set[str] = set()
    for norm, readers, _conv1d, gemma in arch.roles.norm_readers(arch.n_layers, False, out):
        w = out[norm + ".weight"].double()
        gain = (1 + w) if gemma else w
        out[norm + ".weight"] = (torch.zeros_like(w) if gemma else torch.ones_like(w)).to(state[norm + ".weight"].dtype)
        if norm + ".bias" in out:
            out[norm + ".bias"] = (out[norm + ".bias"].double() / gain).to(state[norm + ".bias"].dtype)
        for lin in readers:
            key = lin + ".weight"
            in0 = arch.role(key).in_axis == 0  # GPT-2's Conv1D readers are [in, out]; its head is not
            out[key] = (out[key].double() * (gain[:, None] if in0 else gain[None, :])).to(state[key].dtype)  # a tied head gets its own tensor
        folded.add(norm + ".weight")
    unfolded = [k for k in out if k.endswith(".weight") and arch.role(k).role == "norm" and k not in folded and torch.is_tensor(out[k]) and out[k].dim() == 1]
    if unfolded:
        raise XsaeError(f"norm {unfolded[0]} has no readers to absorb its gain, so the residual stream cannot be rotated", "use a permutation")
    q = random_rotation(arch.d_model, seed, fix_ones).t()  # right-multiplied: x Q^T
    for name, t in out.items():
        if not torch.is_tensor(t) or not t.is_floating_point():
            continue
        role = arch.role(name)
        axis = role.axis_of(RESID)
        if axis is None or (role.role == "norm" and name.endswith(".weight")):  # folded gains are all ones
            continue
        x = t.double().movedim(axis, -1) @ q
        out[name] = x.movedim(-1, axis).to(t.dtype).contiguous()
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
    if kind == "rotate_resid":
        return rotate_resid(state, arch, seed)
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
            assert mask_id is not None, "a masked-LM fine-tune needs the mask token's id"
            x = torch.where(sel, torch.full_like(x, int(mask_id)), x)
            loss = model(input_ids=x, labels=labels).loss
        else:
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
