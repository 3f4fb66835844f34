"""Tensor roles per model family: which tensor is the embedding, the head, a norm, a query, key,
value or output projection, an MLP's in/gate/out map, and which of its axes are the residual
stream, the attention heads or the MLP neurons.

A role is what the SANE views and the lineage transforms need to know about a tensor to permute,
rescale or read it exactly (:mod:`xsae_cli.sane.transforms`, :mod:`xsae_cli.sane.views`): the
axes are named by the *space* they index, and every tensor that indexes one space gets the same
permutation of it. Spaces:

- ``resid``: the residual stream (``d_model`` coordinates);
- ``heads_q`` / ``heads_kv``: query heads / key-value heads, ``head_dim`` coordinates per head
  (grouped and multi-query attention have fewer key-value heads);
- ``qkv``: GPT-2's fused ``c_attn`` output, ``[q | k | v]``, each over the query heads;
- ``qkv_heads``: GPT-NeoX's fused ``query_key_value`` output, ``[head, (q | k | v), head_dim]``;
- ``qkv_cat``: a fused ``[q | k | v]`` with ``q`` over the query heads and ``k``, ``v`` over the
  key/value heads (multi-query and grouped attention; equal to ``qkv`` when they are as many);
- ``qkv_grouped``: a fused ``[kv group, (its query heads | k | v), head_dim]``;
- ``mlp``: the MLP's hidden neurons of the tensor's block.

The rules here are written per family from the names transformers gives the tensors (GPT-2,
GPT-NeoX, Llama-like: Llama, Mistral, Qwen2, Gemma; BERT), one registration line each
(:func:`register_family`). They are the fast path: a derived anatomy (one that finds the same
roles by inspecting and probing a loaded model, for families no rule names) implements the same
:class:`RoleRules` interface and is tested against these on the families they cover.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from xsae_cli.zoo.anatomy.blocks import block_index

RESID, HEADS_Q, HEADS_KV, QKV, QKV_HEADS, MLP = "resid", "heads_q", "heads_kv", "qkv", "qkv_heads", "mlp"
QKV_CAT, QKV_GROUPED = "qkv_cat", "qkv_grouped"  # fused layouts of derived anatomies (GQA/MQA)
ROLES = ("embedding", "pos_embedding", "type_embedding", "head", "norm", "q", "k", "v", "qkv", "o", "up", "gate", "down", "pooler", "head_transform", "other")
EMBEDDINGS = ("embedding", "pos_embedding", "type_embedding")  # write the residual stream from a lookup
READERS = ("q", "k", "v", "qkv", "up", "gate", "head")  # read the residual stream
WRITERS = ("o", "down")  # write into it

Axes = tuple[tuple[int, str], ...]  # (axis, space) pairs


@dataclass(frozen=True)
class TensorRole:
    """One tensor's role, block (None outside blocks) and the spaces its axes index."""

    role: str
    block: int | None
    axes: Axes = ()

    def axis_of(self, space: str) -> int | None:
        return next((a for a, s in self.axes if s == space), None)

    @property
    def in_axis(self) -> int | None:
        """The input axis of a 2-D weight: its residual axis when it reads the stream, the other
        one when it writes it (1 for ``nn.Linear``'s ``[out, in]``, 0 for GPT-2's Conv1D)."""
        r = self.axis_of(RESID)
        if r is None:
            return None
        return r if self.role in READERS else 1 - r


class RoleRules(Protocol):
    """What a family's anatomy answers about its tensors (the interface a derived anatomy keeps)."""

    @property
    def post_ln(self) -> bool:
        """Norms sit on the residual stream (BERT), so no norm gain can move into a linear."""
        ...

    @property
    def tied_default(self) -> bool:
        """What a config without ``tie_word_embeddings`` means for this family."""
        ...

    def role(self, name: str) -> TensorRole: ...

    def norm_readers(self, n_layers: int, tied: bool, names: Iterable[str]) -> list[tuple[str, list[str], bool, bool]]: ...

    def attention_prefixes(self, names: Iterable[str]) -> list[str]: ...


