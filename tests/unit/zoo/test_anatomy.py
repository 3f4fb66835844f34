"""One model anatomy, held equal across its sources: the loaded module, the config and the tensor
names (block count, block paths, tensor -> block), for the test zoo's families and for families no
code names; per-family roles agree with the tokenizer's name kinds and the config's head split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xsae_cli.zoo.anatomy import (
    HEADS_KV,
    HEADS_Q,
    MLP,
    QKV,
    QKV_HEADS,
    RESID,
    Anatomy,
    Blocks,
    block_index,
    config_blocks,
    count_blocks,
    family_rules,
)


def _named() -> dict:
    """The test zoo's families, as the lineage benchmark builds them, plus Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from xsae_cli.sane.lineage.zoo import _tiny_builders

    out = dict(_tiny_builders())
    out["tiny-llama"] = lambda: LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    )
    return out


def _unnamed() -> dict:
    """Families no rule in the code names (block layouts differ: parallel attention, MQA, a decoder stack)."""
    from transformers import (
        AutoModelForCausalLM,
        FalconConfig,
        GPTJConfig,
        OPTConfig,
        PhiConfig,
        StableLmConfig,
    )

    cfgs = {
        "phi": PhiConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64),
        "gptj": GPTJConfig(vocab_size=128, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=64),
        "opt": OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64),
        "falcon": FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, multi_query=True),
        "stablelm": StableLmConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    }
    return {k: (lambda c=c: AutoModelForCausalLM.from_config(c)) for k, c in cfgs.items()}


NAMED = sorted(["tiny-gpt2", "tiny-gptneox", "tiny-qwen2", "tiny-mistral", "tiny-gemma", "tiny-bert", "tiny-llama"])
UNNAMED = ["phi", "gptj", "opt", "falcon", "stablelm"]


def _build(name: str):
    torch.manual_seed(0)
    return (_named() if name in NAMED else _unnamed())[name]().eval()


@pytest.mark.parametrize("name", NAMED + UNNAMED)
def test_blocks_agree_across_module_config_and_names(name: str, tmp_path: Path) -> None:
    from xsae_cli.align.sides import n_blocks
    from xsae_cli.data.activations import resolve_module_name
    from xsae_cli.zoo.registry import describe
    from xsae_cli.zoo.sources import resolve

    if name in UNNAMED:
        assert family_rules(_build(name).config.model_type) is None  # really a family no rule names
    m = _build(name)
    names = list(m.state_dict())
    from_module, from_names = Blocks.from_module(m), Blocks.from_names(names)
    n = config_blocks(m.config)
    assert n == (3 if name in UNNAMED or name == "tiny-llama" else 4)
    assert from_module.paths == from_names.paths and from_module.n_blocks == n
    assert from_module.paths[0].endswith(".0") and len(set(from_module.paths)) == n
    for t in names:
        i = from_names.index(t)
        assert i == from_module.index(t), t
        assert (i is None) == (block_index(t) is None), t
        if i is not None:
            assert t.startswith(from_module.paths[i] + "."), t
            assert from_names.depth(t) == pytest.approx((i + 0.5) / n)
    assert sum(from_names.index(t) is not None for t in names) > len(names) // 2
    # the consumers: a bare block number, align's depth, the zoo's catalogue row from the saved files
    assert resolve_module_name(m, str(n - 1)) == from_module.paths[-1]
    assert n_blocks(m) == count_blocks(m) == n
    m.save_pretrained(tmp_path, safe_serialization=True)
    resolved = resolve(str(tmp_path))
    assert config_blocks(resolved.config) == n and describe(resolved, "m").layers == n
    from xsae_cli.zoo.weights import tensor_index

    assert Blocks.from_names(t.name for t in tensor_index(resolved)).paths == from_names.paths


def test_names_alone_give_blocks_when_the_config_does_not() -> None:
    from xsae_cli.zoo.anatomy import config_value

    gguf = ["token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.2.attn_q.weight", "output_norm.weight"]
    b = Blocks.from_names(gguf)
    assert b.paths == ("blk.0", "blk.1", "blk.2") and b.index("blk.1.ffn_down.weight") == 1 and b.index("output_norm.weight") is None
    assert config_blocks({}) is None and config_blocks({"n_layer": 5}) == 5 and config_value({"n_embd": 8}, "hidden") == 8
    # stacks laid end to end; a block missing from a file saved in part keeps its place
    t5 = Blocks.from_names(["encoder.block.0.x", "encoder.block.1.x", "decoder.block.0.x", "decoder.block.2.x"])
    assert t5.paths == ("encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1", "decoder.block.2")
    assert t5.index("decoder.block.2.x") == 4 and t5.stacks == (("encoder", 2), ("decoder", 3))
    assert Blocks.from_names(["net.cells.0.w", "net.cells.1.w"], keywords=("cells",)).n_blocks == 2


