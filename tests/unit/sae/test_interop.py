"""The real SAELens and sparsify read what xsae writes, and xsae reads what they write, exactly.

Skipped (with the reason) only when ``sae_lens`` or ``sparsify`` is not installed (extra ``bench``).
Our SAEs keep the default ``bf16_encoder`` (auto): it only ever speeds up training, and inference is
exact fp32 on every CPU and GPU, so the comparison holds to 1e-5 whichever path the machine takes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xsae_cli.sae.formats import load_sae, save_sae
from xsae_cli.sae.models import SaeConfig, create_sae

sae_lens = pytest.importorskip("sae_lens", reason="sae_lens is not installed (pip install 'xsae[bench]')")
sparsify = pytest.importorskip("sparsify", reason="sparsify is not installed (pip install 'xsae[bench]')")

D_IN, D_SAE, K = 16, 48, 5
META = {"model_name": "tiny-model", "hook_name": "blocks.2.hook_resid_post", "context_size": 32, "prepend_bos": False}
TOL = {"rtol": 1e-5, "atol": 1e-5}


def x_batch(n: int = 64) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(11)) * 2.0


@torch.no_grad()
def randomize(module: torch.nn.Module, names: tuple[str, ...], seed: int = 0) -> None:
    """Random values everywhere (biases too), so a mishandled bias or threshold shows up."""
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        t = getattr(module, name)
        if name == "threshold":
            t.copy_(torch.rand(t.shape, generator=gen) * 0.3)
        else:
            t.copy_(torch.randn(t.shape, generator=gen) * (0.3 if t.dim() == 2 else 0.2))


def ours(arch: str, **overrides):
    cfg = SaeConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=K if arch in ("topk", "batchtopk") else None, metadata=dict(META), **overrides)
    sae = create_sae(cfg, seed=3)
    randomize(sae, ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if arch in ("jumprelu", "batchtopk") else ()))
    return sae.eval()


# -- xsae writes, they read --------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "their_class"), [("relu", "StandardSAE"), ("topk", "TopKSAE"), ("jumprelu", "JumpReLUSAE"), ("batchtopk", "JumpReLUSAE")])
def test_saelens_loads_our_export_with_the_same_reconstruction(tmp_path: Path, arch: str, their_class: str) -> None:
    sae = ours(arch)
    path = save_sae(sae, tmp_path / arch)
    theirs = sae_lens.SAE.load_from_disk(str(path))
    assert type(theirs).__name__ == their_class
    assert theirs.cfg.metadata.hook_name == META["hook_name"] and theirs.cfg.metadata.model_name == META["model_name"]
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), **TOL)
        torch.testing.assert_close(theirs(x), sae(x), **TOL)


def test_saelens_loads_our_export_of_a_normalised_sae(tmp_path: Path) -> None:
    sae = ours("topk", normalize_activations="expected_average_only_in")
    sae.fit_normalization(x_batch(256))
    theirs = sae_lens.SAE.load_from_disk(str(save_sae(sae, tmp_path / "s")))  # folded on the way out
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), sae(x), **TOL)


def test_sparsify_loads_our_topk_export_with_the_same_reconstruction(tmp_path: Path) -> None:
    sae = ours("topk")
    folder = save_sae(sae, tmp_path / "run", format="sparsify")
    x = x_batch()
    with torch.no_grad():
        expected = sae(x)
        for coder in (sparsify.SparseCoder.load_from_disk(folder), sparsify.SparseCoder.load_many(str(tmp_path / "run"), local=True)[META["hook_name"]]):
            enc = coder.encode(x)
            torch.testing.assert_close(coder.decode(enc.top_acts, enc.top_indices), expected, **TOL)


# -- they write, xsae reads --------------------------------------------------------------------


def _their_saelens(kind: str):
    meta = sae_lens.saes.sae.SAEMetadata(model_name="gpt2", hook_name="blocks.3.hook_resid_pre")
    if kind == "standard":
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta))
        names: tuple[str, ...] = ("W_enc", "b_enc", "W_dec", "b_dec")
    elif kind == "standard_norm":
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations="constant_norm_rescale", metadata=meta))
        names = ("W_enc", "b_enc", "W_dec", "b_dec")
    elif kind in ("topk", "topk_rescaled"):
        cfg = sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=kind == "topk_rescaled", metadata=meta)
        sae = sae_lens.TopKSAE(cfg)
        names = ("W_enc", "b_enc", "W_dec", "b_dec")
    else:
        sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta))
        names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    randomize(sae, names, seed=5)
    return sae.eval()


@pytest.mark.parametrize(("kind", "arch"), [("standard", "relu"), ("standard_norm", "relu"), ("topk", "topk"), ("topk_rescaled", "topk"), ("jumprelu", "jumprelu")])
def test_we_load_saelens_saved_files_with_the_same_outputs(tmp_path: Path, kind: str, arch: str) -> None:
    theirs = _their_saelens(kind)
    theirs.save_model(tmp_path / kind)
    sae = load_sae(tmp_path / kind)
    assert sae.cfg.arch == arch
    assert sae.cfg.metadata["hook_name"] == "blocks.3.hook_resid_pre" and sae.cfg.metadata["model_name"] == "gpt2"
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(sae(x), theirs(x), **TOL)
        if kind != "topk_rescaled":  # the rescaled TopK's codes differ by the folded decoder norms
            torch.testing.assert_close(sae.encode(x), theirs.encode(x), **TOL)


def test_we_load_a_saelens_batchtopk_saved_for_inference(tmp_path: Path) -> None:
    cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)
    trained = sae_lens.BatchTopKTrainingSAE(cfg)
    randomize(trained, ("W_enc", "b_enc", "W_dec", "b_dec"), seed=7)
    trained.topk_threshold.fill_(0.15)
    trained.save_inference_model(tmp_path / "btk")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "btk"))
    sae = load_sae(tmp_path / "btk")
    assert sae.cfg.arch == "jumprelu"  # SAELens saves a trained BatchTopK as a JumpReLU
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(sae(x), theirs(x), **TOL)


def test_we_load_sparsify_saved_files_with_the_same_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K))
    with torch.no_grad():
        coder.encoder.weight.normal_(0, 0.3)
        coder.encoder.bias.normal_(0, 0.2)
        coder.W_dec.normal_(0, 0.3)
        coder.b_dec.normal_(0, 0.2)
    coder.save_to_disk(tmp_path / "run" / "layers.4")
    sae = load_sae(tmp_path / "run")  # a run folder with one hook
    assert (sae.cfg.arch, sae.cfg.k, sae.cfg.d_sae, sae.cfg.metadata["hook_name"]) == ("topk", K, D_SAE, "layers.4")
    x = x_batch()
    with torch.no_grad():
        enc = coder.encode(x)
        torch.testing.assert_close(sae(x), coder.decode(enc.top_acts, enc.top_indices), **TOL)
        dense = torch.zeros(x.shape[0], D_SAE).scatter(-1, enc.top_indices, enc.top_acts)
        torch.testing.assert_close(sae.encode(x), dense, **TOL)