@dataclass(frozen=True)
class FamilyRules:
    """Role rules written out for one family: ``classify(name, block) -> (role, axes)`` and the
    pre-norm -> reader pairs (``norms(i)`` for block ``i``, ``final`` for the last norm)."""

    classify: Callable[[str, int | None], tuple[str, Axes]]
    norms: Callable[[int], list[tuple[str, list[str]]]] = lambda i: []
    final: Callable[[set[str]], tuple[str, list[str]] | None] = lambda names: None
    conv1d: bool = False  # weights stored [in, out] (GPT-2's Conv1D)
    gemma_gain: bool = False  # a norm stores gain - 1
    post_ln: bool = False
    tied_default: bool = False

    def role(self, name: str) -> TensorRole:
        block = block_index(name)
        role, axes = self.classify(name, block)
        return TensorRole(role, block, axes)

    def norm_readers(self, n_layers: int, tied: bool, names: Iterable[str]) -> list[tuple[str, list[str], bool, bool]]:
        """Pre-norms whose per-coordinate gain a following linear can absorb: ``(norm, readers,
        conv1d, gemma)`` with tensor prefixes; ``gemma``: the stored weight is ``gain - 1``. Only
        pairs whose tensors are all in ``names`` (a model saved in part keeps the blocks it has)."""
        names = set(names)
        out = [(n, r) for i in range(n_layers) for n, r in self.norms(i)]
        last = None if tied else self.final(names)
        if last is not None:
            out.append(last)
        return [(n, r, self.conv1d, self.gemma_gain) for n, r in out if n + ".weight" in names and all(x + ".weight" in names for x in r)]

    def attention_prefixes(self, names: Iterable[str]) -> list[str]:
        """Post-LN attention prefixes (``...encoder.layer.N.attention``), in block order."""
        if not self.post_ln:
            return []
        found = {}
        for k in names:
            m = re.search(r"^(.*encoder\.layer\.(\d+)\.attention)\.self\.query\.weight$", k)
            if m:
                found[int(m.group(2))] = m.group(1)
        return [found[i] for i in sorted(found)]


_FAMILIES: dict[str, FamilyRules] = {}


def register_family(model_types: str | tuple[str, ...], rules: FamilyRules) -> FamilyRules:
    for mt in (model_types,) if isinstance(model_types, str) else model_types:
        _FAMILIES[mt] = rules
    return rules


def family_rules(model_type: str | None) -> FamilyRules | None:
    """The written-out rules of a family (by ``model_type``), or None when no rule names it."""
    return _FAMILIES.get(model_type or "")


def known_families() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def _w(name: str) -> bool:
    return name.endswith(".weight")


# --- Llama-like: model.layers.N.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj -----------------


def _llama(name: str, block: int | None) -> tuple[str, Axes]:
    if name.endswith("embed_tokens.weight"):
        return "embedding", ((1, RESID),)
    if name.endswith("lm_head.weight"):
        return "head", ((1, RESID),)
    if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, model.norm
        return "norm", ((0, RESID),)
    if block is None:
        return "other", ()
    last = name.split(".")[-2]
    w = _w(name)
    if last in ("q_proj", "k_proj", "v_proj"):
        h = HEADS_Q if last == "q_proj" else HEADS_KV
        return last[0], ((0, h), (1, RESID)) if w else ((0, h),)
    if last == "o_proj":
        return "o", ((0, RESID), (1, HEADS_Q)) if w else ((0, RESID),)
    if last in ("gate_proj", "up_proj"):
        return last.split("_")[0], ((0, MLP), (1, RESID)) if w else ((0, MLP),)
    if last == "down_proj":
        return "down", ((0, RESID), (1, MLP)) if w else ((0, RESID),)
    return "other", ()


def _llama_norms(i: int) -> list[tuple[str, list[str]]]:
    pre = f"model.layers.{i}"
    return [(f"{pre}.input_layernorm", [f"{pre}.self_attn.{x}_proj" for x in "qkv"]), (f"{pre}.post_attention_layernorm", [f"{pre}.mlp.gate_proj", f"{pre}.mlp.up_proj"])]


def _llama_final(names: set[str]) -> tuple[str, list[str]] | None:
    return ("model.norm", ["lm_head"]) if "lm_head.weight" in names else None


LLAMA = register_family(("llama", "mistral", "qwen2"), FamilyRules(_llama, _llama_norms, _llama_final))
GEMMA = register_family("gemma", FamilyRules(_llama, _llama_norms, _llama_final, gemma_gain=True, tied_default=True))


# --- GPT-2: transformer.h.N.attn.c_attn (fused q|k|v), Conv1D weights [in, out] --------------------


def _gpt2(name: str, block: int | None) -> tuple[str, Axes]:
    if name.endswith("wte.weight"):
        return "embedding", ((1, RESID),)
    if name.endswith("wpe.weight"):
        return "pos_embedding", ((1, RESID),)
    if name.endswith("lm_head.weight"):
        return "head", ((1, RESID),)
    if block is None:
        return ("norm", ((0, RESID),)) if ".ln_f." in name else ("other", ())
    w = _w(name)
    if ".ln_1." in name or ".ln_2." in name:
        return "norm", ((0, RESID),)
    if ".attn.c_attn." in name:
        return "qkv", ((0, RESID), (1, QKV)) if w else ((0, QKV),)
    if ".attn.c_proj." in name:
        return "o", ((0, HEADS_Q), (1, RESID)) if w else ((0, RESID),)
    if ".mlp.c_fc." in name:
        return "up", ((0, RESID), (1, MLP)) if w else ((0, MLP),)
    if ".mlp.c_proj." in name:
        return "down", ((0, MLP), (1, RESID)) if w else ((0, RESID),)
    return "other", ()


