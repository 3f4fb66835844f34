"""The gated and Matryoshka BatchTopK SAEs: their losses, their bad input, and their files in the real SAELens.

Known answers: the gated SAE's auxiliary loss reaches the encoder but never the decoder (the
paper's frozen copy), its L1 acts on the gate alone; SAELens's ``GatedSAE`` and ``JumpReLUSAE``
read our files with the same codes and reconstructions, and we read theirs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xsae_cli.core.errors import XsaeError
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


# -- Matryoshka BatchTopK ------------------------------------------------------------------------

MTK = "matryoshka_batchtopk"
WIDTHS = [8, 24]


def matryoshka(widths: list[int] | None = None, **kw) -> torch.nn.Module:
    cfg = SaeConfig(arch=MTK, d_in=D_IN, d_sae=D_SAE, k=K, metadata=dict(META), options={"matryoshka_widths": list(widths or WIDTHS)}, **kw)
    return create_sae(cfg, seed=3)


def test_matryoshka_loss_and_gradients_match_a_dense_reference() -> None:
    """Each prefix [0, w) reconstructs on its own: the loss is the sum of the prefixes' squared errors."""
    from xsae_cli.sae.kernels import global_topk

    sae = matryoshka(bf16_encoder=False)
    randomize(sae, ("W_enc", "b_enc", "W_dec", "b_dec"))
    x = x_batch(128)
    out = sae.training_forward(x)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    ours = torch.autograd.grad(out.loss, params)

    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    mask = torch.zeros(pre.numel())
    mask[global_topk(pre.detach(), K * x.shape[0])] = 1.0
    codes = torch.relu(pre) * mask.reshape(pre.shape)
    levels = [*WIDTHS, D_SAE]
    errors = [((codes[:, :w] @ sae.W_dec[:w] + sae.b_dec - x) ** 2).sum(-1).mean() for w in levels]
    ref = torch.autograd.grad(sum(errors), params)
    torch.testing.assert_close(out.loss, sum(errors), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.terms["mse_8"], errors[0].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.terms["mse"], errors[-1].detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _planted(n: int, seed: int) -> torch.Tensor:
    dictionary = torch.nn.functional.normalize(torch.randn(32, D_IN, generator=torch.Generator().manual_seed(123)), dim=1)
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(32, generator=g)[:3] for _ in range(n)])
    mag = torch.rand(n, 3, generator=g) * 2 + 0.5
    return torch.nn.functional.embedding_bag(idx, dictionary, per_sample_weights=mag, mode="sum")


def _prefix_fvu(sae: torch.nn.Module, x: torch.Tensor, width: int) -> float:
    with torch.no_grad():
        codes = sae.encode(x)
        codes[:, width:] = 0
        err = sae.decode(codes) - x
        return float(err.pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_matryoshka_prefix_reconstructs_where_a_batchtopk_prefix_does_not() -> None:
    """Known answer: the first 8 latents of a Matryoshka SAE are trained to reconstruct alone; a
    BatchTopK's first 8 are not. Same data, seed, steps and optimizer."""
    torch.manual_seed(0)
    train, held = _planted(256 * 200, seed=1), _planted(2048, seed=2)
    fvus = {}
    for arch in ("batchtopk", MTK):
        options = {"matryoshka_widths": [8]} if arch == MTK else {}
        sae = create_sae(SaeConfig(arch=arch, d_in=D_IN, d_sae=64, k=3, options=options), seed=0)
        sae.init_b_dec(train[:256])
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        for i in range(200):
            sae.training_forward(train[i * 256 : (i + 1) * 256]).loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            sae.set_decoder_norm_to_unit_norm()
        fvus[arch] = (_prefix_fvu(sae, held, 8), _prefix_fvu(sae, held, 64))
    assert fvus[MTK][0] < 0.6 * fvus["batchtopk"][0], fvus
    assert fvus[MTK][1] < 0.2, fvus  # and the whole SAE still reconstructs


@pytest.mark.parametrize(
    ("widths", "needle"),
    [([24, 8], "not strictly increasing"), ([8, 8], "not strictly increasing"), ([8, 64], "exceed d_sae=48"), ([], "needs matryoshka_widths")],
)
def test_bad_matryoshka_widths_are_one_line_errors(widths: list[int], needle: str) -> None:
    with pytest.raises(XsaeError, match=needle) as err:
        matryoshka(widths) if widths else SaeConfig(arch=MTK, d_in=D_IN, d_sae=D_SAE, k=K)
    assert "\n" not in err.value.one_line()


def test_matryoshka_widths_as_a_setting() -> None:
    from xsae_cli.core.settings import InvalidSetting
    from xsae_cli.sae.settings import SaeTrainSettings
    from xsae_cli.sae.train import sae_config_for

    cfg = sae_config_for(SaeTrainSettings(arch=MTK, k=4, d_sae=64, matryoshka_widths=[8, 32]), 16, {})
    assert cfg.options == {"matryoshka_widths": [8, 32]}
    with pytest.raises(InvalidSetting, match="not strictly increasing"):
        SaeTrainSettings(arch=MTK, matryoshka_widths=[32, 8])
    with pytest.raises(InvalidSetting, match="exceed d_sae=16"):
        SaeTrainSettings(arch=MTK, d_sae=16, matryoshka_widths=[8, 32])
    with pytest.raises(XsaeError, match="exceed d_sae=32"):  # d_sae from the expansion: refused once d_in is known
        sae_config_for(SaeTrainSettings(arch=MTK, k=4, expansion=2, matryoshka_widths=[8, 64]), 16, {})
    with pytest.raises(XsaeError, match="matryoshka_widths is set but a topk SAE"):
        sae_config_for(SaeTrainSettings(arch="topk", matryoshka_widths=[8]), 16, {})


def test_saelens_loads_our_matryoshka_export_as_a_jumprelu(tmp_path: Path) -> None:
    sae = matryoshka()
    randomize(sae, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
    sae.eval()
    path = save_sae(sae, tmp_path / "m")
    theirs = sae_lens.SAE.load_from_disk(str(path))
    assert type(theirs).__name__ == "JumpReLUSAE"  # as SAELens saves a trained Matryoshka BatchTopK
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), **TOL)
        torch.testing.assert_close(theirs(x), sae(x), **TOL)
    back = load_sae(path)
    assert back.cfg.arch == MTK and back.cfg.options == {"matryoshka_widths": WIDTHS}


def test_we_load_a_saelens_matryoshka_training_checkpoint(tmp_path: Path) -> None:
    cfg = sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=[8, 24, D_SAE])
    trained = sae_lens.MatryoshkaBatchTopKTrainingSAE(cfg)
    randomize(trained, ("W_enc", "b_enc", "W_dec", "b_dec"), seed=7)
    trained.topk_threshold.fill_(0.15)
    trained.save_model(tmp_path / "train")  # architecture: matryoshka_batchtopk, widths and k in cfg.json
    trained.save_inference_model(tmp_path / "inference")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "inference"))
    sae = load_sae(tmp_path / "train")
    assert (sae.cfg.arch, sae.cfg.k, sae.cfg.options) == (MTK, K, {"matryoshka_widths": [8, 24, D_SAE]})
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(sae(x), theirs(x), **TOL)
