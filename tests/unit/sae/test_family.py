"""The gated and Matryoshka BatchTopK SAEs: their losses, their bad input, and their files in the real SAELens.

Known answers: the gated SAE's auxiliary loss reaches the encoder but never the decoder (the
paper's frozen copy), its L1 acts on the gate alone; SAELens's ``GatedSAE`` and ``JumpReLUSAE``
read our files with the same codes and reconstructions, and we read theirs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xsae_cli.sae.formats import load_sae, save_sae
from xsae_cli.sae.models import SaeConfig, create_sae

sae_lens = pytest.importorskip("sae_lens", reason="sae_lens is not installed (pip install 'xsae[bench]')")

D_IN, D_SAE, K = 16, 48, 5
META = {"model_name": "tiny-model", "hook_name": "blocks.2.hook_resid_post", "context_size": 32, "prepend_bos": False}
TOL = {"rtol": 1e-5, "atol": 1e-5}


def x_batch(n: int = 64, seed: int = 11) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2.0


@torch.no_grad()
def randomize(module: torch.nn.Module, names: tuple[str, ...], seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        t = getattr(module, name)
        if name == "threshold":
            t.copy_(torch.rand(t.shape, generator=gen) * 0.3)
        else:
            t.copy_(torch.randn(t.shape, generator=gen) * (0.3 if t.dim() == 2 else 0.2))


GATED = ("W_enc", "b_enc", "W_dec", "b_dec", "r_mag", "b_mag")


def gated() -> torch.nn.Module:
    sae = create_sae(SaeConfig(arch="gated", d_in=D_IN, d_sae=D_SAE, metadata=dict(META)), seed=3)
    randomize(sae, GATED)
    return sae.eval()


# -- gated ---------------------------------------------------------------------------------------


def test_gated_codes_are_the_gate_times_the_magnitude() -> None:
    sae = gated()
    x = x_batch()
    xc = x - sae.b_dec
    gate = xc @ sae.W_enc + sae.b_enc
    mag = xc @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    with torch.no_grad():
        codes = sae.encode(x)
    torch.testing.assert_close(codes, (gate > 0).float() * torch.relu(mag), **TOL)
    assert 0 < int((codes > 0).sum()) < codes.numel()  # both gates open and closed
    assert bool(((gate > 0) & (mag > 0) & (codes == 0)).sum() == 0)


def test_gated_aux_loss_trains_the_gate_through_a_frozen_decoder() -> None:
    sae = gated().train()
    out = sae.training_forward(x_batch())
    assert {"mse", "l1", "aux", "l0", "fvu"} <= set(out.terms)
    # The auxiliary term alone: gradient to the encoder (the gate), none to the decoder.
    aux = torch.autograd.grad(sae._train(x_batch(), None)[2]["aux"], [sae.W_enc, sae.b_enc, sae.W_dec], allow_unused=True)
    assert aux[0] is not None and aux[0].abs().sum() > 0 and aux[1].abs().sum() > 0
    assert aux[2] is None or aux[2].abs().sum() == 0
    # The L1 term alone: the gate bias moves, the magnitude path does not.
    l1 = torch.autograd.grad(sae._train(x_batch(), None)[2]["l1"], [sae.b_enc, sae.b_mag, sae.r_mag], allow_unused=True)
    assert l1[0].abs().sum() > 0 and all(g is None or g.abs().sum() == 0 for g in l1[1:])


def test_saelens_loads_our_gated_export_with_the_same_reconstruction(tmp_path: Path) -> None:
    sae = gated()
    path = save_sae(sae, tmp_path / "gated")
    theirs = sae_lens.SAE.load_from_disk(str(path))
    assert type(theirs).__name__ == "GatedSAE" and theirs.b_enc is None
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), **TOL)
        torch.testing.assert_close(theirs(x), sae(x), **TOL)
    back = load_sae(path)
    assert back.cfg.arch == "gated"
    with torch.no_grad():
        torch.testing.assert_close(back(x), sae(x), rtol=0, atol=0)


def test_we_load_a_saelens_gated_sae(tmp_path: Path) -> None:
    meta = sae_lens.saes.sae.SAEMetadata(model_name="gpt2", hook_name="blocks.3.hook_resid_pre")
    theirs = sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta))
    randomize(theirs, ("W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"), seed=5)
    theirs.eval().save_model(tmp_path / "g")
    sae = load_sae(tmp_path / "g")
    assert sae.cfg.arch == "gated" and sae.cfg.metadata["hook_name"] == "blocks.3.hook_resid_pre"
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), theirs.encode(x), **TOL)
        torch.testing.assert_close(sae(x), theirs(x), **TOL)
