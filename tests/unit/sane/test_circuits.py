"""Token-space circuit view: the same circuits for every function-preserving variant of a model,
different circuits for another seed, and a fine-tune keeps entries where they were."""

from __future__ import annotations

import pytest
import torch

from tests.unit.sane.test_lineage import _model
from xsae_cli.sane.transforms import FUNCTION_PRESERVING, Arch, apply, elementwise, finetune
from xsae_cli.sane.views.canonical import plan_from
from xsae_cli.sane.views.circuits import _embed_name, _top_eigh, anchor_ids, anchor_rows, circuit_tensors, outlier_filter, shrink_outliers

FAMILIES = ["tiny-gpt2", "tiny-gptneox", "tiny-qwen2", "tiny-mistral", "tiny-gemma", "tiny-bert"]


def _circuits(state: dict, arch: Arch, filtered: bool = True) -> dict:
    plan, why = plan_from(arch, state.items())
    assert plan is not None, why
    emb = next(v for k, v in state.items() if _embed_name(arch, k))
    anchors = anchor_rows(emb)[0] if filtered else emb[anchor_ids(emb.shape[0])]
    out, _ = circuit_tensors(arch, state.items(), plan, anchors)
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

    from xsae_cli.sane.lineage.zoo import _real_folder

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


def _rowcorr(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.reshape(-1) - a.mean(), b.reshape(-1) - b.mean()
    return float(x @ y / (x.norm() * y.norm()))


def test_outlier_filter_leaves_random_embeddings_alone_and_removes_a_common_shift() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(512, 64, generator=g) * 0.02
    v, shrink, info = outlier_filter(base)
    assert info["outlier_directions"] == 0 and not shrink.any() and torch.equal(shrink_outliers(base, v, shrink), base.double())
    # what a fine-tune does to a tied embedding: (nearly) one vector added to every row, in varying amounts
    shift = torch.randn(64, generator=g) * 0.1
    moved = base + 0.01 * torch.randn(512, 64, generator=g) + (1 + 0.3 * torch.randn(512, 1, generator=g)) * shift
    v2, shrink2, info2 = outlier_filter(moved)
    assert info2["outlier_directions"] >= 1 and info2["largest_outlier_ratio"] > 30
    cleaned = shrink_outliers(moved, v2, shrink2)
    assert _rowcorr(moved, base) < 0.3 < 0.8 < _rowcorr(cleaned, base.double()), (_rowcorr(moved, base), _rowcorr(cleaned, base.double()))
    # a function of the rows' second moment: a permuted residual stream gets the permuted result
    perm = torch.randperm(64, generator=g)
    v3, shrink3, _ = outlier_filter(moved[:, perm])
    assert torch.allclose(shrink_outliers(moved[:, perm], v3, shrink3), cleaned[:, perm], atol=1e-6)


def test_randomised_top_eigenpairs_match_eigh() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 700, generator=g)
    x[:, :3] *= torch.tensor([30.0, 20.0, 10.0])  # three planted outliers
    lam, v = _top_eigh(x, 8)
    gram = x.double().t() @ x.double()
    exact = torch.linalg.eigvalsh(gram).flip(0)
    assert torch.allclose(lam[:3], exact[:3], rtol=1e-6)
    assert float((v[:, :3].t() @ gram @ v[:, :3] - torch.diag(lam[:3])).abs().max()) < 1e-5 * float(lam[0])
    assert lam[3] <= exact[3] * 1.0001 and lam[3] > 0.8 * exact[3]  # the bulk's top is only estimated: it is barely touched


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gemma"])
def test_a_long_finetune_of_a_tied_model_keeps_its_circuits_near_the_base(name: str) -> None:
    """The lineage benchmark's hardest case: 200 Adam steps at 1e-3 on a tied-embedding model.
    Without the outlier filter its circuits keep ~4 % correlation with the base; with it ~35 %."""
    m = _model(name)
    arch = Arch.from_config(m.config)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    ids = torch.randint(0, 512, (20000,), generator=torch.Generator().manual_seed(3)) % 97 * 5  # a skewed corpus
    finetune(m, ids, 200, 1e-3, seed=4, batch_size=4, seq_len=32)
    tuned = {k: v.clone() for k, v in m.state_dict().items()}
    stranger = _model(name, seed=1).state_dict()
    with_filter = _corr(_circuits(tuned, arch), _circuits(base, arch))
    without = _corr(_circuits(tuned, arch, filtered=False), _circuits(base, arch, filtered=False))
    other = abs(_corr(_circuits(tuned, arch), _circuits(stranger, arch)))
    assert with_filter > max(3 * without, 5 * other, 0.15), (with_filter, without, other)