ROLE_KIND = {
    "embedding": "embedding",
    "pos_embedding": "embedding",
    "type_embedding": "embedding",
    "head": "head",
    "norm": "norm",
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "qkv": "attn_qkv",
    "o": "attn_o",
    "up": "mlp_up",
    "gate": "mlp_gate",
    "down": "mlp_down",
}


@pytest.mark.parametrize("name", NAMED)
def test_family_roles_agree_with_name_kinds_and_the_config_head_split(name: str) -> None:
    from xsae_cli.sane.tokenizer import tensor_kind

    m = _build(name)
    a = Anatomy.from_config(m.config)
    if name in ("tiny-qwen2", "tiny-mistral", "tiny-llama"):
        assert a.n_kv_heads == 2 < a.n_heads  # grouped-query attention
    if name == "tiny-gemma":
        assert a.n_kv_heads == 1 and a.head_dim == 16  # multi-query, head_dim from the config
    seen: dict[str, set] = {}
    mlp_width: dict[int, set] = {}
    for t, w in m.state_dict().items():
        if not w.is_floating_point():
            continue
        r = a.role(t)
        if r.role in ROLE_KIND:
            assert tensor_kind(t) == ROLE_KIND[r.role], (t, r.role)
        seen.setdefault(r.role, set()).add(t)
        assert r.block == Blocks.from_module(m).index(t), t
        for axis, space in r.axes:
            size = w.shape[axis]
            want = {RESID: a.d_model, HEADS_Q: a.q_width, HEADS_KV: a.kv_width, QKV: 3 * a.q_width, QKV_HEADS: 3 * a.q_width}.get(space)
            if space == MLP:
                mlp_width.setdefault(r.block, set()).add(size)
            else:
                assert size == want, (t, space, size, want)
    assert {"embedding", "norm", "o", "up", "down"} <= set(seen) and ({"q", "k", "v"} <= set(seen) or "qkv" in seen), seen.keys()
    assert len(mlp_width) == a.n_layers and all(len(v) == 1 for v in mlp_width.values())  # one MLP width per block
    assert a.norm_readers(m.state_dict()) or a.post_ln  # pre-norm families fold gains into their readers


def test_a_replacement_role_source_is_all_the_consumers_need() -> None:
    """The swap issue 16 makes: consumers ask an anatomy's ``rules``; a role source built elsewhere
    (here: a table recorded from the family rules) gives the same permutation and canonical form."""
    from xsae_cli.sane.transforms import apply
    from xsae_cli.sane.views.canonical import canonicalize

    m = _build("tiny-qwen2")
    state = {k: v.clone() for k, v in m.state_dict().items()}
    fam = family_rules("qwen2")
    table = {k: fam.role(k) for k in state}

    class Recorded:
        post_ln = False
        tied_default = False

        def role(self, name: str):
            return table[name]

        def norm_readers(self, n_layers, tied, names):
            return fam.norm_readers(n_layers, tied, names)

        def attention_prefixes(self, names):
            return []

    fast, swapped = Anatomy.from_config(m.config), Anatomy.from_config(m.config, rules=Recorded())
    assert swapped.rules is not fast.rules
    for kind in ("perm_full", "norm_rescale"):
        a, b = apply(state, fast, kind, 4), apply(state, swapped, kind, 4)
        assert all(torch.equal(a[k], b[k]) for k in state)
    ca, cb = canonicalize(state, fast), canonicalize(state, swapped)
    assert all(torch.equal(ca[k], cb[k]) for k in state)


def test_unknown_family_is_named_in_one_line() -> None:
    """Without derivation a family no rule names is refused; with it (the default) it is derived,
    and a model type transformers cannot build is refused naming the type."""
    from xsae_cli.core.errors import XsaeError

    with pytest.raises(XsaeError, match="no tensor roles are known for model type 'phi'"):
        Anatomy.from_config(_build("phi").config, derive=False)
    assert Anatomy.from_config(_build("phi").config).roles is not None
    with pytest.raises(XsaeError, match="cannot build model type 'no-such-family'"):
        Anatomy.from_config({"model_type": "no-such-family", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1})
