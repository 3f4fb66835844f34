"""Canonical form: one representative of a model's function-preserving orbit, taken before tokenising.

Why: permuting MLP neurons, attention heads or residual-stream coordinates, or moving a norm's
per-coordinate gain into the linears that read it, leaves a network's function unchanged but
scrambles the chunk stream SANE reads. Teaching the invariance through contrastive views (the
SANE recipe) was measured not to work: in the lineage benchmark a fully permuted model found its
base 0.40 of the time, below a per-tensor statistics baseline (1.00). So the symmetries are
removed by construction, and every model SANE sees is in this form:

1. **Scales.** Each pre-norm's gain is folded into its readers: the gain becomes its sign, the
   readers' input columns are multiplied by its absolute value and the norm's bias divided by it.
   BERT (post-LN, whose norm output *is* the residual stream) has no such fold; there each
   query/key row pair and each value row / output column pair is balanced to equal norms,
   which removes the ``q * s, k / s`` and ``v * s, o / s`` rescalings.
2. **Order.** Residual coordinates, attention heads (key/value groups, then the query heads
   inside a group) and MLP neurons are sorted by keys that neither the permutations nor the
   scalings change: squared norms on the *writer* side (embedding columns and attention-output
   and MLP-down rows for the residual stream, output columns per head, down columns per neuron;
   in BERT, per head, the sum of value-row times output-column norms). The permutations are
   applied with the same per-architecture rules as :mod:`transforms`, so they are function
   preserving by the same tests.

``canonical(T(m)) == canonical(m)`` up to float rounding for every function-preserving transform
``T`` of :mod:`transforms` (tested for all supported families and the real models). Not invariant
to training: a fine-tune moves the keys, so its sorted order differs from its base's where keys
are close.

Streaming: :func:`plan_from` reads every tensor once and keeps only per-index vectors (norms and
gains, a few floats per coordinate); :meth:`CanonicalPlan.apply` then rewrites one tensor at a
time, so canonicalising holds one tensor, like tokenising. Architectures :mod:`transforms` does
not know (or a layout whose names it does not find) are passed through unchanged, with a reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from xsae_cli.sane.transforms import Arch, _layer, _rule_bert, _rule_gpt2, _rule_llama, _rule_neox, bert_attention, norm_readers

EPS = 1e-12


class _Fixed:
    """The permutation interface of :class:`transforms._Perms` with given (canonical) orders."""

    def __init__(self, arch: Arch, resid: Any, mlp: dict[int, Any], heads: dict[int, tuple[Any, Any]]) -> None:
        self.arch = arch
        self.resid = resid
        self._mlp = mlp
        self._heads = heads

    def mlp(self, layer: int, size: int) -> Any:
        p = self._mlp.get(layer)
        if p is not None and p.numel() != size:
            raise ValueError(f"layer {layer}: MLP key has {p.numel()} entries, the tensor {size}")
        return p

    def heads(self, layer: int) -> tuple[Any, Any] | tuple[None, None]:
        return self._heads.get(layer, (None, None))


def _rule(arch: Arch) -> Any:
    return {"gpt2": _rule_gpt2, "gpt_neox": _rule_neox, "bert": _rule_bert}.get(arch.model_type, _rule_llama)


@dataclass
class CanonicalPlan:
    """What :func:`plan_from` learned: per-tensor scale vectors and the canonical orders."""

    arch: Arch
    col_scale: dict[str, Any] = field(default_factory=dict)  # weight name -> factor per input coordinate
    row_scale: dict[str, Any] = field(default_factory=dict)  # weight or bias name -> factor per output row
    replace: dict[str, Any] = field(default_factory=dict)  # norm weight/bias name -> its canonical value
    perms: _Fixed | None = None
    sorted_groups: dict[str, int] = field(default_factory=dict)  # "resid"/"heads"/"mlp" -> how many orders

    def apply(self, name: str, t: Any) -> Any:
        """The canonical version of one tensor (float32 when changed, the input itself otherwise)."""
        import torch

        if not torch.is_tensor(t) or not t.is_floating_point():
            return t
        x = t
        if name in self.replace:
            x = self.replace[name].to(t.dtype)
        scales = []
        if name in self.col_scale:
            s = self.col_scale[name]
            scales.append(s[:, None] if self.arch.model_type == "gpt2" else s[None, :])
        if name in self.row_scale:
            s = self.row_scale[name]
            scales.append(s[:, None] if x.dim() == 2 else s)
        if scales:  # one float32 copy, scaled in place (never the caller's tensor)
            x = x.float()
            if x.data_ptr() == t.data_ptr():
                x = x.clone()
            for sc in scales:
                x.mul_(sc)
        if self.perms is not None:
            for axis, idx in _rule(self.arch)(name, x, self.arch, self.perms):
                if idx is not None:
                    x = x.index_select(axis, idx)
        return x


def arch_of(resolved: Any) -> tuple[Arch | None, str]:
    """The :class:`Arch` of a resolved model (from the config.json the zoo read), or None and why not."""
    from xsae_cli.core.errors import XsaeError

    config = getattr(resolved, "config", None)
    if not config:
        return None, "no config.json"
    try:
        return Arch.from_config(config), ""
    except (XsaeError, TypeError, ValueError, KeyError) as e:
        return None, str(e).split("\n")[0]


def _add(acc: dict[Any, Any], key: Any, v: Any) -> None:
    acc[key] = v if key not in acc else acc[key] + v


_WRITERS: dict[str, tuple[tuple[str, str], ...]] = {
    # model type -> (name suffix, role); GPT-2/NeoX/Llama-like/BERT names as transformers saves them
    "llama": (("embed_tokens.weight", "embedding"), ("self_attn.o_proj.weight", "attn_out"), ("mlp.down_proj.weight", "mlp_down")),
    "gpt2": (("wte.weight", "embedding"), ("wpe.weight", "embedding"), ("attn.c_proj.weight", "attn_out"), ("mlp.c_proj.weight", "mlp_down")),
    "gpt_neox": (("embed_in.weight", "embedding"), ("attention.dense.weight", "attn_out"), ("mlp.dense_4h_to_h.weight", "mlp_down")),
    "bert": (
        ("word_embeddings.weight", "embedding"), ("position_embeddings.weight", "embedding"), ("token_type_embeddings.weight", "embedding"),
        ("attention.output.dense.weight", "attn_out"), ("output.dense.weight", "mlp_down"),
        ("attention.self.query.weight", "bert_qkv"), ("attention.self.key.weight", "bert_qkv"), ("attention.self.value.weight", "bert_qkv"),
        ("attention.self.query.bias", "bert_qkv"), ("attention.self.key.bias", "bert_qkv"), ("attention.self.value.bias", "bert_qkv"),
    ),
}


def _writer_role(model_type: str, name: str) -> str | None:
    """Which key a tensor feeds (first matching suffix wins: attention output before MLP output)."""
    for suffix, role in _WRITERS.get(model_type, _WRITERS["llama"]):
        if name.endswith(suffix):
            return role
    return None


def _sqsum(t: Any, dim: int) -> Any:
    """Sum of squares over ``dim`` of a 2-D tensor in float64, a block of rows at a time (so a
    bf16 embedding matrix is never copied whole to float64)."""
    import torch

    t = t.detach()
    rows = max(1, (1 << 20) // max(t.shape[1], 1))
    if dim == 0:
        out = torch.zeros(t.shape[1], dtype=torch.float64)
        for i in range(0, t.shape[0], rows):
            out += (t[i : i + rows].double() ** 2).sum(0)
        return out
    return torch.cat([(t[i : i + rows].double() ** 2).sum(1) for i in range(0, t.shape[0], rows)])


def plan_from(arch: Arch, items: Iterable[tuple[str, Any]], orders: bool = True) -> tuple[CanonicalPlan | None, str]:
    """Read every tensor once; return the plan, or None and the reason when nothing matched.

    ``orders=False``: only the norm-gain fold (what the circuit view needs: its dot products cancel
    every permutation and BERT's paired rescalings by themselves), so no weight matrix is read."""
    import torch

    resid: dict[str, Any] = {}
    heads: dict[int, Any] = {}  # layer -> squared norm per query-head coordinate (writer side)
    mlp: dict[int, Any] = {}
    norms: dict[str, Any] = {}  # norm weight/bias name -> tensor (a few floats per coordinate)
    bert_rows: dict[str, Any] = {}  # q/k/v row norms^2 (with bias), output column norms^2
    names: list[str] = []
    mt = arch.model_type
    for name, t in items:
        names.append(name)
        if not torch.is_tensor(t) or not t.is_floating_point():
            continue
        if t.dim() == 1:  # norm gains and biases: a few floats per coordinate
            norms[name] = t.detach().double().clone()
        if not orders:
            continue
        role = _writer_role(mt, name)
        if role is None:
            continue
        layer = _layer(name)
        if role == "embedding":
            _add(resid, "r", _sqsum(t, 0))
        elif role in ("attn_out", "mlp_down") and layer is not None:
            # [out, in] except GPT-2's Conv1D [in, out]: the residual axis is "out"
            r_dim, i_dim = (0, 1) if mt == "gpt2" else (1, 0)
            if not (mt == "bert" and role == "attn_out"):  # BERT balances these columns: not a key
                _add(resid, "r", _sqsum(t, r_dim))
            _add(heads if role == "attn_out" else mlp, layer, _sqsum(t, i_dim))
        elif role == "bert_qkv" and layer is not None:
            _add(bert_rows, name.rsplit(".", 1)[0], _sqsum(t, 1) if t.dim() == 2 else t.detach().double() ** 2)
    if mt == "bert":  # BERT's per-head key is built from value rows and output columns below
        for layer in list(heads):
            bert_rows[f"o{layer}"] = heads.pop(layer)

    plan = CanonicalPlan(arch)
    # 1. scales
    if mt == "bert":
        for att in bert_attention(names):
            li = _layer(att + ".")
            q, k, v = (bert_rows.get(f"{att}.self.{x}") for x in ("query", "key", "value"))
            o = bert_rows.get(f"o{li}")
            if q is None or k is None or v is None or o is None:
                continue
            r = ((k.sqrt() + EPS) / (q.sqrt() + EPS)).sqrt()
            c = ((o.sqrt() + EPS) / (v.sqrt() + EPS)).sqrt()
            for suffix in ("weight", "bias"):
                plan.row_scale[f"{att}.self.query.{suffix}"] = r.float()
                plan.row_scale[f"{att}.self.key.{suffix}"] = (1 / r).float()
                plan.row_scale[f"{att}.self.value.{suffix}"] = c.float()
            plan.col_scale[f"{att}.output.dense.weight"] = (1 / c).float()
            if li is not None:  # a head's key: sum of |v_i| |o_i| over its coordinates (balanced |o_i|^2)
                heads[li] = (v.sqrt() * o.sqrt())
    else:
        for norm, readers, _conv1d, gemma in norm_readers(arch, names):
            w = norms.get(norm + ".weight")
            if w is None:
                continue
            gain = (1 + w) if gemma else w
            s = gain.abs()
            s = torch.where(s > EPS, s, torch.ones_like(s))
            sign = gain / s
            plan.replace[norm + ".weight"] = ((sign - 1) if gemma else sign).float()
            if norm + ".bias" in norms:
                plan.replace[norm + ".bias"] = (norms[norm + ".bias"] / s).float()
            for lin in readers:
                plan.col_scale[lin + ".weight"] = s.float()
    if not orders:
        return plan, ""
    # 2. orders
    def order(key: Any) -> Any:
        return torch.argsort(key, stable=True)

    r_perm = None
    if "r" in resid:
        if resid["r"].numel() != arch.d_model:
            return None, f"residual key has {resid['r'].numel()} entries, hidden size is {arch.d_model}"
        r_perm = order(resid["r"])
    mlp_perm = {layer: order(k) for layer, k in mlp.items()}
    head_perm: dict[int, tuple[Any, Any]] = {}
    a = arch
    for layer, k in heads.items():
        if k.numel() != a.n_heads * a.head_dim:
            return None, f"layer {layer}: head key has {k.numel()} entries, expected {a.n_heads} x {a.head_dim}"
        per_q = k.reshape(a.n_heads, a.head_dim).sum(1)
        groups = a.n_heads // a.n_kv_heads
        kv = order(per_q.reshape(a.n_kv_heads, groups).sum(1))
        q = torch.cat([g * groups + order(per_q[g * groups : (g + 1) * groups]) for g in kv.tolist()])
        head_perm[layer] = (q, kv)
    if r_perm is None and not mlp_perm and not head_perm:
        return None, f"no {mt} tensor names found (embeddings, attention outputs, MLP down projections)"
    plan.perms = _Fixed(arch, r_perm, mlp_perm, head_perm)
    plan.sorted_groups = {"resid": int(r_perm is not None), "heads": len(head_perm), "mlp": len(mlp_perm)}
    return plan, ""


def canonicalize(state: dict[str, Any], arch: Arch) -> dict[str, Any]:
    """The canonical form of a whole state dict (tests, small models); see :func:`canonical_stream`."""
    plan, why = plan_from(arch, state.items())
    if plan is None:
        raise ValueError(why)
    return {k: plan.apply(k, v) for k, v in state.items()}


def canonical_stream(resolved: Any, iter_weights: Any, warn: Any = None) -> tuple[Iterator[tuple[str, Any]], dict[str, Any]]:
    """``(stream, info)``: the model's tensors in canonical form, one at a time (two passes).

    ``info`` says whether the form was applied (``{"applied": bool, "reason"?, "sorted"?}``); it
    is filled in before the stream is returned, so it can be recorded with the cache.
    """
    arch, why = arch_of(resolved)
    plan = None
    if arch is not None:
        plan, why = plan_from(arch, iter_weights(resolved))
    if plan is None:
        if warn is not None:
            warn(f"no canonical form for {getattr(resolved, 'source', resolved)} ({why}): tokenised as stored, so its permuted copies will not be recognised")
        return iter_weights(resolved), {"applied": False, "reason": why}

    def stream() -> Iterator[tuple[str, Any]]:
        for name, t in iter_weights(resolved):
            yield name, plan.apply(name, t)

    return stream(), {"applied": True, "model_type": plan.arch.model_type, "sorted": plan.sorted_groups, "scaled": len(plan.col_scale) + len(plan.row_scale)}

