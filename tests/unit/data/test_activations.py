"""xsae_cli.data.activations on tiny random Llama, GPT-2 and BERT models (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.data.activations import ActivationStore, ShardedActivations, resolve_module, resolve_module_name
from xsae_cli.data.corpus import builtin_texts, tokenize_contexts

from . import tiny_tokenizer

V = 400  # tiny tokenizer's vocabulary


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=V, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=V, max_position_embeddings=64)
    return BertModel(cfg).eval()


MODELS = {"llama": (_llama, "model.layers.{}"), "gpt2": (_gpt2, "transformer.h.{}"), "bert": (_bert, "encoder.layer.{}")}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def contexts(tok):
    # Short stdlib docstrings: many EOS separators inside packed contexts, and a padded last one.
    return tokenize_contexts(list(builtin_texts()[-30:]), tok, 24)


@pytest.fixture(scope="module")
def small(contexts):
    return contexts.select(slice(len(contexts) - 10, len(contexts)))  # includes the padded last context


@pytest.fixture(scope="module")
def llama():
    return _llama()


def _reference(model, c, layer):
    """Layer output at every kept (non-special) position, from a full forward with output_hidden_states."""
    with torch.no_grad():
        out = model(input_ids=c.input_ids, attention_mask=c.attention_mask, output_hidden_states=True)
    hs = out.hidden_states[layer + 1]
    return hs.reshape(-1, hs.shape[-1])[~c.special_mask.reshape(-1)]


# --------------------------------------------------------------------------------------- capture


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_hooks_equal_output_hidden_states(arch, tok, small):
    make, pattern = MODELS[arch]
    model = make()
    store = ActivationStore(model, tok, [pattern.format(1)], small, shuffle=False, batch_contexts=4)
    got = store.harvest()[pattern.format(1)]
    torch.testing.assert_close(got, _reference(model, small, 1))
    assert store.stats.tokens_kept == got.shape[0] == small.n_content_tokens


def test_several_hooks_in_one_forward_and_aligned_rows(tok, small, llama):
    calls = []
    handle = llama.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    try:
        store = ActivationStore(llama, tok, ["model.layers.0", "layers.2"], small, shuffle=False, batch_contexts=4)
        acts = store.harvest()
    finally:
        handle.remove()
    assert len(calls) == store.stats.forwards == 3  # 10 contexts / 4 per forward, not one per hook
    torch.testing.assert_close(acts["model.layers.0"], _reference(llama, small, 0))
    torch.testing.assert_close(acts["layers.2"], _reference(llama, small, 2))
    assert store.d_in == {"model.layers.0": 32, "layers.2": 32}


def test_stop_early_skips_later_layers_with_identical_activations(tok, small, llama):
    ran = {"last": 0, "head": 0}
    h1 = llama.model.layers[3].register_forward_hook(lambda *a: ran.__setitem__("last", ran["last"] + 1))
    h2 = llama.lm_head.register_forward_hook(lambda *a: ran.__setitem__("head", ran["head"] + 1))
    try:
        early = ActivationStore(llama, tok, ["model.layers.1"], small, shuffle=False, batch_contexts=5)
        a = early.harvest()
        assert ran == {"last": 0, "head": 0}
        full = ActivationStore(llama, tok, ["model.layers.1"], small, shuffle=False, batch_contexts=5, stop_early=False)
        b = full.harvest()
        assert ran["last"] == 2
        assert ran["head"] == 0  # hooks inside the base model: the LM head never runs
    finally:
        h1.remove()
        h2.remove()
    assert torch.equal(a["model.layers.1"], b["model.layers.1"])


def test_input_site_is_previous_blocks_output(tok, small, llama):
    inp = ActivationStore(llama, tok, ["model.layers.2"], small, site="input", shuffle=False).harvest()["model.layers.2"]
    out = ActivationStore(llama, tok, ["model.layers.1"], small, shuffle=False).harvest()["model.layers.1"]
    torch.testing.assert_close(inp, out)


def test_special_and_pad_positions_dropped_and_counted(tok, small, llama):
    assert small.attention_mask[-1, -1] == 0  # the fixture's last context is padded
    real = small.attention_mask.bool()
    n_special = int((small.special_mask & real).sum())
    assert n_special > len(small)  # BOS at every context start plus EOS separators inside
    store = ActivationStore(llama, tok, ["model.layers.1"], small, shuffle=False)
    acts = store.harvest()["model.layers.1"]
    assert store.stats.dropped_special == n_special
    assert store.stats.tokens_seen == int(real.sum())
    assert acts.shape[0] == int(real.sum()) - n_special
    keep_all = ActivationStore(llama, tok, ["model.layers.1"], small, shuffle=False, drop_special=False)
    everything = keep_all.harvest()["model.layers.1"]
    assert keep_all.stats.dropped_special == 0
    assert everything.shape[0] == int(real.sum())  # padding is dropped even then


def test_outliers_dropped_and_counted(tok, small, llama):
    positions = ~small.special_mask
    positions[:, :5] = False
    target = positions.float().argmax(dim=1)  # one content position per context past the start

    def inflate(module, args, output):
        output = output.clone()
        output[torch.arange(output.shape[0]), target[: output.shape[0]]] *= 1000
        return output

    handle = llama.model.layers[1].register_forward_hook(inflate)
    try:
        store = ActivationStore(llama, tok, ["model.layers.1"], small, shuffle=False, batch_contexts=len(small), outlier_factor=10)
        acts = store.harvest()["model.layers.1"]
    finally:
        handle.remove()
    assert store.stats.dropped_outliers == len(small)
    assert acts.shape[0] == small.n_content_tokens - len(small)
    assert acts.norm(dim=-1).max() < 100


def test_shuffle_seeded_and_batch_sizes(tok, small, llama):
    plain = ActivationStore(llama, tok, ["model.layers.1"], small, shuffle=False).harvest()["model.layers.1"]

    def run(seed):
        store = ActivationStore(llama, tok, ["model.layers.1", "model.layers.0"], small, seed=seed, shuffle_buffer_tokens=40, batch_contexts=2)
        return list(store.batches(16))

    a, b, c = run(0), run(0), run(1)
    sizes = [x["model.layers.1"].shape[0] for x in a]
    assert all(s == 16 for s in sizes[:-1]) and 0 < sizes[-1] <= 16 and sum(sizes) == plain.shape[0]
    cat = lambda bs, h="model.layers.1": torch.cat([x[h] for x in bs])  # noqa: E731
    assert torch.equal(cat(a), cat(b))
    assert not torch.equal(cat(a), cat(c))
    assert not torch.equal(cat(a), plain)
    order = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    torch.testing.assert_close(order(cat(a)), order(plain))  # same tokens, another order
    # rows stay aligned across hooks after shuffling
    l0 = ActivationStore(llama, tok, ["model.layers.0"], small, shuffle=False).harvest()["model.layers.0"]
    idx = torch.argsort(plain[:, 0])
    torch.testing.assert_close(order(cat(a))[:, :], plain[idx])
    mapping = torch.argsort(cat(a)[:, 0])
    torch.testing.assert_close(cat(a, "model.layers.0")[mapping], l0[idx])


def test_max_tokens_dtype_and_autograd(tok, small, llama):
    store = ActivationStore(llama, tok, ["model.layers.1"], small, dtype=torch.bfloat16, shuffle_buffer_tokens=64)
    batches = list(store.batches(32, max_tokens=70))
    assert [x["model.layers.1"].shape for x in batches] == [(32, 32), (32, 32), (6, 32)]
    assert batches[0]["model.layers.1"].dtype == torch.bfloat16
    # batches feed training: they must not be inference tensors
    x = store.harvest(8)["model.layers.1"].float()
    w = torch.randn(32, 4, requires_grad=True)
    (x @ w).square().sum().backward()
    assert w.grad is not None


def test_eval_mode_and_training_flag_restored(tok, small):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=64, resid_pdrop=0.5, embd_pdrop=0.5)).train()
    a = ActivationStore(model, tok, ["h.0"], small, shuffle=False).harvest()["h.0"]
    b = ActivationStore(model, tok, ["h.0"], small, shuffle=False).harvest()["h.0"]
    assert torch.equal(a, b)  # dropout off
    assert all(m.training for m in model.modules())  # every module's flag restored


def test_batches_run_under_another_progress_bar(tok, small, llama):
    from xsae_cli.core.console import progress

    with progress() as bar:  # a trainer's live display; rich < 15 allows only one at a time
        bar.add_task("training", total=1, unit="step")
        n = sum(b["model.layers.0"].shape[0] for b in ActivationStore(llama, tok, ["model.layers.0"], small).batches(64))
    assert n == small.n_content_tokens


# --------------------------------------------------------------------------------------- paths


def test_module_path_variants(llama):
    gpt2, bert = _gpt2(), _bert()
    for path in ("model.layers.2", "layers.2", "2", " model.layers.2 "):
        assert resolve_module_name(llama, path) == "model.layers.2"
    assert resolve_module(llama, "layers.2") is llama.model.layers[2]
    for path in ("transformer.h.1", "h.1", "model.transformer.h.1", "1"):
        assert resolve_module_name(gpt2, path) == "transformer.h.1"
    for path in ("encoder.layer.1", "bert.encoder.layer.1", "model.encoder.layer.1"):
        assert resolve_module_name(bert, path) == "encoder.layer.1"
    assert resolve_module_name(llama.model, "model.layers.0.mlp") == "layers.0.mlp"


def test_unknown_path_lists_nearest_modules(llama):
    with pytest.raises(XsaeError) as err:
        resolve_module_name(llama, "model.layer.1")
    assert "no module 'model.layer.1'" in err.value.message
    assert "model.layers.1" in err.value.hint
    with pytest.raises(XsaeError, match="layer 9 is out of range"):
        resolve_module_name(llama, "9")
    with pytest.raises(XsaeError, match="nearest module names"):
        ActivationStore(llama, None, ["model.layers.1.mpl"], tokenize_contexts(["abc"], tiny_tokenizer(), 8))


# --------------------------------------------------------------------------------------- shards


def test_shard_round_trip(tok, small, llama, tmp_path):
    hooks = ["model.layers.0", "model.layers.2"]
    make = lambda: ActivationStore(llama, tok, hooks, small, shuffle_buffer_tokens=50, seed=3, batch_contexts=3)  # noqa: E731
    in_memory = make().harvest(150)
    out = make().save_shards(tmp_path / "acts", n_tokens=150, shard_tokens=64, corpus="builtin")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["meta.json", "shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["hooks"] == hooks and meta["d_in"] == {h: 32 for h in hooks} and meta["n_tokens"] == 150
    assert meta["context_size"] == 24 and meta["corpus"] == "builtin" and meta["stats"]["dropped_special"] > 0
    assert [s["n_tokens"] for s in meta["shards"]] == [64, 64, 22]
    cache = ShardedActivations(out)
    assert len(cache) == 150 and cache.d_in == {h: 32 for h in hooks}
    loaded = cache.load()
    for h in hooks:
        assert torch.equal(loaded[h], in_memory[h])
    ordered = list(cache.batches(40, shuffle=False))
    assert torch.equal(torch.cat([b["model.layers.2"] for b in ordered]), in_memory["model.layers.2"])
    shuffled = list(cache.batches(40, seed=1))
    assert [b["model.layers.0"].shape[0] for b in shuffled] == [40, 40, 40, 30]
    s0 = torch.cat([b["model.layers.0"] for b in shuffled])
    s2 = torch.cat([b["model.layers.2"] for b in shuffled])
    assert not torch.equal(s0, in_memory["model.layers.0"])
    idx = torch.argsort(s0[:, 0])
    ref = torch.argsort(in_memory["model.layers.0"][:, 0])
    assert torch.equal(s0[idx], in_memory["model.layers.0"][ref])
    assert torch.equal(s2[idx], in_memory["model.layers.2"][ref])  # rows still aligned across hooks
    assert sum(b["model.layers.2"].shape[0] for b in cache.batches(40, max_tokens=90, hooks=["model.layers.2"])) == 90
    with pytest.raises(XsaeError, match="already exists"):
        make().save_shards(out, n_tokens=10)
    with pytest.raises(XsaeError, match="hook model.layers.9 is not in the activation cache"):
        list(cache.batches(8, hooks=["model.layers.9"]))
    (out / "shard_00001.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(XsaeError, match="corrupt or truncated"):
        ShardedActivations(out)
    with pytest.raises(XsaeError, match="activation cache not found"):
        ShardedActivations(tmp_path / "missing")
