"""Known-answer invariance on families no rule in the code names (their anatomy derived from the
model): every function-preserving transform (MLP neurons, heads, residual coordinates, norm gains
moved into the next linear) leaves the logits unchanged (checked) and the circuits and the
canonical form unchanged to float tolerance, while another seed's model does not match."""

from __future__ import annotations

import pytest
import torch

from tests.unit.sane.test_circuits import _circuits
from tests.unit.zoo.test_anatomy import _unnamed
from xsae_cli.sane.transforms import FUNCTION_PRESERVING, apply
from xsae_cli.sane.views.canonical import canonicalize
from xsae_cli.zoo.anatomy import Anatomy


def _model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    m = _unnamed()[family]().eval()
    with torch.no_grad():  # non-trivial norm gains and biases (ones and zeros would hide a missed fold)
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("family", sorted(_unnamed()))
def test_function_preserving_transforms_leave_logits_circuits_and_canonical_form_unchanged(family: str) -> None:
    m = _model(family)
    arch = Anatomy.from_module(m)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_logits = m(input_ids=ids).logits
    ref = _circuits(state, arch)
    assert {"gram", "circuit_qk", "circuit_ov", "circuit_mlp"} <= {k.split(".")[-1] for k in ref}
    ref_canon = canonicalize(state, arch)
    for kind in FUNCTION_PRESERVING:
        new = apply(state, arch, kind, seed=5)
        m.load_state_dict(new)
        with torch.no_grad():
            assert (m(input_ids=ids).logits - ref_logits).abs().max() < 1e-4 * ref_logits.abs().max(), (family, kind)
        got = _circuits(new, arch)
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.allclose(got[k], ref[k], atol=1e-4 * float(ref[k].abs().max()), rtol=0), (family, kind, k)
        canon = canonicalize(new, arch)
        for k in ref_canon:
            assert torch.allclose(canon[k].float(), ref_canon[k].float(), atol=1e-4 * float(ref_canon[k].float().abs().max() + 1e-12), rtol=0), (family, kind, k)
    other = _circuits(_model(family, seed=1).state_dict(), arch)
    far = max(float((other[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)
    assert far > 0.1, far


def _untied(build):
    """The family's model with its head untied (a copy of the embedding): what a rotation makes of it."""
    m = build()
    if m.config.tie_word_embeddings:
        cfg = m.config
        cfg.tie_word_embeddings = False
        u = type(m)(cfg)
        state = m.state_dict()
        state[next(k for k in state if k.endswith("lm_head.weight"))] = m.get_input_embeddings().weight.detach().clone()
        u.load_state_dict(state)
        m = u
    return m.eval()


def _rotation_zoo() -> dict:
    from tests.unit.sane.test_lineage import _model as named

    out = {f: (lambda f=f: _model(f)) for f in sorted(_unnamed())}
    out.update({f: (lambda f=f: named(f)) for f in ("tiny-gpt2", "tiny-gptneox", "tiny-qwen2", "tiny-mistral", "tiny-gemma")})
    return out


@pytest.mark.parametrize("family", sorted(_rotation_zoo()))
def test_an_exact_rotation_of_the_residual_stream_leaves_logits_and_circuits_unchanged(family: str) -> None:
    """Norm gains folded into the readers, the head untied, every residual reader and writer
    rotated by one random orthogonal matrix (fixing the all-ones direction, which LayerNorm needs)."""
    from xsae_cli.sane.transforms import rotate_resid

    m = _untied(_rotation_zoo()[family])
    arch = Anatomy.from_config(m.config) if family.startswith("tiny-") else Anatomy.from_module(m)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_logits = m(input_ids=ids).logits
    new = rotate_resid(state, arch, seed=4)
    emb = next(k for k in state if arch.role(k).role == "embedding")
    assert (new[emb] - state[emb]).abs().max() > 0.1 * state[emb].abs().max()  # really rotated
    m.load_state_dict(new)
    with torch.no_grad():
        assert (m(input_ids=ids).logits - ref_logits).abs().max() < 1e-4 * ref_logits.abs().max(), family
    ref, got = _circuits(state, arch), _circuits(new, arch)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-4 * float(ref[k].abs().max()), rtol=0), (family, k, float((got[k] - ref[k]).abs().max() / ref[k].abs().max()))


@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-mistral", "stablelm"])
def test_any_rotation_of_an_rmsnorm_or_layernorm_family(family: str) -> None:
    """RMSNorm commutes with every orthogonal matrix, so an RMSNorm model's circuits must survive an
    unrestricted rotation too (the all-ones direction is not fixed). stablelm (LayerNorm) must not
    keep its logits under it: the known answer the restriction rests on."""
    from xsae_cli.sane.transforms import rotate_resid

    m = _untied(_rotation_zoo()[family])
    arch = Anatomy.from_config(m.config) if family.startswith("tiny-") else Anatomy.from_module(m)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_logits = m(input_ids=ids).logits
    new = rotate_resid(state, arch, seed=4, fix_ones=False)
    m.load_state_dict(new)
    with torch.no_grad():
        diff = float((m(input_ids=ids).logits - ref_logits).abs().max() / ref_logits.abs().max())
    if family == "stablelm":
        assert diff > 1e-3
        return
    assert diff < 1e-4
    ref, got = _circuits(state, arch), _circuits(new, arch)
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-4 * float(ref[k].abs().max()), rtol=0), (family, k, float((got[k] - ref[k]).abs().max() / ref[k].abs().max()))
