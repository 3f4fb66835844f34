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
   applied by the same code as :mod:`transforms` (``permutation_axes``, over the tensor roles of
   the model's anatomy, :mod:`xsae_cli.zoo.anatomy`), so they are function preserving by the
   same tests.

``canonical(T(m)) == canonical(m)`` up to float rounding for every function-preserving transform
``T`` of :mod:`transforms` (tested for all supported families and the real models). Not invariant
to training: a fine-tune moves the keys, so its sorted order differs from its base's where keys
are close.

Streaming: :func:`plan_from` reads every tensor once and keeps only per-index vectors (norms and
gains, a few floats per coordinate); :meth:`CanonicalPlan.apply` then rewrites one tensor at a
time, so canonicalising holds one tensor, like tokenising. A family whose tensor roles the anatomy
does not know (or a layout whose names it does not find) has no canonical form: the view says why
and the model falls back to its weights as stored (``register_view`` at the end of this file).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from xsae_cli.sane.transforms import Arch, permutation_axes
from xsae_cli.sane.views import View, register_view
from xsae_cli.zoo.anatomy import EMBEDDINGS, RESID, TensorRole, anatomy_of

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
        role = self.arch.role(name)
        if name in self.col_scale:  # per input coordinate: axis 1 of an [out, in] weight, 0 of GPT-2's Conv1D [in, out]
            s = self.col_scale[name]
            scales.append(s[:, None] if role.in_axis == 0 else s[None, :])
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
            for axis, idx in permutation_axes(role, x, self.perms):
                if idx is not None:
                    x = x.index_select(axis, idx)
        return x


def arch_of(resolved: Any) -> tuple[Arch | None, str]:
    """The anatomy of a resolved model (from the config.json the zoo read), or None and why not."""
    return anatomy_of(resolved)


def _add(acc: dict[Any, Any], key: Any, v: Any) -> None:
    acc[key] = v if key not in acc else acc[key] + v


def _writer_role(arch: Arch, role: TensorRole, name: str) -> str | None:
    """Which sort key a tensor feeds: the embeddings and the attention-output and MLP-down weights
    write the residual stream; a post-LN model's query/key/value rows and biases are balanced."""
    if role.role in EMBEDDINGS:
        return "embedding"
    if role.role in ("o", "down") and name.endswith(".weight"):
        return "attn_out" if role.role == "o" else "mlp_down"
    if arch.post_ln and role.role in ("q", "k", "v") and name.endswith((".weight", ".bias")):
        return "bert_qkv"
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
    post_ln = arch.post_ln
    for name, t in items:
        names.append(name)
        if not torch.is_tensor(t) or not t.is_floating_point():
            continue
        if t.dim() == 1:  # norm gains and biases: a few floats per coordinate
            norms[name] = t.detach().double().clone()
        if not orders:
            continue
        tr = arch.role(name)
        role = _writer_role(arch, tr, name)
        if role is None:
            continue
        layer = tr.block
        if role == "embedding":
            _add(resid, "r", _sqsum(t, 0))
        elif role in ("attn_out", "mlp_down") and layer is not None and (i_dim := tr.axis_of(RESID)) is not None:
            # the residual axis is "out": rows of an [out, in] weight, columns of GPT-2's Conv1D [in, out]
            r_dim = 1 - i_dim
            if not (post_ln and role == "attn_out"):  # post-LN (BERT) balances these columns: not a key
                _add(resid, "r", _sqsum(t, r_dim))
            _add(heads if role == "attn_out" else mlp, layer, _sqsum(t, i_dim))
        elif role == "bert_qkv" and layer is not None:
            _add(bert_rows, name.rsplit(".", 1)[0], _sqsum(t, 1) if t.dim() == 2 else t.detach().double() ** 2)
    if post_ln:  # BERT's per-head key is built from value rows and output columns below
        for layer in list(heads):
            bert_rows[f"o{layer}"] = heads.pop(layer)

    plan = CanonicalPlan(arch)
    # 1. scales
    if post_ln:
        for att in arch.attention_prefixes(names):
            li = arch.block(att + ".")
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
                heads[li] = v.sqrt() * o.sqrt()
    else:
        for norm, readers, _conv1d, gemma in arch.norm_readers(names):
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
        return None, f"no {arch.model_type} tensor names found (embeddings, attention outputs, MLP down projections)"
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


def canonical_view(resolved: Any, warn: Any = None) -> tuple[Any, str]:
    """The view: the canonical stream, or ``(None, why)`` when the model has no canonical form."""
    from xsae_cli.zoo.weights import iter_weights, tensor_index

    stream, info = canonical_stream(resolved, iter_weights)
    if not info["applied"]:
        return None, info["reason"]
    return (tensor_index(resolved), stream, {"view": "canonical", **info}), ""


register_view(View("canonical", canonical_view, fallback="weights", help="weights with neurons, heads and residual coordinates sorted", on_fallback="trying its canonical form"))
