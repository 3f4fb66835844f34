"""Tensor roles derived from the model itself: inspection of the loaded modules plus one probe.

Why: per-family name rules (:mod:`roles`) cover the families someone wrote out; users bring others
(and next year's). Every role the views and transforms need can be read off a loaded module and
one short forward pass, whatever the tensors are called:

- **embedding / head**: ``get_input_embeddings()`` (else the largest ``nn.Embedding``) and
  ``get_output_embeddings()``; tied when both hold the same storage. Other ``nn.Embedding``\\ s of
  the residual width outside the blocks are learned positions;
- **blocks**: the longest ``nn.ModuleList`` (:func:`blocks.module_blocks`);
- **the probe** (:func:`derive`): one forward pass on 8 random tokens with a hook on every leaf
  module records, in call order, what each one read and wrote. In block 0: a *norm* is a leaf of
  residual width whose output, with its gain (and bias) taken out, is its (centred) input
  scaled to about unit RMS per position
  (LayerNorm and RMSNorm, with or without bias; a gain stored as ``gain - 1`` is recognised the
  same way). A *reader* is a linear map (``nn.Linear`` or a transposed ``[in, out]`` weight such as
  GPT-2's Conv1D, told apart numerically) whose input equals the block input or a norm's output; a
  *writer* is any other linear map that outputs the residual width. Readers up to a writer form one
  sub-layer; the sub-layer whose writer reads ``n_heads x head_dim`` values and whose readers
  output ``q + 2 kv`` widths is the attention, the other the MLP. Parallel blocks (one norm feeding
  both, as in GPT-J or Phi) come out the same way. The key/value head count is read off the
  shapes (so multi-query models whose config keeps ``num_kv_heads = num_heads`` are right);
  gate vs up: ``down``'s input is ``act(gate) * up`` for one of the standard activations;
- **a fused q/k/v map**: its row layout (``[q | k | v]``, per head ``[h, (q|k|v), d]``, per
  key/value group ``[g, (q.. | k | v), d]``) is found by trying each: the layout for which swapping
  two heads in the fused rows and in the output map's columns leaves the logits unchanged;
- **post-LN** (the block output is a norm's output, as in BERT): no gain can be folded.

Finally the derived roles are checked as the hand rules are: a random permutation of MLP neurons,
heads and residual coordinates and a random rescaling of the norm gains, applied by
:mod:`xsae_cli.sane.transforms` over these roles, must leave the probe's logits unchanged (to
1e-4 of their largest value); otherwise the anatomy is refused with what did not hold.

A model the probe cannot run (too large for memory: the float32 size is estimated on the meta
device first and refused with what it needs; no input embedding; no stack of blocks; a block
layout that does not fit the rules above) raises :class:`AnatomyError` naming what was missing.
Derived roles are keyed by the tensor's path *inside* its block (``attn.q_proj.weight``), so a
checkpoint saved from the base model (``h.0...``) and one saved from the LM (``transformer.h.0...``)
read the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from xsae_cli.core.errors import XsaeError
from xsae_cli.zoo.anatomy.blocks import block_pattern, module_blocks
from xsae_cli.zoo.anatomy.roles import HEADS_KV, HEADS_Q, MLP, QKV_CAT, QKV_GROUPED, QKV_HEADS, RESID, Axes, TensorRole
from xsae_cli.zoo.anatomy.shape import Shape, config_get, config_value

PROBE_TOKENS = 8
FUNCTION_TOL = 1e-4  # max |logit change| / max |logit| a function-preserving transform may cause
NORM_TOL = 1e-4  # 1 - cosine of a norm's output, gain taken out, with its (centred) input


class AnatomyError(XsaeError):
    """The anatomy cannot be derived: the message names what was missing."""


@dataclass(frozen=True)
class DerivedRules:
    """Roles found by :func:`derive` (the :class:`roles.RoleRules` interface)."""

    stack: str  # the block stack's last path segment ("h", "layers")
    inblock: dict[str, tuple[str, Axes]] = field(default_factory=dict)  # path inside a block -> role
    outside: dict[str, tuple[str, Axes]] = field(default_factory=dict)  # module-path tensor name -> role
    norm_pairs: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (norm, readers) inside a block (module paths)
    final_pair: tuple[str, str] | None = None  # (final norm, head) outside the blocks
    conv1d: bool = False
    gemma_gain: bool = False
    post_ln: bool = False
    tied_default: bool = False
    n_kv_heads: int = 0  # read off the shapes
    missing: str = ""  # what the anatomy holds without (recorded, e.g. "no gate")

    def _split(self, name: str) -> tuple[int, str] | None:
        m = block_pattern((self.stack,)).search(name)
        return (int(m.group(1)), name[m.end() + 1 :]) if m else None

    def role(self, name: str) -> TensorRole:
        where = self._split(name)
        if where is not None:
            role, axes = self.inblock.get(where[1], ("other", ()))
            return TensorRole(role, where[0], axes)
        for full, (role, axes) in self.outside.items():
            if name == full or full.endswith("." + name) or name.endswith("." + full):
                return TensorRole(role, None, axes)
        return TensorRole("other", None, ())

    def _prefixes(self, names: set[str]) -> dict[int, str]:
        """Block number -> its path in ``names`` (``transformer.h.3``)."""
        out: dict[int, str] = {}
        pat = block_pattern((self.stack,))
        for n in names:
            m = pat.search(n)
            if m:
                out.setdefault(int(m.group(1)), n[: m.end()].lstrip("."))
        return out

    def _stored(self, names: set[str], module_path: str) -> str | None:
        for n in names:
            if n.endswith(".weight"):
                stem = n[: -len(".weight")]
                if stem == module_path or module_path.endswith("." + stem) or stem.endswith("." + module_path):
                    return stem
        return None

    def norm_readers(self, n_layers: int, tied: bool, names: Any) -> list[tuple[str, list[str], bool, bool]]:
        names = set(names)
        out: list[tuple[str, list[str]]] = []
        for _i, pre in sorted(self._prefixes(names).items()):
            for norm, readers in self.norm_pairs:
                out.append((f"{pre}.{norm}", [f"{pre}.{r}" for r in readers]))
        if self.final_pair is not None and not tied:
            final_norm, head = (self._stored(names, p) for p in self.final_pair)
            if final_norm is not None and head is not None:
                out.append((final_norm, [head]))
        return [(n, r, self.conv1d, self.gemma_gain) for n, r in out if n + ".weight" in names and all(x + ".weight" in names for x in r)]

    def attention_prefixes(self, names: Any) -> list[str]:
        return []


def _first_tensor(x: Any) -> Any:
    """The first tensor of a module's inputs or outputs, copied (a later in-place add must not
    change what the probe saw)."""
    import torch

    if isinstance(x, (tuple, list)):
        x = x[0] if x else None
    elif x is not None and not torch.is_tensor(x):
        x = getattr(x, "last_hidden_state", None)
    return x.detach().clone() if torch.is_tensor(x) else None


def _same(a: Any, b: Any) -> bool:
    import torch

    return a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a.detach(), b.detach()))


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def probe_bytes(n_params: int) -> int:
    """What a float32 probe of ``n_params`` parameters needs: the weights plus a copy (the check)."""
    return 3 * 4 * n_params + (64 << 20)


def _linear_layout(m: Any, x: Any, y: Any) -> str | None:
    """ "linear" (``y = x W^T + b``), "conv1d" (``y = x W + b``) or None (not an affine map of x)."""
    import torch

    w = getattr(m, "weight", None)
    if w is None or not torch.is_tensor(w) or w.dim() != 2 or x is None or y is None or not x.is_floating_point():
        return None
    b = getattr(m, "bias", None)
    xi, yo = x.shape[-1], y.shape[-1]
    for layout, ok in (("linear", w.shape == (yo, xi)), ("conv1d", w.shape == (xi, yo))):
        if not ok:
            continue
        wf = w.detach().float()
        ref = x.float() @ (wf.t() if layout == "linear" else wf)
        if torch.is_tensor(b):
            ref = ref + b.detach().float()
        if float((ref - y.float()).abs().max()) <= 1e-3 * float(ref.abs().max()) + 1e-6:
            return layout
    return None


def _norm_kind(m: Any, x: Any, y: Any, d: int) -> str | None:
    """ "plain" or "offset" (gain stored as gain - 1) when ``m`` normalises ``x``; else None."""
    import torch

    if x is None or y is None or x.shape != y.shape or x.shape[-1] != d or _same(x, y):
        return None
    own = [p for _, p in m.named_parameters(recurse=False)]
    if any(p.dim() != 1 or p.shape[0] != d for p in own):
        return None
    w = getattr(m, "weight", None)
    b = getattr(m, "bias", None)
    w = w.detach() if torch.is_tensor(w) else w
    b = b.detach() if torch.is_tensor(b) else b
    yy = y.float() - (b.float() if torch.is_tensor(b) else 0)
    gains = [("plain", w.float())] if torch.is_tensor(w) else [("plain", torch.ones(d))]
    if torch.is_tensor(w):
        gains.append(("offset", 1 + w.float()))
    xs = x.float()
    for kind, g in gains:
        if bool((g.abs() < 1e-6).any()):
            continue
        yh = yy / g
        for ref in (xs, xs - xs.mean(-1, keepdim=True)):  # RMSNorm, LayerNorm: y ~ gain * ref / scale
            if bool((torch.nn.functional.cosine_similarity(yh, ref, dim=-1) > 1 - NORM_TOL).all()) and bool(((yh.pow(2).mean(-1).sqrt() - 1).abs() < 0.2).all()):
                return kind
    return None


_ACTS = ("silu", "gelu", "gelu_tanh", "relu")


def _act(name: str, x: Any) -> Any:
    import torch.nn.functional as F

    acts: dict[str, Callable[[Any], Any]] = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}
    return acts[name](x)


def _mlp_roles(readers: list[Any], writer: Any) -> dict[str, str]:
    """Module path -> up / gate of an MLP's readers (``down``'s input is ``act(gate) * up``)."""
    import torch

    if len(readers) == 1:
        return {readers[0].path: "up"}
    if len(readers) == 2:
        z = writer.x.float()
        for gi, ui in ((0, 1), (1, 0)):
            g, u = readers[gi].y.float(), readers[ui].y.float()
            for a in _ACTS:
                if g.shape == u.shape == z.shape and torch.allclose(_act(a, g) * u, z, rtol=1e-3, atol=1e-5 * (1 + float(z.abs().max()))):
                    return {readers[gi].path: "gate", readers[ui].path: "up"}
    raise AnatomyError(f"MLP with {len(readers)} input maps of widths {[r.y.shape[-1] for r in readers]} that are not up (and act(gate) * up)", "a fused gate/up map is not derived")


@dataclass
class _Call:
    path: str  # module path relative to the block
    module: Any
    x: Any
    y: Any
    layout: str | None = None  # linear / conv1d
    norm: str | None = None


def _record(model: Any, ids: Any, block_path: str) -> tuple[list[_Call], Any, Any, Any]:
    """Leaf calls inside block 0 (in order), block 0's input and output, and the logits."""
    import torch

    calls: list[_Call] = []
    io: dict[str, Any] = {}
    handles = []
    blk0 = block_path + ".0" if block_path else "0"
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if name.startswith(blk0 + ".") and not list(m.children()):

            def hook(mod: Any, args: Any, out: Any, name: str = name) -> None:
                x = _first_tensor(args) if args else None
                calls.append(_Call(name[len(blk0) + 1 :], mod, x, _first_tensor(out)))

            handles.append(m.register_forward_hook(hook))

    def pre(mod: Any, args: Any, kwargs: Any) -> None:
        io["x"] = _first_tensor(args) if args else kwargs.get("hidden_states")

    def post(mod: Any, args: Any, kwargs: Any, out: Any) -> None:
        io["y"] = _first_tensor(out)

    blk = modules[blk0]
    handles.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
    handles.append(blk.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = _logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    return calls, io.get("x"), io.get("y"), logits


def _logits(model: Any, ids: Any) -> Any:
    out = model(input_ids=ids)
    t = getattr(out, "logits", None)
    return t if t is not None else _first_tensor(out)


def _shape_of(model: Any, config: Any) -> tuple[int, int]:
    """(query heads, head size) from the config, else from an attention module's attributes."""
    heads = config_value(config, "heads") if config is not None else None
    hd = config_value(config, "head_dim") if config is not None else None
    if heads is None:
        for m in model.modules():
            for attr in ("num_heads", "n_head", "num_attention_heads", "n_heads"):
                if isinstance(getattr(m, attr, None), int):
                    heads = getattr(m, attr)
                    break
            if heads is not None:
                break
    if heads is None:
        raise AnatomyError("no attention head count (config num_attention_heads or a module's num_heads)")
    d = model.get_input_embeddings().embedding_dim
    return int(heads), int(hd or d // int(heads))


def derive(model: Any, config: Any = None, check: bool = True) -> tuple[DerivedRules, Shape]:
    """Derive the roles of a loaded model's tensors (see the module docstring); ``check``: verify
    them by a function-preserving transform of the probe model (its weights are restored)."""
    import torch
    from torch import nn

    config = config if config is not None else getattr(model, "config", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        embs = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        emb = max(embs, key=lambda m: m.num_embeddings) if embs else None
        if emb is not None and not hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings = lambda: emb
    if emb is None or not isinstance(emb, nn.Embedding):
        raise AnatomyError("no input token embedding (get_input_embeddings() or an nn.Embedding)")
    found = module_blocks(model)
    if found is None or not len(found[1]):
        raise AnatomyError("no stack of blocks (an nn.ModuleList)")
    block_path, blocks = found
    d, vocab = emb.embedding_dim, emb.num_embeddings
    n_heads, hd = _shape_of(model, config)
    names = {id(m): n for n, m in model.named_modules()}
    ids = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        _jitter(model)
        return _derive(model, config, emb, block_path, blocks, d, vocab, n_heads, hd, names, ids, check)
    finally:
        model.load_state_dict(original)
        model.train(was_training)


def _jitter(model: Any) -> None:
    """Give every 1-D parameter (norm gains, biases) distinct values: a fresh model's norms are all
    ones, so two norms of one input (parallel blocks) would give equal outputs, and a gain stored
    as ``gain - 1`` would be all zeros. The model computes a different function, which the probe
    and its check use alike; the weights are restored afterwards."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.is_floating_point():
                p.add_(0.1 * (p.abs().mean() + 0.1) * torch.randn(p.shape, generator=g).to(p.dtype))


def _derive(model: Any, config: Any, emb: Any, block_path: str, blocks: Any, d: int, vocab: int, n_heads: int, hd: int, names: dict[int, str], ids: Any, check: bool) -> tuple[DerivedRules, Shape]:
    import torch
    from torch import nn

    try:
        calls, x0, y0, logits = _record(model, ids, block_path)
    except Exception as e:  # a model the probe cannot run: say what failed
        raise AnatomyError(f"the probe forward pass failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
    if x0 is None:
        raise AnatomyError("block 0's input was not seen in the probe")
    # --- classify block 0's leaves
    resid_reads = [x0]
    norms: list[_Call] = []
    for c in calls:
        c.layout = _linear_layout(c.module, c.x, c.y)
        if c.layout is None:
            c.norm = _norm_kind(c.module, c.x, c.y, d)
            if c.norm is not None:
                norms.append(c)
                resid_reads.append(c.y)
    lin = [c for c in calls if c.layout is not None]
    if not lin:
        raise AnatomyError("no linear maps in block 0")
    layouts = {c.layout for c in lin}
    if len(layouts) != 1:
        raise AnatomyError("block 0 mixes [out, in] and [in, out] weights")
    conv1d = layouts == {"conv1d"}
    post_ln = any(_same(y0, n.y) for n in norms)

    def reads_resid(c: _Call) -> bool:
        return c.x is not None and c.x.shape[-1] == d and any(_same(c.x, r) for r in resid_reads)

    segments: list[tuple[list[_Call], _Call]] = []
    pending: list[_Call] = []
    for c in lin:
        if reads_resid(c):
            pending.append(c)
        elif c.y.shape[-1] == d:
            segments.append((pending, c))
            pending = []
    if pending or len(segments) != 2:
        raise AnatomyError(f"block 0 has {len(segments)} residual writers and {len(pending)} readers after the last ({', '.join(c.path for c in lin)}); expected attention and MLP")
    qw = n_heads * hd
    attn = [s for s in segments if s[1].x.shape[-1] == qw and (sum(r.y.shape[-1] for r in s[0]) - qw) % (2 * hd) == 0 and sum(r.y.shape[-1] for r in s[0]) > qw]
    if len(attn) != 1:
        raise AnatomyError(f"no attention sub-layer with {n_heads} heads of {hd} found in block 0 (writers read {[s[1].x.shape[-1] for s in segments]} values)")
    a_readers, o = attn[0]
    m_readers, down = next(s for s in segments if s is not attn[0])
    kv = (sum(r.y.shape[-1] for r in a_readers) - qw) // (2 * hd)
    if kv < 1 or n_heads % kv:
        raise AnatomyError(f"{kv} key/value heads do not divide {n_heads} query heads")
    w_ax, r_ax = (1, 0) if conv1d else (0, 1)  # (out axis, in axis) of a weight
    inblock: dict[str, tuple[str, Axes]] = {}

    def put(c: _Call, role: str, out_space: str, in_space: str) -> None:
        inblock[c.path + ".weight"] = (role, ((w_ax, out_space), (r_ax, in_space)))
        if torch.is_tensor(getattr(c.module, "bias", None)):
            inblock[c.path + ".bias"] = (role, ((0, out_space),))

    widths = [r.y.shape[-1] for r in a_readers]
    if len(a_readers) == 3:
        q, k, v = a_readers
        if widths[0] != qw:
            q, k, v = sorted(a_readers, key=lambda r: -r.y.shape[-1])
        put(q, "q", HEADS_Q, RESID)
        put(k, "k", HEADS_KV, RESID)
        put(v, "v", HEADS_KV, RESID)
    elif len(a_readers) == 1:
        space = _fused_layout(model, a_readers[0], o, block_path, n_heads, kv, hd, conv1d, ids, logits)
        put(a_readers[0], "qkv", space, RESID)
    else:
        raise AnatomyError(f"attention reads the residual stream through {len(a_readers)} maps of widths {widths}; 3 (q, k, v) or 1 fused are derived")
    put(o, "o", RESID, HEADS_Q)
    for r in m_readers:
        put(r, _mlp_roles(m_readers, down)[r.path], MLP, RESID)
    put(down, "down", RESID, MLP)
    gemma = False
    pairs: list[tuple[str, tuple[str, ...]]] = []
    for n in norms:
        for pname, _p in n.module.named_parameters(recurse=False):
            inblock[f"{n.path}.{pname}"] = ("norm", ((0, RESID),))
        gemma = gemma or n.norm == "offset"
        readers = tuple(c.path for c in lin if _same(c.x, n.y))
        if readers and not post_ln and torch.is_tensor(getattr(n.module, "weight", None)):
            pairs.append((n.path, readers))
    # --- outside the blocks
    outside: dict[str, tuple[str, Axes]] = {names[id(emb)] + ".weight": ("embedding", ((1, RESID),))}
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m is not emb and m.embedding_dim == d and not names[id(m)].startswith(block_path + "."):
            outside[names[id(m)] + ".weight"] = ("pos_embedding", ((1, RESID),))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    final: tuple[str, str] | None = None
    final_norm, others = _outside(model, blocks, block_path, names, d, head, ids)
    outside.update(others)
    if head is not None:
        hname = names[id(head)]
        outside[hname + ".weight"] = ("head", ((1, RESID),))  # a tied copy too (the transforms keep the tie)
        if final_norm is not None:
            gemma = gemma or final_norm[2] == "offset"
            final = (final_norm[0], hname)
    rules = DerivedRules(block_path.split(".")[-1] if block_path else "", inblock, outside, tuple(pairs), final, conv1d, gemma, post_ln, tied, kv)
    shape = Shape(str(config_get(config, "model_type", "") or type(model).__name__), len(blocks), d, n_heads, kv, hd, tied)
    if check:
        _check(model, rules, shape, ids, logits)
    return rules, shape


def _outside(model: Any, blocks: Any, block_path: str, names: dict[int, str], d: int, head: Any, ids: Any) -> tuple[tuple[str, Any, str] | None, dict[str, tuple[str, Axes]]]:
    """The norm between the last block and the head (``(path, module, kind)`` or None), and the
    roles of the other norms and residual readers outside the blocks (an embedding norm, a pooler)."""
    import torch

    seen: dict[str, Any] = {}
    handles = []
    for m in model.modules():
        n = names.get(id(m), "")
        if list(m.children()) or n.startswith(block_path + ".") or m is head:
            continue

        def hook(mod: Any, args: Any, out: Any, n: str = n) -> None:
            seen[n] = (mod, _first_tensor(args) if args else None, _first_tensor(out))

        handles.append(m.register_forward_hook(hook))
    head_in: dict[str, Any] = {}
    last: dict[str, Any] = {}
    if head is not None:
        handles.append(head.register_forward_hook(lambda mod, args, out: head_in.setdefault("x", _first_tensor(args))))
    handles.append(blocks[len(blocks) - 1].register_forward_hook(lambda mod, args, out: last.__setitem__("y", _first_tensor(out))))
    try:
        with torch.no_grad():
            _logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    final = None
    roles: dict[str, tuple[str, Axes]] = {}
    resid: list[Any] = []
    for n, (mod, x, y) in seen.items():
        kind = _norm_kind(mod, x, y, d)
        if kind is None:
            continue
        for pname, _p in mod.named_parameters(recurse=False):
            roles[f"{n}.{pname}"] = ("norm", ((0, RESID),))
        resid.append(y)
        if final is None and head is not None and _same(y, head_in.get("x")) and torch.is_tensor(getattr(mod, "weight", None)):
            final = (n, mod, kind)
    for n, (mod, x, y) in seen.items():
        layout = _linear_layout(mod, x, y)
        if layout is not None and x.shape[-1] == d and (any(_same(x, r) for r in resid) or _same(x, last.get("y"))):
            roles[f"{n}.weight"] = ("pooler", ((0 if layout == "conv1d" else 1, RESID),))
    return final, roles


def _fused_layout(model: Any, qkv: _Call, o: _Call, block_path: str, nh: int, kv: int, hd: int, conv1d: bool, ids: Any, ref: Any) -> str:
    """The fused map's row layout: the one under which a head swap preserves the logits."""
    import torch

    from xsae_cli.sane.transforms import fused_rows

    cands = [QKV_CAT] + ([QKV_HEADS] if kv == nh else [QKV_GROUPED])
    if kv >= 2:
        q_perm, kv_perm = _swap_group(nh, kv)
    else:
        q_perm, kv_perm = torch.tensor([1, 0, *range(2, nh)]), torch.arange(kv)
    blk = dict(model.named_modules())[(block_path + ".0") if block_path else "0"]
    wq = dict(blk.named_modules())[qkv.path]
    wo = dict(blk.named_modules())[o.path]
    saved_q = {k: v.detach().clone() for k, v in wq.named_parameters(recurse=False)}
    saved_o = wo.weight.detach().clone()
    o_cols = (q_perm[:, None] * hd + torch.arange(hd)).reshape(-1)
    hits: list[str] = []
    tried: list[Any] = []
    for space in cands:
        rows = fused_rows(space, q_perm, kv_perm, nh, kv, hd)
        if any(torch.equal(rows, r) for r in tried):  # one layout under two names (multi-query)
            continue
        tried.append(rows)
        with torch.no_grad():
            wq.weight.copy_(saved_q["weight"].index_select(1 if conv1d else 0, rows))
            if "bias" in saved_q:
                wq.bias.copy_(saved_q["bias"][rows])
            wo.weight.copy_(saved_o.index_select(0 if conv1d else 1, o_cols))
            diff = float((_logits(model, ids) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            for k, v in saved_q.items():
                getattr(wq, k).copy_(v)
            wo.weight.copy_(saved_o)
        if diff < FUNCTION_TOL:
            hits.append(space)
    if len(hits) != 1:
        raise AnatomyError(f"the fused q/k/v map's row layout is none of [q|k|v], per head or per group ({qkv.path})")
    return hits[0]


def _swap_group(nh: int, kv: int) -> tuple[Any, Any]:
    import torch

    group = nh // kv
    kv_perm = torch.tensor([1, 0, *range(2, kv)])
    q_perm = torch.cat([g * group + torch.arange(group) for g in kv_perm.tolist()])
    return q_perm, kv_perm


def _check(model: Any, rules: DerivedRules, shape: Shape, ids: Any, ref: Any) -> None:
    """A random full permutation and norm rescaling over the derived roles preserves the logits."""
    import torch

    from xsae_cli.sane.transforms import norm_rescale, permute
    from xsae_cli.zoo.anatomy import Anatomy

    arch = Anatomy(shape.model_type, shape.n_layers, shape.d_model, shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.tied, rules)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        for what, new in (("permuting neurons, heads and residual coordinates", permute(state, arch, "perm_full", 1)), ("moving norm gains into their readers", norm_rescale(state, arch, 2))):
            model.load_state_dict(new)
            with torch.no_grad():
                diff = float((_logits(model, ids) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            if diff > FUNCTION_TOL:
                raise AnatomyError(f"the derived roles do not preserve the function when {what} (logits change {diff:.1e}): some tensor reads or writes the residual stream unseen")
    finally:
        model.load_state_dict(state)


# --- from a config (what the zoo has for a checkpoint) ---------------------------------------


def _build(config: dict[str, Any]) -> Any:
    """A random-initialised model of ``config`` (the LM head class where there is one), after its
    float32 size, counted on the meta device, is checked against the memory available."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from xsae_cli.zoo.sources import quiet_transformers

    quiet_transformers()
    cfg = dict(config)
    mt = cfg.pop("model_type", None)
    if not mt:
        raise AnatomyError("config.json has no model_type")
    try:
        conf = AutoConfig.for_model(mt, **{k: v for k, v in cfg.items() if not k.startswith("_")})
    except (ValueError, KeyError) as e:
        raise AnatomyError(f"transformers cannot build model type '{mt}'") from e
    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            with torch.device("meta"):
                meta = auto.from_config(conf)
        except (ValueError, KeyError):
            continue
        n = sum(p.numel() for p in meta.parameters())
        need, have = probe_bytes(n), _available_bytes()
        if need > have:
            raise AnatomyError(f"the anatomy probe of this {mt} model needs {need / 2**30:.1f} GiB of memory ({n / 1e6:.0f}M parameters in float32), {have / 2**30:.1f} GiB is available")
        torch.manual_seed(0)
        return auto.from_config(conf).float().eval()
    raise AnatomyError(f"transformers has no model class for model type '{mt}'")


@lru_cache(maxsize=32)
def _derived_json(blob: str) -> tuple[DerivedRules, Shape]:
    return derive(_build(json.loads(blob)))


def derived_from_config(config: Any) -> tuple[DerivedRules, Shape]:
    """Derived roles and shape of the model a config describes (cached per config)."""
    if not isinstance(config, dict):
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    keep = {k: v for k, v in config.items() if not re.match(r"^_|architectures$|transformers_version$|torch_dtype$|dtype$", k)}
    return _derived_json(json.dumps(keep, sort_keys=True, default=str))
