"""Coordinates parsed from real architectures' names, chunking, normalisation, determinism."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from xsae_cli.sane.tokenizer import KIND_ID, CoordScheme, chunk_tensor, model_chunk_count, tensor_coords, tokenize_stream

GPT2 = [
    "transformer.wte.weight",
    "transformer.wpe.weight",
    "transformer.h.0.ln_1.weight",
    "transformer.h.0.attn.c_attn.weight",
    "transformer.h.0.attn.c_proj.weight",
    "transformer.h.0.mlp.c_fc.weight",
    "transformer.h.0.mlp.c_proj.weight",
    "transformer.h.1.mlp.c_fc.weight",
    "transformer.ln_f.weight",
    "transformer.ln_f.bias",
    "lm_head.weight",
]


def coords(names: list[str]) -> dict:
    return {c.name: c for c in tensor_coords(names)}


def test_gpt2_embeddings_at_zero_final_norm_and_head_at_one() -> None:
    c = coords(GPT2)
    assert c["transformer.wte.weight"].depth == 0.0 and c["transformer.wte.weight"].kind == "embedding"
    assert c["transformer.wpe.weight"].depth == 0.0
    assert c["transformer.ln_f.weight"].depth == 1.0 and c["transformer.ln_f.weight"].kind == "norm"
    assert c["lm_head.weight"].depth == 1.0 and c["lm_head.weight"].kind == "head"
    assert c["transformer.h.0.ln_1.weight"].depth == pytest.approx(0.25)  # (0 + 0.5) / 2 layers
    assert c["transformer.h.1.mlp.c_fc.weight"].depth == pytest.approx(0.75)
    kinds = {n: c[n].kind for n in GPT2}
    assert kinds["transformer.h.0.attn.c_attn.weight"] == "attn_qkv"
    assert kinds["transformer.h.0.attn.c_proj.weight"] == "attn_o"
    assert kinds["transformer.h.0.mlp.c_fc.weight"] == "mlp_up"
    assert kinds["transformer.h.0.mlp.c_proj.weight"] == "mlp_down"
    assert all(x.parsed for x in c.values())


EXPECTED = {
    # model: {name: (depth, kind)} with 4 layers for the tiny ones
    "tiny-gptneox": {
        "gpt_neox.embed_in.weight": (0.0, "embedding"),
        "embed_out.weight": (1.0, "head"),
        "gpt_neox.final_layer_norm.weight": (1.0, "norm"),
        "gpt_neox.layers.0.attention.query_key_value.weight": (0.125, "attn_qkv"),
        "gpt_neox.layers.3.attention.dense.weight": (0.875, "attn_o"),
        "gpt_neox.layers.1.mlp.dense_h_to_4h.weight": (0.375, "mlp_up"),
        "gpt_neox.layers.1.mlp.dense_4h_to_h.weight": (0.375, "mlp_down"),
    },
    "tiny-qwen2": {
        "model.embed_tokens.weight": (0.0, "embedding"),
        "lm_head.weight": (1.0, "head"),
        "model.norm.weight": (1.0, "norm"),
        "model.layers.2.self_attn.q_proj.bias": (0.625, "attn_q"),
        "model.layers.2.self_attn.k_proj.weight": (0.625, "attn_k"),
        "model.layers.2.self_attn.v_proj.weight": (0.625, "attn_v"),
        "model.layers.2.self_attn.o_proj.weight": (0.625, "attn_o"),
        "model.layers.0.mlp.gate_proj.weight": (0.125, "mlp_gate"),
        "model.layers.0.mlp.up_proj.weight": (0.125, "mlp_up"),
        "model.layers.0.mlp.down_proj.weight": (0.125, "mlp_down"),
        "model.layers.0.input_layernorm.weight": (0.125, "norm"),
    },
    "tiny-mistral": {
        "model.embed_tokens.weight": (0.0, "embedding"),
        "lm_head.weight": (1.0, "head"),
        "model.norm.weight": (1.0, "norm"),
        "model.layers.3.post_attention_layernorm.weight": (0.875, "norm"),
    },
    "tiny-gemma": {"model.embed_tokens.weight": (0.0, "embedding"), "model.norm.weight": (1.0, "norm"), "model.layers.1.self_attn.q_proj.weight": (0.375, "attn_q")},
    "tiny-gpt2": {
        "transformer.wte.weight": (0.0, "embedding"),
        "transformer.wpe.weight": (0.0, "embedding"),
        "transformer.ln_f.weight": (1.0, "norm"),
        "transformer.h.3.mlp.c_fc.weight": (0.875, "mlp_up"),
    },
    "minilm-l6": {
        "embeddings.word_embeddings.weight": (0.0, "embedding"),
        "embeddings.LayerNorm.weight": (0.0, "norm"),
        "encoder.layer.0.attention.self.query.weight": (1 / 12, "attn_q"),
        "encoder.layer.5.attention.output.dense.weight": (11 / 12, "attn_o"),
        "encoder.layer.2.intermediate.dense.weight": (5 / 12, "mlp_up"),
        "encoder.layer.2.output.dense.weight": (5 / 12, "mlp_down"),
        "encoder.layer.2.output.LayerNorm.weight": (5 / 12, "norm"),
        "pooler.dense.weight": (1.0, "other"),
    },
    "smollm2-135m": {
        "model.embed_tokens.weight": (0.0, "embedding"),
        "model.norm.weight": (1.0, "norm"),
        "model.layers.0.mlp.up_proj.weight": (0.5 / 30, "mlp_up"),
        "model.layers.29.self_attn.o_proj.weight": (29.5 / 30, "attn_o"),
    },
}


@pytest.mark.parametrize("model", sorted(EXPECTED))
def test_demo_zoo_names_parse(demo_zoo, model: str) -> None:
    from xsae_cli.sane.tokenizer import is_float_dtype, unparsed
    from xsae_cli.zoo.registry import resolve_entry
    from xsae_cli.zoo.weights import tensor_index

    index = [t for t in tensor_index(resolve_entry(model)) if is_float_dtype(t.dtype)]
    cs = tensor_coords([t.name for t in index])
    assert unparsed(cs) == []
    by = {c.name: c for c in cs}
    for name, (depth, kind) in EXPECTED[model].items():
        assert by[name].depth == pytest.approx(depth), name
        assert by[name].kind == kind, name
    layer_depths = [c.depth for c in cs if 0 < c.depth < 1]
    assert layer_depths and min(layer_depths) > 0 and max(layer_depths) < 1


def test_encoder_decoder_stacks_laid_end_to_end_and_gguf_names() -> None:
    c = coords(
        [
            "shared.weight",
            "encoder.block.0.layer.0.SelfAttention.q.weight",
            "encoder.block.1.layer.0.SelfAttention.q.weight",
            "decoder.block.0.layer.0.SelfAttention.q.weight",
            "decoder.block.1.layer.0.SelfAttention.q.weight",
            "decoder.final_layer_norm.weight",
        ]
    )
    depths = [c[n].depth for n in c]
    assert depths == pytest.approx([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
    g = coords(["token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output_norm.weight", "output.weight"])
    assert [g[n].depth for n in g] == pytest.approx([0.0, 0.25, 0.75, 1.0, 1.0])
    assert [g[n].kind for n in g] == ["embedding", "attn_q", "mlp_down", "norm", "head"]
    b = coords(["model.decoder.embed_tokens.weight", "model.decoder.layers.0.fc1.weight", "model.decoder.layers.1.fc2.weight", "model.decoder.final_layer_norm.weight"])
    assert [b[n].depth for n in b] == pytest.approx([0.0, 0.25, 0.75, 1.0])


def test_unparsable_names_get_order_and_a_warning_naming_them() -> None:
    names = ["alpha.weight", "beta.weight", "gamma.weight", "delta.weight"]
    cs = tensor_coords(names)
    assert [c.depth for c in cs] == pytest.approx([0.125, 0.375, 0.625, 0.875])
    assert not any(c.parsed for c in cs)

    class T:
        def __init__(self, name: str) -> None:
            self.name, self.dtype, self.numel, self.shape = name, "float32", 10, (10,)

    warnings: list[str] = []
    blocks = list(tokenize_stream([T(n) for n in names], [(n, torch.ones(10)) for n in names], 4, warn=warnings.append))
    assert len(blocks) == 4 and len(warnings) == 1
    assert all(n in warnings[0] for n in names)


def test_configurable_layer_keywords_change_parse_and_scheme_id() -> None:
    names = ["net.cells.0.w", "net.cells.1.w"]
    assert not any(c.parsed for c in tensor_coords(names))
    custom = CoordScheme(layer_keywords=("cells",))
    assert [c.depth for c in tensor_coords(names, custom)] == pytest.approx([0.25, 0.75])
    assert custom.scheme_id != CoordScheme().scheme_id
    assert CoordScheme().scheme_id == CoordScheme().scheme_id


def test_chunking_counts_padding_position_and_normalisation() -> None:
    from xsae_cli.sane.tokenizer import TensorCoord

    g = torch.Generator().manual_seed(0)
    t = torch.randn(10, 10, generator=g) * 3 + 2  # 100 floats -> 2 chunks of 64
    b = chunk_tensor("x", t, TensorCoord("x", 0.5, "mlp_up", True), 64)
    assert b.n == 2 and b.values.shape == (2, 64) and b.values.dtype == np.float16
    assert list(b.valid) == [64, 36]
    assert np.all(b.values[1, 36:] == 0)
    assert list(b.pos) == pytest.approx([0.25, 0.75])
    assert np.all(b.kind == KIND_ID["mlp_up"]) and np.all(b.depth == 0.5)
    back = b.values.astype(np.float32).reshape(-1)[:100] * b.std + b.mean
    assert np.allclose(back, t.reshape(-1).numpy(), atol=3e-2)
    assert b.stats[0, 0] == pytest.approx(float(t.mean()), abs=1e-5)
    assert b.stats[0, 1] == pytest.approx(np.log10(float(t.std(correction=0))), abs=1e-5)
    const = chunk_tensor("c", torch.ones(64), TensorCoord("c", 1.0, "norm", True), 64)
    assert np.all(const.values == 0) and np.isfinite(const.stats).all()
    assert chunk_tensor("b", torch.randn(8, dtype=torch.bfloat16), TensorCoord("b", 0.1, "other", True), 64).n == 1


def test_chunking_is_vectorised_and_deterministic() -> None:
    from xsae_cli.sane.tokenizer import TensorCoord

    t = torch.randn(2048, 2048)  # 65,536 chunks
    c = TensorCoord("w", 0.5, "mlp_up", True)
    t0 = time.perf_counter()
    a = chunk_tensor("w", t, c, 64)
    assert time.perf_counter() - t0 < 2.0  # a Python loop per chunk would take far longer
    b = chunk_tensor("w", t, c, 64)
    assert a.n == 65536 and np.array_equal(a.values, b.values) and np.array_equal(a.pos, b.pos)
    torch.set_num_threads(2)  # the same bytes whatever the thread count
    try:
        assert np.array_equal(chunk_tensor("w", t, c, 64).values, a.values) and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_chunk_counts_of_real_models_from_headers(demo_zoo) -> None:
    from xsae_cli.zoo.registry import resolve_entry
    from xsae_cli.zoo.weights import tensor_index

    idx = tensor_index(resolve_entry("minilm-l6"))
    floats = [t for t in idx if t.dtype.startswith("float")]
    assert model_chunk_count(idx, 64) == sum(-(-t.numel // 64) for t in floats)
    assert model_chunk_count(idx, 64) == 354894  # position_ids (int64) is skipped
    assert model_chunk_count(tensor_index(resolve_entry("smollm2-135m")), 64) == 134515008 // 64


def test_scheme_ids_name_their_view() -> None:
    from xsae_cli.sane.tokenizer import view_of_scheme
    from xsae_cli.sane.views import view_names

    ids = {v: CoordScheme(view=v).scheme_id for v in view_names()}
    assert len(set(ids.values())) == 3 and all(view_of_scheme(i) == v for v, i in ids.items())
    assert ids["weights"].startswith("weights-v1-") and ids["canonical"].startswith("canonical-v1-")
    # the circuit view's output changed (outlier filter): a new id, so its old caches are not reused
    assert ids["circuits"].startswith("circuits-v3-")
    assert view_of_scheme("depth-v1-c36b39050f") == "weights"  # checkpoints from before views
