"""The token-space circuit view: each block's bilinear circuits read between a fixed set of tokens.

Why: a weight matrix is only defined up to the network's symmetries (permuted neurons, heads and
residual coordinates; gains moved between a norm and its readers), and sorting those away
(:mod:`canonical`) is exact but fragile: once a fine-tune or noise moves the sort keys, the
sorted order and every chunk after it change. The vocabulary is the one axis no symmetry
touches. So this view reads every block through the (normalised) input embeddings ``A`` of a fixed
set of anchor tokens, as in the transformer-circuits framework (Elhage et al., 2021):

- ``QK[i, j] = sum over heads of (A W_q^T)_i . (A W_k^T)_j``: how much token i attends to j;
- ``OV[i, j] = sum over heads of (A W_o)_i . (A W_v^T)_j``: how much attending to j writes i;
- ``MLP[i, j] = (A W_down)_i . (A W_up^T)_j`` (and the gate's path for gated MLPs): the linear
  path through the MLP;
- ``gram = A A^T`` (depth 0) and, for an untied head, the anchors' logits for the anchors (depth 1).

Before the anchors are used, the embedding's outlier directions are shrunk (:func:`outlier_filter`):
fine-tuning adds nearly the same vector to every token's embedding (with tied embeddings Adam pushes
all unseen tokens' logits down together), which would otherwise swamp each row's own values.

Every one is unchanged by all the function-preserving transforms of :mod:`transforms` (the
permutations cancel inside the dot products, norm gains are folded into their readers first,
BERT's query/key and value/output rescalings cancel in the products), yet each entry moves
smoothly with the weights: a model and its fine-tune keep matching entries at the same place. Each
circuit is an ``S x S`` "tensor" (``S`` = 64 anchors: one 64-float chunk per row) that the
tokenizer treats like any weight, with its block's depth and its own kind.

Cost: two streaming passes. The first touches only the 1-D tensors (norm gains) and the anchors'
and a few thousand sampled rows of the embedding (memory-mapped, so no weight matrix is read); the second reduces every weight
matrix, a float32 block at a time, to an ``S x width`` projection, so memory is one tensor plus ``S``
rows per projection. Models without a known token embedding fall back to the canonical form.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from xsae_cli.sane.transforms import Arch
from xsae_cli.sane.views import View, register_view
from xsae_cli.sane.views.canonical import CanonicalPlan, arch_of, plan_from
from xsae_cli.zoo.anatomy import QKV, QKV_CAT, QKV_GROUPED, QKV_HEADS, READERS, RESID, WRITERS

N_ANCHORS = 64
SAMPLE_ROWS = 4096  # embedding rows (evenly spaced, at least 2 x d_model) whose second moment finds the outlier directions
OUTLIER_LEVEL = 3.0  # a direction is an outlier above this multiple of the bulk's mean eigenvalue
OUTLIER_MAX = 16  # directions that may be shrunk (a fine-tune's shift takes 1-4)
CIRCUIT_KINDS = ("circuit_qk", "circuit_ov", "circuit_mlp", "circuit_gate", "gram", "circuit_head")


def _embed_name(arch: Arch, name: str) -> bool:
    """Whether ``name`` is the input token embedding (the anatomy's ``embedding`` role)."""
    return arch.role(name).role == "embedding"


def anchor_ids(vocab: int, n: int = N_ANCHORS) -> list[int]:
    """Evenly spaced token ids past the first few (often special tokens): the same for every model
    with this vocabulary size, so models of one tokenizer read the same tokens."""
    import numpy as np

    lo = min(3, max(vocab - 1, 0))
    return sorted({int(x) for x in np.round(np.linspace(lo, vocab - 1, min(n, vocab - lo)))})


def sample_ids(vocab: int, d_model: int) -> list[int]:
    """Evenly spaced rows, at least twice as many as coordinates where the vocabulary allows: then a
    random embedding's largest eigenvalue stays below ``OUTLIER_LEVEL`` x the bulk's mean."""
    import numpy as np

    n = min(vocab, max(SAMPLE_ROWS, 2 * d_model))
    return sorted({int(x) for x in np.round(np.linspace(0, vocab - 1, n))})


def _top_eigh(x: Any, k: int, steps: int = 3) -> tuple[Any, Any]:
    """The ``k`` largest eigenpairs (descending) of ``x^T x`` without forming it (a 4096-wide
    model's would cost seconds): randomised subspace iteration (Halko et al., 2011). The start is a
    fixed random mix of ``x``'s rows, i.e. of tokens, which no symmetry moves, so a permuted
    residual stream gets the permuted result."""
    import torch

    n, d = x.shape
    q = min(k + 8, n, d)
    y = torch.randn(n, q, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    basis = torch.linalg.qr(x.t() @ y).Q
    for _ in range(steps):
        basis = torch.linalg.qr(x.t() @ (x @ basis)).Q
    small = (x @ basis).double()
    lam, w = torch.linalg.eigh(small.t() @ small)
    return lam.flip(0)[:k], (basis.double() @ w.flip(1))[:, :k]


def outlier_filter(rows: Any, level: float = OUTLIER_LEVEL) -> tuple[Any, Any, dict[str, Any]]:
    """``(V, shrink, info)``: the outlier directions ``V`` (``d x k``) of the embedding rows ``rows``
    (a sample of the vocabulary) and how much of each to remove; :func:`shrink_outliers` applies
    ``A (I - V diag(shrink) V^T)`` to the anchors without forming the ``d x d`` map.

    Why: a fine-tune moves every token embedding by nearly the same vector (Adam turns the softmax's
    common push on all unseen tokens into equal steps), so after 200 steps of a tiny tied-embedding
    model that one direction holds ~90 % of the change and the rows keep only 0.34-0.41 correlation
    with their base (0.73-0.82 without it). A direction ``i`` with eigenvalue ``lam_i`` of the rows'
    second moment above ``level`` x the bulk's mean ``m`` is scaled by ``(level m / lam_i)^2``: a
    smooth function of the spectrum (a near-threshold direction is barely touched, so noise cannot
    flip a choice), the same on a model and on any permutation of it, and the identity on a
    random-initialised embedding, whose spectrum has no outliers. At most ``OUTLIER_MAX`` directions
    (and ``d / 8``); real models' anisotropic directions (SmolLM2's largest is ~700x the bulk) are
    shrunk the same way, as in "all-but-the-top" post-processing of word vectors (Mu & Viswanath, 2018).
    """
    import torch

    x = rows.float()
    n, d = x.shape
    k = max(1, min(d // 8, OUTLIER_MAX))
    lam, v = _top_eigh(x, k)
    lam = lam.clamp_min(0)
    total = float(torch.linalg.vector_norm(x)) ** 2  # float32 with a pairwise sum: no float64 copy of the sample
    bulk = (total - float(lam.sum())) / max(min(n, d) - len(lam), 1)
    scale = torch.clamp(level * bulk / lam.clamp_min(1e-300), max=1.0) ** 2
    ratio = lam / max(bulk, 1e-300)
    return v, 1.0 - scale, {"outlier_directions": int((scale < 1).sum()), "largest_outlier_ratio": round(float(ratio[0]), 2) if len(ratio) else 0.0}


def shrink_outliers(a: Any, v: Any, shrink: Any) -> Any:
    """``a (I - V diag(shrink) V^T)`` in float64."""
    a = a.double()
    return a - ((a @ v) * shrink) @ v.t()


def anchor_rows(embedding: Any) -> tuple[Any, list[int], dict[str, Any]]:
    """``(anchors, ids, info)``: the anchor tokens' embedding rows with the outlier directions of
    the embedding shrunk, float64. Reads only the anchor and sample rows of a memory-mapped
    ``embedding``."""
    ids = anchor_ids(embedding.shape[0])
    v, shrink, info = outlier_filter(embedding[sample_ids(*embedding.shape)].detach().float())
    return shrink_outliers(embedding[ids].detach(), v, shrink), ids, info


# role -> (reads the residual stream, i.e. the anchors meet its input side)
READS = {"q": True, "k": True, "v": True, "up": True, "gate": True, "head": True, "o": False, "down": False}


def _layout(arch: Arch, name: str, t: Any) -> tuple[list[tuple[str, int, int]], int] | None:
    """How one weight feeds the circuits: ``(pieces, contract)``. ``contract`` is the axis of ``t``
    that meets the anchors (its residual axis: the input of a reader, the output of a writer);
    ``pieces`` are ``(role, start, stop)`` column ranges of the projection ``anchors @ t`` (fused
    q/k/v: GPT-2's ``[q | k | v]`` is cut in three, GPT-NeoX's per-head layout is cut later)."""
    if not name.endswith(".weight") or t.dim() != 2:
        return None
    r = arch.role(name)
    if r.role not in READERS + WRITERS or (r.role == "head" and arch.tied):
        return None
    contract = r.axis_of(RESID)
    if contract is None:
        return None
    width = t.shape[1 - contract]
    if r.role == "qkv":
        if r.axis_of(QKV) is not None:
            n = width // 3
            return [("q", 0, n), ("k", n, 2 * n), ("v", 2 * n, 3 * n)], contract
        if r.axis_of(QKV_CAT) is not None:
            qw, kw = arch.q_width, arch.kv_width
            return [("q", 0, qw), ("k", qw, qw + kw), ("v", qw + kw, qw + 2 * kw)], contract
        if r.axis_of(QKV_HEADS) is not None:
            return [("qkv_neox", 0, width)], contract
        if r.axis_of(QKV_GROUPED) is not None:
            return [("qkv_grouped", 0, width)], contract
        return None
    return [(r.role, 0, width)], contract


def _project(a: Any, t: Any, contract: int, rows: int = 1 << 22) -> Any:
    """``a @ t`` (contract axis 0) or ``a @ t.T`` (axis 1) in float32, a block of ``t`` at a time,
    so a bf16 weight is never copied whole (a 7B model's MLP is 11008 x 4096). Blocks are
    converted into one reused buffer: a fresh float32 copy per block costs a page fault per 4 KB."""
    import torch

    step = max(1, rows // max(t.shape[1], 1))  # rows of t per block
    buf = torch.empty(min(step, t.shape[0]), t.shape[1], dtype=torch.float32) if t.dtype != torch.float32 else None

    def block(i: int) -> Any:
        src = t[i : i + step]
        if buf is None:
            return src
        dst = buf[: src.shape[0]]
        dst.copy_(src)
        return dst

    if contract == 1:  # output columns = rows of t
        out = torch.empty(a.shape[0], t.shape[0], dtype=torch.float32)
        for i in range(0, t.shape[0], step):
            blk = block(i)
            torch.mm(a, blk.t(), out=out[:, i : i + blk.shape[0]])
        return out
    out = torch.zeros(a.shape[0], t.shape[1], dtype=torch.float32)
    for i in range(0, t.shape[0], step):
        blk = block(i)
        out.addmm_(a[:, i : i + blk.shape[0]], blk)
    return out


def circuit_tensors(arch: Arch, items: Any, plan: CanonicalPlan, anchors: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({name: S x S circuit}, info)`` from a second pass over ``items``.

    The scale fold is applied on the small side: a reader's input-column factors multiply the
    anchors, every other factor the projection's columns, so no weight is ever rescaled in full.
    """
    import torch

    a = anchors.double()
    # What a norm hands the first block, up to its gain: each row at unit RMS. Not centred: a
    # LayerNorm's centring commutes only with rotations that fix the all-ones direction, RMS with
    # every rotation, so an RMSNorm model rotated by any orthogonal matrix keeps its circuits
    # (centring moved layer 0's QK and OV of an exactly rotated SmolLM2 to 0.05 correlation).
    a = (a / (a.pow(2).mean(1, keepdim=True).sqrt() + 1e-12)).float()
    proj: dict[tuple[int, str], Any] = {}
    head = None
    for name, t in items:
        if not torch.is_tensor(t) or not t.is_floating_point():
            continue
        layout = _layout(arch, name, t.detach())
        if layout is None:
            continue
        pieces, contract = layout
        reader = READS.get(pieces[0][0], True)
        col = plan.col_scale.get(name)  # per input coordinate of the weight
        side = a * col if (reader and col is not None) else a
        out_scale = plan.row_scale.get(name) if reader else col
        w = t.detach()
        if pieces[0][0] == "head":  # only the anchors' logits are kept: read and project just their rows
            ids = _anchor_cols(w.shape[0], a.shape[0])
            w = w[ids]
            out_scale = out_scale[ids] if out_scale is not None else None
        p = _project(side, w, contract)
        if out_scale is not None:
            p = p * out_scale
        layer = arch.block(name)
        for role, lo, hi in pieces:
            if role == "head":
                head = p
            elif layer is None:
                continue
            elif role == "qkv_neox":  # rows laid out [head, (q|k|v), head_dim]
                x = p.reshape(a.shape[0], arch.n_heads, 3, arch.head_dim)
                for i, r in enumerate("qkv"):
                    proj[(layer, r)] = x[:, :, i].reshape(a.shape[0], -1)
            elif role == "qkv_grouped":  # rows laid out [kv group, (its q heads | k | v), head_dim]
                g = arch.group
                x = p.reshape(a.shape[0], arch.n_kv_heads, g + 2, arch.head_dim)
                proj[(layer, "q")] = x[:, :, :g].reshape(a.shape[0], -1)
                proj[(layer, "k")] = x[:, :, g].reshape(a.shape[0], -1)
                proj[(layer, "v")] = x[:, :, g + 1].reshape(a.shape[0], -1)
            else:
                proj[(layer, role)] = p[:, lo:hi]
    out: dict[str, Any] = {"embed.gram": a @ a.t()}
    layers = sorted({lay for lay, _ in proj})
    s = a.shape[0]
    hd, nh, nkv = arch.head_dim, arch.n_heads, arch.n_kv_heads
    for lay in layers:
        p = {r: proj.get((lay, r)) for r in ("q", "k", "v", "o", "up", "gate", "down")}
        pre = f"layers.{lay}"

        def heads(x: Any, n: int) -> Any:
            x = x.reshape(s, n, hd)
            return x.repeat_interleave(nh // n, dim=1) if n != nh else x

        if p["q"] is not None and p["k"] is not None:
            out[f"{pre}.circuit_qk"] = torch.einsum("ihd,jhd->ij", heads(p["q"], nh), heads(p["k"], nkv))
        if p["o"] is not None and p["v"] is not None:
            out[f"{pre}.circuit_ov"] = torch.einsum("ihd,jhd->ij", heads(p["o"], nh), heads(p["v"], nkv))
        if p["down"] is not None and p["up"] is not None:
            out[f"{pre}.circuit_mlp"] = p["down"] @ p["up"].t()
        if p["down"] is not None and p["gate"] is not None:
            out[f"{pre}.circuit_gate"] = p["down"] @ p["gate"].t()
    if head is not None:
        out["lm_head.circuit_head"] = head
    return {k: v.float().contiguous() for k, v in out.items()}, {"layers": layers, "n_circuits": len(out)}


def _anchor_cols(vocab: int, s: int) -> Any:
    import torch

    return torch.tensor(anchor_ids(vocab, s))


def circuit_view(resolved: Any, iter_weights: Any) -> tuple[tuple[list[Any], Iterator[tuple[str, Any]], dict[str, Any]] | None, str]:
    """``((index, stream, info), "")`` of the circuit view, or ``(None, why)`` when the
    architecture or its token embedding is unknown (the caller falls back to the canonical form)."""
    from xsae_cli.zoo.weights import TensorInfo

    arch, why = arch_of(resolved)
    if arch is None:
        return None, why
    rows: dict[str, Any] = {}

    def capture() -> Iterator[tuple[str, Any]]:
        for name, t in iter_weights(resolved):
            if "e" not in rows and _embed_name(arch, name) and getattr(t, "dim", lambda: 0)() == 2:
                rows["e"], rows["ids"], rows["filter"] = anchor_rows(t)
            yield name, t

    plan, why = plan_from(arch, capture(), orders=False)
    if plan is None:
        return None, why
    if "e" not in rows:
        return None, f"no {arch.model_type} input token embedding found"
    circuits, info = circuit_tensors(arch, iter_weights(resolved), plan, rows["e"])
    index = [TensorInfo(n, tuple(v.shape), "float32", "<circuits>") for n, v in circuits.items()]
    info = {"applied": True, "view": "circuits", "model_type": arch.model_type, "anchors": len(rows["ids"]), "anchor_ids": rows["ids"], **rows["filter"], **info}
    return (index, iter(circuits.items()), info), ""


def circuits_view(resolved: Any, warn: Any = None) -> tuple[Any, str]:
    from xsae_cli.zoo.weights import iter_weights

    return circuit_view(resolved, iter_weights)


# revision 2: the anchors' outlier directions are shrunk (outlier_filter); 3: anchors not centred
# (rotation invariance), derived anatomies' fused layouts
register_view(View("circuits", circuits_view, revision=3, fallback="canonical", help="token-space circuits, free of weight-space symmetries"))