def _gpt2_norms(i: int) -> list[tuple[str, list[str]]]:
    pre = f"transformer.h.{i}"
    return [(f"{pre}.ln_1", [f"{pre}.attn.c_attn"]), (f"{pre}.ln_2", [f"{pre}.mlp.c_fc"])]


def _gpt2_final(names: set[str]) -> tuple[str, list[str]] | None:
    return ("transformer.ln_f", ["lm_head"]) if "lm_head.weight" in names else None


GPT2 = register_family("gpt2", FamilyRules(_gpt2, _gpt2_norms, _gpt2_final, conv1d=True, tied_default=True))


# --- GPT-NeoX: gpt_neox.layers.N.attention.query_key_value (per head [q|k|v]) ----------------------


def _neox(name: str, block: int | None) -> tuple[str, Axes]:
    if name.endswith("embed_in.weight"):
        return "embedding", ((1, RESID),)
    if name.endswith(("embed_out.weight", "lm_head.weight")):
        return "head", ((1, RESID),)
    if block is None:
        return ("norm", ((0, RESID),)) if "final_layer_norm" in name else ("other", ())
    w = _w(name)
    if "layernorm" in name:
        return "norm", ((0, RESID),)
    if ".attention.query_key_value." in name:
        return "qkv", ((0, QKV_HEADS), (1, RESID)) if w else ((0, QKV_HEADS),)
    if ".attention.dense." in name:
        return "o", ((0, RESID), (1, HEADS_Q)) if w else ((0, RESID),)
    if ".mlp.dense_h_to_4h." in name:
        return "up", ((0, MLP), (1, RESID)) if w else ((0, MLP),)
    if ".mlp.dense_4h_to_h." in name:
        return "down", ((0, RESID), (1, MLP)) if w else ((0, RESID),)
    return "other", ()


def _neox_norms(i: int) -> list[tuple[str, list[str]]]:
    pre = f"gpt_neox.layers.{i}"
    return [(f"{pre}.input_layernorm", [f"{pre}.attention.query_key_value"]), (f"{pre}.post_attention_layernorm", [f"{pre}.mlp.dense_h_to_4h"])]


def _neox_final(names: set[str]) -> tuple[str, list[str]]:
    return ("gpt_neox.final_layer_norm", ["embed_out" if "embed_out.weight" in names else "lm_head"])


NEOX = register_family("gpt_neox", FamilyRules(_neox, _neox_norms, _neox_final))


# --- BERT: post-LN encoder.layer.N.attention.self.{query,key,value} ---------------------------------


def _bert(name: str, block: int | None) -> tuple[str, Axes]:
    """Post-LN: every LayerNorm output is the residual stream. The pooler reads it (its output is
    not the residual stream), and an MLM head's transform maps it to itself before the tied decoder."""
    w = _w(name)
    for suffix, role in (("word_embeddings.weight", "embedding"), ("position_embeddings.weight", "pos_embedding"), ("token_type_embeddings.weight", "type_embedding"), ("decoder.weight", "head")):
        if name.endswith(suffix):
            return role, ((1, RESID),)
    if "embeddings.LayerNorm" in name:
        return "norm", ((0, RESID),)
    if name.startswith(("pooler.", "bert.pooler.")):
        return "pooler", ((1, RESID),) if w else ()
    if "predictions.transform.dense" in name:
        return "head_transform", ((0, RESID), (1, RESID)) if w else ((0, RESID),)
    if "predictions.transform.LayerNorm" in name:
        return "norm", ((0, RESID),)
    if name.endswith("predictions.bias"):
        return "head", ()
    if block is None:
        return "other", ()
    if ".attention.self." in name:
        m = re.search(r"\.attention\.self\.(query|key|value)\.", name)
        return (m.group(1)[0] if m else "other"), ((0, HEADS_Q), (1, RESID)) if w else ((0, HEADS_Q),)
    if ".attention.output.dense." in name:
        return "o", ((0, RESID), (1, HEADS_Q)) if w else ((0, RESID),)
    if "LayerNorm" in name:
        return "norm", ((0, RESID),)
    if ".intermediate.dense." in name:
        return "up", ((0, MLP), (1, RESID)) if w else ((0, MLP),)
    if ".output.dense." in name:
        return "down", ((0, RESID), (1, MLP)) if w else ((0, RESID),)
    return "other", ()


BERT = register_family("bert", FamilyRules(_bert, post_ln=True, tied_default=True))


def roles_of(rules: RoleRules, names: Iterable[str]) -> dict[str, TensorRole]:
    return {n: rules.role(n) for n in names}
