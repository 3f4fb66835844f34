"""The anatomy derived from the model itself (zoo/anatomy/derive.py): it gives the same circuits
as the hand-written rules on the families they cover, it verifies itself by function-preserving
transforms on families no code names, and it refuses what it cannot derive with one line."""

from __future__ import annotations

import pytest
import torch

from tests.unit.sane.test_lineage import _model
from tests.unit.zoo.test_anatomy import _unnamed
from xsae_cli.sane.transforms import FUNCTION_PRESERVING, apply
from xsae_cli.zoo.anatomy import QKV_CAT, Anatomy, family_rules
from xsae_cli.zoo.anatomy.derive import AnatomyError, derive, derived_from_config

HAND = ["tiny-gpt2", "tiny-gptneox", "tiny-qwen2", "tiny-mistral", "tiny-gemma"]


def _circuits(state: dict, arch: Anatomy) -> dict:
    from tests.unit.sane.test_circuits import _circuits as circ

    return circ(state, arch)


@pytest.mark.parametrize("name", HAND)
def test_derived_anatomy_gives_the_hand_rules_circuits(name: str) -> None:
    m = _model(name)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    hand = Anatomy.from_config(m.config)
    derived = Anatomy.from_module(m)
    assert family_rules(m.config.model_type) is hand.roles and derived.rules is not hand.roles
    assert (derived.n_heads, derived.n_kv_heads, derived.head_dim, derived.tied) == (hand.n_heads, hand.n_kv_heads, hand.head_dim, hand.tied)
    assert dict(m.state_dict().items()).keys() == state.keys()  # the probe restored the weights
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    a, b = _circuits(state, hand), _circuits(state, derived)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5 * float(a[k].abs().max()), rtol=0), k
    # the roles the transforms read agree on every tensor that either side gives a space
    for n in state:
        h, d = hand.role(n), derived.role(n)
        if h.axes and d.axes and h.role != "qkv":
            assert dict(h.axes).get(h.axis_of("resid"), None) == dict(d.axes).get(d.axis_of("resid"), None), n


@pytest.mark.parametrize("family", sorted(_unnamed()))
def test_unnamed_families_are_derived_and_transforms_preserve_their_logits(family: str) -> None:
    torch.manual_seed(0)
    m = _unnamed()[family]().eval()
    arch = Anatomy.from_module(m)
    assert family_rules(arch.model_type) is None
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    for kind in FUNCTION_PRESERVING:
        new = apply(state, arch, kind, seed=11)
        changed = sum(not torch.equal(new[k], state[k]) for k in state)
        assert changed > 0, kind
        m.load_state_dict(new)
        with torch.no_grad():
            diff = (m(input_ids=ids).logits - ref).abs().max() / ref.abs().max()
        assert diff < 1e-4, (family, kind, float(diff))
    m.load_state_dict(state)


def test_multi_query_fused_layout_and_kv_heads_come_from_the_shapes() -> None:
    from transformers import FalconConfig

    cfg = FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True).to_dict()
    rules, shape = derived_from_config(cfg)
    assert shape.n_kv_heads == 1 and shape.n_heads == 4  # the config says num_kv_heads = 4
    fused = [r for r in rules.inblock.values() if r[0] == "qkv"]
    assert fused and all({s: a for a, s in axes}.get(QKV_CAT) is not None for _, axes in fused)


def test_a_module_without_embedding_or_blocks_is_refused_with_what_is_missing() -> None:
    with pytest.raises(AnatomyError, match="input token embedding"):
        derive(torch.nn.Sequential(torch.nn.Linear(4, 4)))

    class NoBlocks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)

        def forward(self, input_ids):
            return self.emb(input_ids)

    with pytest.raises(AnatomyError, match="no stack of blocks"):
        derive(NoBlocks())


def test_a_probe_too_large_for_memory_is_refused_with_the_size(monkeypatch) -> None:
    from transformers import PhiConfig

    from xsae_cli.zoo.anatomy import derive as mod

    monkeypatch.setattr(mod, "_available_bytes", lambda: 1 << 20)
    cfg = PhiConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4).to_dict()
    with pytest.raises(AnatomyError, match=r"needs [0-9.]+ GiB of memory .*M parameters"):
        mod._build(cfg)


class _Block(torch.nn.Module):
    """A pre-norm block of research code: names no rule knows, RMSNorm written by hand."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.n1, self.n2 = torch.nn.RMSNorm(d), torch.nn.RMSNorm(d)
        self.wq, self.wk, self.wv, self.wo = (torch.nn.Linear(d, d, bias=False) for _ in range(4))
        self.inp, self.outp = torch.nn.Linear(d, 3 * d), torch.nn.Linear(3 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n1(x)
        q, k, v = (f(h).view(b, t, self.num_heads, -1).transpose(1, 2) for f in (self.wq, self.wk, self.wv))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.wo(a)
        return x + self.outp(torch.nn.functional.gelu(self.inp(self.n2(x))))


class _Plain(torch.nn.Module):
    def __init__(self, vocab: int = 64, d: int = 16, heads: int = 4, n: int = 2) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.stack = torch.nn.ModuleList(_Block(d, heads) for _ in range(n))
        self.fin = torch.nn.RMSNorm(d)
        self.unembed = torch.nn.Linear(d, vocab, bias=False)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.unembed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(input_ids)
        for blk in self.stack:
            x = blk(x)
        return self.unembed(self.fin(x))


def test_a_plain_module_of_research_code_is_derived() -> None:
    torch.manual_seed(0)
    m = _Plain().eval()
    arch = Anatomy.from_module(m)
    assert (arch.n_heads, arch.head_dim, arch.n_layers, arch.tied) == (4, 4, 2, False)
    assert [arch.role(f"stack.1.{n}.weight").role for n in ("wq", "wk", "wv", "wo", "inp", "outp", "n1")] == ["q", "k", "v", "o", "up", "down", "norm"]
    assert arch.role("unembed.weight").role == "head" and arch.role("tok.weight").role == "embedding"
    state = {k: v.clone() for k, v in m.state_dict().items()}
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        ref = m(ids)
        for kind in FUNCTION_PRESERVING:
            m.load_state_dict(apply(state, arch, kind, seed=1))
            assert (m(ids) - ref).abs().max() < 1e-4 * ref.abs().max(), kind
