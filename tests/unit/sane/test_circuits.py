"""Token-space circuit view: the same circuits for every function-preserving variant of a model,
different circuits for another seed, and a fine-tune keeps entries where they were."""

from __future__ import annotations

import pytest
import torch

from tests.unit.sane.test_lineage import _model
from xsae_cli.sane.canonical import plan_from
from xsae_cli.sane.circuits import _embed_name, anchor_ids, circuit_tensors
from xsae_cli.sane.transforms import FUNCTION_PRESERVING, Arch, apply, elementwise

FAMILIES = ["tiny-gpt2", "tiny-gptneox", "tiny-qwen2", "tiny-mistral", "tiny-gemma", "tiny-bert"]


def _circuits(state: dict, arch: Arch) -> dict:
    plan, why = plan_from(arch, state.items())
    assert plan is not None, why
    emb = next(v for k, v in state.items() if _embed_name(arch, k))
    out, _ = circuit_tensors(arch, state.items(), plan, emb[anchor_ids(emb.shape[0])])
    return out


def _corr(a: dict, b: dict) -> float:
    x = torch.cat([a[k].reshape(-1) / a[k].norm() for k in a])
    y = torch.cat([b[k].reshape(-1) / b[k].norm() for k in a])
    x, y = x - x.mean(), y - y.mean()
    return float(x @ y / (x.norm() * y.norm()))


@pytest.mark.parametrize("name", FAMILIES)
def test_circuits_are_invariant_to_every_symmetry_and_tell_seeds_apart(name: str) -> None:
    m = _model(name)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    arch = Arch.from_config(m.config)
    ref = _circuits(state, arch)
    kinds = {k.split(".")[-1] for k in ref}
    assert {"gram", "circuit_qk", "circuit_ov", "circuit_mlp"} <= kinds, kinds
    assert ("circuit_gate" in kinds) == (arch.model_type in ("qwen2", "mistral", "gemma"))
    assert all(v.shape == (64, 64) for v in ref.values())
    for kind in FUNCTION_PRESERVING:
        other = _circuits(apply(state, arch, kind, seed=5), arch)
        assert other.keys() == ref.keys()
        for k in ref:
            assert torch.allclose(other[k], ref[k], atol=1e-4 * float(ref[k].abs().max()), rtol=0), (name, kind, k)
    noisy = _circuits(elementwise(state, "noise_0.3", seed=1), arch)
    stranger = _circuits(_model(name, seed=1).state_dict(), arch)
    assert _corr(noisy, ref) > 0.7 > 0.2 > abs(_corr(stranger, ref)), (_corr(noisy, ref), _corr(stranger, ref))


@pytest.mark.slow
def test_real_models_circuits_are_invariant(demo_zoo) -> None:
    from transformers import AutoModelForCausalLM, BertForMaskedLM

    from xsae_cli.sane.evaluate import _real_folder

    for name, cls in (("smollm2-135m", AutoModelForCausalLM), ("minilm-l6", BertForMaskedLM)):
        torch.manual_seed(0)
        m = cls.from_pretrained(_real_folder(name), dtype=torch.float32)
        state = {k: v.clone() for k, v in m.state_dict().items()}
        arch = Arch.from_config(m.config)
        ref = _circuits(state, arch)
        for kind in ("perm_full", "norm_rescale"):
            other = _circuits(apply(state, arch, kind, seed=1), arch)
            for k in ref:
                assert torch.allclose(other[k], ref[k], atol=1e-4 * float(ref[k].abs().max()), rtol=0), (name, kind, k)
