"""The autoencoder: real bottleneck, separate coordinate embeddings, padding kept out of everything."""

from __future__ import annotations

import pytest
import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.sane.model import ChunkCoords, SaneAutoencoder, SaneModelConfig, float_mask, nt_xent, recon_loss


def batch(B: int = 2, W: int = 16, C: int = 64, n_real: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, W, dtype=torch.bool)
    mask[:, :n_real] = True
    valid = torch.full((B, W), float(C)) * mask
    valid[:, n_real - 1] = C // 2
    values = torch.randn(B, W, C, generator=g) * mask.unsqueeze(-1)
    return {
        "values": values,
        "valid": valid,
        "depth": torch.rand(B, W, generator=g),
        "pos": torch.rand(B, W, generator=g),
        "kind": torch.randint(0, 12, (B, W), generator=g),
        "stats": torch.randn(B, W, 3, generator=g),
        "mask": mask,
    }


def small() -> SaneModelConfig:
    return SaneModelConfig(d_model=32, n_heads=4, enc_layers=1, dec_layers=1, latent_dim=8)


def test_latent_is_a_real_bottleneck_and_embedding_is_512() -> None:
    torch.manual_seed(0)
    m = SaneAutoencoder(small())
    out = m(batch())
    assert out["latents"].shape == (2, 16, 8) and m.cfg.latent_dim < m.cfg.chunk_size
    assert out["recon"].shape == (2, 16, 64)
    assert out["proj"].shape == (2, 512)
    with pytest.raises(XsaeError, match="latent_dim 64 is not smaller than chunk_size 64"):
        SaneAutoencoder(SaneModelConfig(latent_dim=64))


def test_depth_and_position_do_not_collide() -> None:
    torch.manual_seed(0)
    c = ChunkCoords(small())
    b = batch(B=1, W=1, n_real=1)
    b1 = dict(b, depth=torch.tensor([[0.2]]), pos=torch.tensor([[0.7]]))
    b2 = dict(b, depth=torch.tensor([[0.7]]), pos=torch.tensor([[0.2]]))
    assert not torch.allclose(c(b1), c(b2), atol=1e-4)
    assert c.depth_sin is not c.pos_sin and not torch.equal(c.depth_proj.weight, c.pos_proj.weight)


def test_padding_changes_neither_latents_pooling_nor_loss() -> None:
    torch.manual_seed(0)
    m = SaneAutoencoder(small()).eval()
    b = batch()
    b2 = dict(b)
    junk = torch.randn_like(b["values"]) * 100
    b2["values"] = torch.where(b["mask"].unsqueeze(-1), b["values"], junk)
    b2["depth"] = torch.where(b["mask"], b["depth"], torch.rand_like(b["depth"]))
    with torch.no_grad():
        o1, o2 = m(b), m(b2)
    real = b["mask"]
    assert torch.allclose(o1["latents"][real], o2["latents"][real], atol=1e-5)
    assert torch.allclose(o1["pooled"], o2["pooled"], atol=1e-5)
    fm = float_mask(b, 64)
    assert fm[0, 11].sum() == 32 and fm[0, 12:].sum() == 0  # half-filled last chunk, then padding
    target2 = torch.where(fm, b["values"], junk)
    assert torch.allclose(recon_loss(o1["recon"], b["values"], fm), recon_loss(o2["recon"], target2, fm), atol=1e-5)


def test_masked_chunks_hide_their_values() -> None:
    torch.manual_seed(0)
    m = SaneAutoencoder(small()).eval()
    b = batch()
    cm = torch.zeros_like(b["mask"])
    cm[:, 3] = True
    b2 = dict(b, values=b["values"].clone())
    b2["values"][:, 3] += 5.0
    with torch.no_grad():
        assert torch.allclose(m.encode(b, cm), m.encode(b2, cm), atol=1e-5)
        assert not torch.allclose(m.encode(b), m.encode(b2), atol=1e-3)


def test_nt_xent_prefers_matching_views() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 32, generator=g)
    good = nt_xent(a, a + 0.01 * torch.randn(8, 32, generator=g))
    bad = nt_xent(a, torch.randn(8, 32, generator=g))
    assert good < bad


def test_sketch_keeps_where_latents_sit_and_windows_add_up() -> None:
    torch.manual_seed(0)
    sk = SaneAutoencoder(small()).eval()
    mo = SaneAutoencoder(SaneModelConfig(d_model=32, n_heads=4, enc_layers=1, dec_layers=1, latent_dim=8, pool="moments")).eval()
    assert sk.cfg.pooled_dim == 512 and sk.cfg.n_features == 64 and mo.cfg.pooled_dim == 16
    b = batch(B=1, W=16, n_real=16)
    z = torch.randn(1, 16, 8, dtype=torch.float64)
    swapped = z[:, torch.randperm(16)]  # the same latents at other coordinates
    assert torch.allclose(mo.pool(z, b)[0], mo.pool(swapped, b)[0])  # moments cannot tell
    a, c = sk.pool(z, b)[0], sk.pool(swapped, b)[0]
    assert float(torch.nn.functional.cosine_similarity(a, c)) < 0.5
    # two windows of one model pool to what one window over all their chunks gives
    halves = {k: torch.cat([v[:, :8], v[:, 8:]]) for k, v in b.items()}
    sums = sk.pool_sums(torch.cat([z[:, :8], z[:, 8:]]), halves)
    total = {k: v.sum(0, keepdim=True) for k, v in sums.items()}
    assert torch.allclose(sk.pool_finish(total), sk.pool(z, b)[0], atol=1e-10)
    # an added constant (a shift every model shares) does not move the sketch: latents are centred
    assert torch.allclose(sk.pool(z + 3.0, b)[0], a, atol=1e-9)
