"""Canonical form: same function, and one form for a whole function-preserving orbit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.unit.sane.test_lineage import PROBE, _model
from xsae_cli.sane.transforms import FUNCTION_PRESERVING, Arch, apply
from xsae_cli.sane.views.canonical import canonical_stream, canonicalize, plan_from

FAMILIES = ["tiny-gpt2", "tiny-gptneox", "tiny-qwen2", "tiny-mistral", "tiny-gemma", "tiny-bert"]


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max() / (b[k].float().abs().max() + 1e-12)) for k in b if b[k].is_floating_point())


@pytest.mark.parametrize("name", FAMILIES)
def test_canonical_form_keeps_the_function_and_collapses_every_symmetry(name: str) -> None:
    m = _model(name)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    arch = Arch.from_config(m.config)
    with torch.no_grad():
        ref = m(input_ids=PROBE).logits
    canon = canonicalize(state, arch)
    assert _max_rel(canon, state) > 1e-2, "the canonical form of a random model is not the model itself"
    m.load_state_dict(canon)
    with torch.no_grad():
        got = m(input_ids=PROBE).logits
    assert torch.allclose(got, ref, atol=1e-5 * float(ref.abs().max()), rtol=0), (name, float((got - ref).abs().max()))
    for kind in FUNCTION_PRESERVING:
        for seed in (1, 2):
            other = canonicalize(apply(state, arch, kind, seed), arch)
            assert _max_rel(other, canon) < 1e-5, (name, kind, seed, _max_rel(other, canon))
    # a different model of the same family stays different
    m2 = _model(name, seed=1)
    assert _max_rel(canonicalize(m2.state_dict(), arch), canon) > 0.1


def test_plan_sorts_every_group_and_is_idempotent() -> None:
    m = _model("tiny-qwen2")
    arch = Arch.from_config(m.config)
    state = m.state_dict()
    plan, why = plan_from(arch, state.items())
    assert plan is not None, why
    assert plan.sorted_groups == {"resid": 1, "heads": arch.n_layers, "mlp": arch.n_layers}
    canon = canonicalize(state, arch)
    again = canonicalize(canon, arch)
    assert _max_rel(again, canon) < 1e-6
    # sorted: the writer-side keys come out ascending
    down = canon["model.layers.0.mlp.down_proj.weight"]
    key = (down.double() ** 2).sum(0)
    assert bool((key[1:] >= key[:-1] - 1e-9).all())


def test_unknown_layout_passes_through_with_a_reason(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from xsae_cli.zoo.sources import resolve
    from xsae_cli.zoo.weights import iter_weights

    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"blk.0.attn_q.weight": torch.randn(8, 8)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1}')
    warned: list[str] = []
    stream, info = canonical_stream(resolve(str(folder)), iter_weights, warn=warned.append)
    assert info["applied"] is False and "no llama tensor names" in info["reason"]
    assert [n for n, _ in stream] == ["blk.0.attn_q.weight"]
    assert warned and "tokenised as stored" in warned[0]
