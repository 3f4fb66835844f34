"""Weights -> fixed-size chunks with continuous coordinates (depth, position in tensor, kind).

Every floating-point tensor of a model is flattened, normalised by its own mean and std (the
two numbers are kept as per-chunk features, so scale is not lost), zero-padded to a multiple of
``chunk_size`` and cut into chunks. Each chunk carries:

- ``depth`` in [0, 1]: embeddings 0, block ``N`` of ``L`` at ``(N + 0.5) / L``, final norm and
  head 1. Parsed from names (``layers.N``, ``h.N``, ``blocks.N``, ``encoder.layer.N``,
  ``decoder.layers.N``, ``blk.N``...); stacks (encoder then decoder) are laid end to end.
- ``pos`` in (0, 1): where the chunk sits inside its tensor.
- ``kind``: the tensor's role (:data:`KINDS`).
- ``stats``: the tensor's mean, log10 std and log10 size.
- ``valid``: how many of the chunk's floats are real (the rest is padding).

All per-chunk work is vectorised per tensor; nothing loops over chunks in Python.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from xsae_cli.zoo.anatomy import BLOCK_KEYWORDS, Blocks, block_pattern

KINDS = (
    "other",
    "embedding",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_o",
    "attn_qkv",
    "mlp_up",
    "mlp_gate",
    "mlp_down",
    "norm",
    "head",
    # the token-space circuit view (sane/views/circuits.py)
    "circuit_qk",
    "circuit_ov",
    "circuit_mlp",
    "circuit_gate",
    "gram",
    "circuit_head",
)
KIND_ID = {k: i for i, k in enumerate(KINDS)}
N_STATS = 3  # mean, log10 std, log10 numel
EPS = 1e-8
BLOCK = 1 << 21  # floats normalised at a time (8 MB of float32 work space)

# Ordered: the first rule whose pattern matches the (lower-cased) name wins.
DEFAULT_KIND_RULES: tuple[tuple[str, str], ...] = (
    *((k, rf"(^|\.){k}$") for k in ("circuit_qk", "circuit_ov", "circuit_mlp", "circuit_gate", "gram", "circuit_head")),
    ("norm", r"(^|\.)(ln_\w*|\w*layernorm\w*|\w*layer_norm\w*|\w*_norm|norm\w*|rms\w*)(\.|$)"),
    ("head", r"(^|\.)(lm_head|embed_out|classifier|cls|score|output)\.(weight|bias)$"),
    ("embedding", r"(^|\.)(wte|wpe|embed_tokens|embed_in|word_embeddings|position_embeddings|token_type_embeddings|embed_positions|embeddings?|token_embd|tok_embeddings|shared)(\.|$)"),
    ("attn_qkv", r"(^|\.)(c_attn|query_key_value|qkv|qkv_proj|wqkv|attn_qkv|in_proj)(\.|_weight|_bias|$)"),
    ("attn_q", r"(^|\.)(q_proj|query|attn_q|wq|q)(\.|$)"),
    ("attn_k", r"(^|\.)(k_proj|key|attn_k|wk|k)(\.|$)"),
    ("attn_v", r"(^|\.)(v_proj|value|attn_v|wv|v)(\.|$)"),
    ("attn_o", r"(attn|attention|self_attn|self_attention)\.(o_proj|out_proj|dense|c_proj|output\.dense|o|wo)(\.|$)|(^|\.)(o_proj|attn_output|out_proj|wo)(\.|$)"),
    ("mlp_gate", r"(^|\.)(gate_proj|ffn_gate|w3|gate)(\.|$)"),
    ("mlp_up", r"(^|\.)(up_proj|c_fc|dense_h_to_4h|fc1|ffn_up|w1|fc_in)(\.|$)|intermediate\.dense"),
    ("mlp_down", r"(^|\.)(down_proj|dense_4h_to_h|fc2|ffn_down|w2|fc_out)(\.|$)|mlp\.c_proj|(^|\.)output\.dense"),
)

DEFAULT_LAYER_KEYWORDS: tuple[str, ...] = BLOCK_KEYWORDS  # the anatomy's block keywords (zoo/anatomy/blocks.py)
DEFAULT_EMBED_KEYWORDS: tuple[str, ...] = ("wte", "wpe", "embed", "embeddings", "embed_tokens", "embed_in", "word_embeddings", "token_embd", "tok_embeddings", "shared")
DEFAULT_FINAL_KEYWORDS: tuple[str, ...] = ("ln_f", "norm", "final_layer_norm", "final_layernorm", "lm_head", "embed_out", "output_norm", "output", "head", "pooler", "classifier", "score")


@dataclass(frozen=True)
class CoordScheme:
    """How a model becomes chunk coordinates: the view tokenised and the anatomy settings (block
    keywords) and name rules. Its :attr:`scheme_id` is written into caches and checkpoints, and
    checkpoints keep the scheme itself as data (:meth:`record`), so it is rebuilt from there."""

    layer_keywords: tuple[str, ...] = DEFAULT_LAYER_KEYWORDS
    embed_keywords: tuple[str, ...] = DEFAULT_EMBED_KEYWORDS
    final_keywords: tuple[str, ...] = DEFAULT_FINAL_KEYWORDS
    kind_rules: tuple[tuple[str, str], ...] = DEFAULT_KIND_RULES
    view: str = "circuits"  # what is tokenised: a registered view (sane/views/), e.g. circuits, canonical or weights
    version: int = 1

    @property
    def scheme_id(self) -> str:
        from xsae_cli.sane.views import revision

        fields = asdict(self)
        rev = revision(self.view)
        if rev != 1:  # revision 1 of a view hashes as before, so its caches and checkpoints stay valid
            fields["view_revision"] = rev
        blob = json.dumps(fields, sort_keys=True).encode()
        return f"{self.view}-v{self.version + rev - 1}-{hashlib.sha256(blob).hexdigest()[:10]}"

    def layer_re(self) -> re.Pattern[str]:
        return block_pattern(tuple(self.layer_keywords))

    def record(self, chunk_size: int | None = None) -> dict[str, Any]:
        """The scheme as a JSON object: its id, the view and its revision, the chunk size and every
        setting that decides the coordinates (what a checkpoint stores to be read again)."""
        from xsae_cli.sane.views import revision

        out: dict[str, Any] = {"id": self.scheme_id, "view": self.view, "view_revision": revision(self.view)}
        if chunk_size is not None:
            out["chunk_size"] = int(chunk_size)
        out.update({k: v for k, v in asdict(self).items() if k != "view"})
        return out

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> CoordScheme:
        """The scheme of a :meth:`record` (its ``id`` and ``view_revision`` are for checking, not input)."""
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in record:
                continue
            v = record[f.name]
            if f.name == "kind_rules":
                v = tuple((str(k), str(p)) for k, p in v)
            elif f.name.endswith("_keywords"):
                v = tuple(str(x) for x in v)
            kw[f.name] = v
        return cls(**kw)

    @classmethod
    def from_id(cls, scheme_id: str, layer_keywords: Iterable[Iterable[str]] = ()) -> CoordScheme | None:
        """The scheme an id was made with, for ids stored without their record (checkpoints written
        before schemes were stored as data): the id's view with the default settings or with one of
        ``layer_keywords``; None when none of them gives the id."""
        view = view_of_scheme(scheme_id)
        for kws in (DEFAULT_LAYER_KEYWORDS, *layer_keywords):
            cand = cls(layer_keywords=tuple(kws), view=view)
            if cand.scheme_id == scheme_id:
                return cand
        return None


def view_of_scheme(scheme_id: str) -> str:
    """The view a scheme id was made with (ids before views began with "depth": the weights)."""
    from xsae_cli.sane.views import view_names

    head = scheme_id.split("-v", 1)[0]
    return head if head in view_names() else "weights"


@dataclass(frozen=True)
class TensorCoord:
    name: str
    depth: float
    kind: str
    parsed: bool  # False when the depth came from stream order


def _segments(name: str) -> list[str]:
    return name.lower().split(".")


def tensor_kind(name: str, scheme: CoordScheme = CoordScheme()) -> str:
    low = name.lower()
    for kind, pattern in scheme.kind_rules:
        if re.search(pattern, low):
            return kind
    return "other"


def tensor_coords(names: Iterable[str], scheme: CoordScheme = CoordScheme()) -> list[TensorCoord]:
    """Depth and kind for every tensor name, in the given order.

    Layer tensors get ``(offset + N + 0.5) / L_total`` where stacks (the text before the layer
    keyword, e.g. ``encoder.`` / ``decoder.``) are laid end to end in order of first appearance.
    Names outside layers: embedding keywords -> 0, final keywords -> 1. Anything else (and every
    tensor of a model where no layer is parsed) gets a depth from its place in the stream.
    """
    names = list(names)
    blocks = Blocks.from_names(names, scheme.layer_keywords)
    total = blocks.n_blocks
    embed = set(k.lower() for k in scheme.embed_keywords)
    final = set(k.lower() for k in scheme.final_keywords)
    out: list[TensorCoord] = []
    count = len(names)
    for i, n in enumerate(names):
        kind = tensor_kind(n, scheme)
        by_order = (i + 0.5) / max(count, 1)
        if total == 0:
            out.append(TensorCoord(n, by_order, kind, False))
            continue
        depth = blocks.depth(n)
        if depth is not None:
            out.append(TensorCoord(n, depth, kind, True))
            continue
        segs = _segments(n)[:-1] or _segments(n)
        if any(s in embed for s in segs) or kind == "embedding":
            out.append(TensorCoord(n, 0.0, kind, True))
        elif any(s in final for s in segs) or kind == "head":
            out.append(TensorCoord(n, 1.0, kind, True))
        else:
            out.append(TensorCoord(n, by_order, kind, False))
    return out


def unparsed(coords: list[TensorCoord]) -> list[str]:
    return [c.name for c in coords if not c.parsed]


def is_float_dtype(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


@dataclass
class ChunkBlock:
    """The chunks of one tensor (arrays have one row per chunk)."""

    name: str
    values: np.ndarray  # [n, chunk_size] float16 (normalised)
    valid: np.ndarray  # [n] int16
    depth: np.ndarray  # [n] float32
    pos: np.ndarray  # [n] float32
    kind: np.ndarray  # [n] int8
    stats: np.ndarray  # [n, N_STATS] float32
    mean: float = 0.0
    std: float = 1.0
    shape: tuple[int, ...] = field(default_factory=tuple)

    @property
    def n(self) -> int:
        return int(self.values.shape[0])


def n_chunks(numel: int, chunk_size: int) -> int:
    return -(-numel // chunk_size) if numel > 0 else 0


def chunk_tensor(name: str, tensor: Any, coord: TensorCoord, chunk_size: int) -> ChunkBlock:
    """Normalise one tensor by its mean/std and cut it into chunks, all in vectorised torch.

    Runs its reductions on one thread: a float sum split over N threads rounds differently for
    each N, and the cache must hold the same bytes on every machine (the work is memory-bound).
    """
    import torch

    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        return _chunk_tensor(name, tensor, coord, chunk_size)
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


def _chunk_tensor(name: str, tensor: Any, coord: TensorCoord, chunk_size: int) -> ChunkBlock:
    import torch

    flat = tensor.detach().reshape(-1)
    numel = flat.numel()
    n = n_chunks(numel, chunk_size)
    # Two-pass mean/std with fast kernels (sum, then dot products of centred blocks; torch.std_mean
    # is ~15x slower on CPU), then normalise block by block straight into the float16 result, so
    # the only full-size allocation is the result itself (half a float32 tensor).
    buf = torch.empty(min(BLOCK, max(numel, 1)), dtype=torch.float32)
    if flat.dtype == torch.float32:
        total = float(flat.sum())
    else:  # sum(dtype=float32) of a bf16/fp16 tensor would allocate a float32 copy of all of it
        total = 0.0
        for i in range(0, numel, BLOCK):
            src = flat[i : i + BLOCK]
            total += float(buf[: src.numel()].copy_(src).sum())
    mean = total / numel if numel else 0.0
    ss = 0.0
    for i in range(0, numel, BLOCK):
        src = flat[i : i + BLOCK]
        part = buf[: src.numel()]
        torch.sub(src, mean, out=part)
        ss += float(torch.dot(part, part))
    std = math.sqrt(max(ss / numel, 0.0)) if numel > 1 else 0.0
    scale = std if std > EPS and math.isfinite(std) else 1.0
    out = torch.empty(n * chunk_size, dtype=torch.float16)
    for i in range(0, numel, BLOCK):
        src = flat[i : i + BLOCK]
        part = buf[: src.numel()]
        torch.sub(src, mean, out=part)
        out[i : i + src.numel()] = part.mul_(1.0 / scale).clamp_(-6e4, 6e4)
    out[numel:] = 0.0
    pad = n * chunk_size - numel
    values = out.view(n, chunk_size).numpy()
    valid = np.full(n, chunk_size, dtype=np.int16)
    if pad:
        valid[-1] = chunk_size - pad
    stats = np.empty((n, N_STATS), dtype=np.float32)
    stats[:, 0] = mean
    stats[:, 1] = math.log10(std + EPS)
    stats[:, 2] = math.log10(max(numel, 1))
    return ChunkBlock(
        name=name,
        values=values,
        valid=valid,
        depth=np.full(n, coord.depth, dtype=np.float32),
        pos=((np.arange(n, dtype=np.float64) + 0.5) / max(n, 1)).astype(np.float32),
        kind=np.full(n, KIND_ID[coord.kind], dtype=np.int8),
        stats=stats,
        mean=mean,
        std=std,
        shape=tuple(tensor.shape),
    )


def tokenize_stream(
    index: list[Any],
    weights: Iterable[tuple[str, Any]],
    chunk_size: int = 64,
    scheme: CoordScheme = CoordScheme(),
    warn: Callable[[str], None] | None = None,
) -> Iterator[ChunkBlock]:
    """Chunk blocks for every floating-point tensor, in stream order, one tensor at a time.

    ``index`` is the header-only tensor list (``zoo.weights.tensor_index``) so coordinates are
    known before any weight is read; ``weights`` yields ``(name, tensor)``.
    """
    floats = [t for t in index if is_float_dtype(t.dtype) and t.numel > 0]
    coords = {c.name: c for c in tensor_coords([t.name for t in floats], scheme)}
    missing = unparsed(list(coords.values()))
    if missing and warn is not None:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        warn(f"no layer/embedding/head name parsed for {len(missing)} tensor(s), depth set by their order: {shown}")
    for name, tensor in weights:
        coord = coords.get(name)
        if coord is None:
            continue  # integer buffers (position_ids), empty tensors
        yield chunk_tensor(name, tensor, coord, chunk_size)


def model_chunk_count(index: list[Any], chunk_size: int) -> int:
    return sum(n_chunks(t.numel, chunk_size) for t in index if is_float_dtype(t.dtype) and t.numel > 0)
