"""The SANE autoencoder: a transformer over windows of weight chunks with a real bottleneck.

Per chunk, the input is the sum of
- a linear map of the chunk's (normalised) values, or a learned mask vector for masked chunks;
- a sinusoidal embedding of the depth coordinate through its *own* frequency bank and projection;
- a sinusoidal embedding of the in-tensor position through a *separate* bank and projection
  (so (depth, pos) = (a, b) and (b, a) never collide);
- a learned embedding of the tensor kind;
- a linear map of the tensor's scale features (mean, log std, log size) and the chunk's fill.

The encoder maps every chunk to a latent of ``latent_dim`` floats, smaller than the chunk
(``latent_dim < chunk_size`` is enforced), and the decoder reconstructs the chunks from the
latents plus coordinates. A window's representation pools the latents over its real chunks
(padding excluded) into a sketch (latents times fixed Fourier features of their coordinates,
:class:`CoordSketch`; ``pool="moments"``: mean and std); a projection head maps it to
``embed_dim`` (512) for the contrastive loss. A model's embedding is its pooled sketch over all
its windows (``latent_dim x embed_dim / latent_dim`` = 512 floats), or the head's projection of its pooled
moments.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from xsae_cli.core.errors import XsaeError
from xsae_cli.sane.tokenizer import KINDS, N_STATS


@dataclass(frozen=True)
class SaneModelConfig:
    chunk_size: int = 64
    d_model: int = 128
    n_heads: int = 4
    enc_layers: int = 2
    dec_layers: int = 1
    latent_dim: int = 16
    embed_dim: int = 512
    n_freq: int = 16
    ff_mult: int = 2
    dropout: float = 0.0
    pool: str = "sketch"  # "sketch": latents x random Fourier features of their coordinates; "moments": mean and std
    sketch_dim: int = 0  # Fourier features per latent; 0: embed_dim // latent_dim, so the sketch is embed_dim floats

    def validate(self) -> None:
        if self.latent_dim >= self.chunk_size:
            raise XsaeError(f"latent_dim {self.latent_dim} is not smaller than chunk_size {self.chunk_size}", "the per-chunk latent must be a bottleneck: lower latent_dim")
        if self.d_model % self.n_heads:
            raise XsaeError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}", "pick matching sizes")
        if self.pool not in ("sketch", "moments"):
            raise XsaeError(f"unknown SANE pooling '{self.pool}'", "use sketch or moments")
        if self.pool == "sketch" and not self.sketch_dim and self.embed_dim % self.latent_dim:
            raise XsaeError(f"embed_dim {self.embed_dim} is not a multiple of latent_dim {self.latent_dim}", "the sketch is latent_dim x features: pick sizes that divide, or set sketch_dim")

    @property
    def n_features(self) -> int:
        return self.sketch_dim or self.embed_dim // self.latent_dim

    @property
    def pooled_dim(self) -> int:
        return self.latent_dim * self.n_features if self.pool == "sketch" else 2 * self.latent_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Sinusoid(nn.Module):
    """sin/cos of a scalar in [0, 1] at geometric frequencies from 1/2 to ``max_freq`` cycles."""

    freqs: torch.Tensor

    def __init__(self, n_freq: int, max_freq: float) -> None:
        super().__init__()
        freqs = torch.logspace(math.log10(0.5), math.log10(max_freq), n_freq)
        self.register_buffer("freqs", freqs * 2 * math.pi, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ang = x.float().unsqueeze(-1) * self.freqs
        return torch.cat([ang.sin(), ang.cos()], dim=-1)


class ChunkCoords(nn.Module):
    """Separate embeddings of depth, in-tensor position, kind and tensor scale."""

    def __init__(self, cfg: SaneModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.depth_sin = Sinusoid(cfg.n_freq, 256.0)
        self.pos_sin = Sinusoid(cfg.n_freq, 4096.0)
        self.depth_proj = nn.Linear(2 * cfg.n_freq, d)
        self.pos_proj = nn.Linear(2 * cfg.n_freq, d)
        self.kind = nn.Embedding(len(KINDS), d)
        self.stats = nn.Linear(N_STATS + 1, d)
        self.chunk_size = cfg.chunk_size

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        fill = (b["valid"] / self.chunk_size).unsqueeze(-1)
        return self.depth_proj(self.depth_sin(b["depth"])) + self.pos_proj(self.pos_sin(b["pos"])) + self.kind(b["kind"]) + self.stats(torch.cat([b["stats"], fill], dim=-1))


def _stack(cfg: SaneModelConfig, layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.ff_mult * cfg.d_model, cfg.dropout, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class CoordSketch(nn.Module):
    """Fixed random Fourier features of a chunk's (depth, position, kind): the sketch's keys.

    Mean-pooling latents over thousands of chunks keeps only their distribution, which every seed
    of an architecture shares; a model's identity is *where* each value sits. Summing each
    (centred) latent times features of its coordinates keeps that: the sum is a random projection
    of the whole latent field, so two models whose latents agree chunk by chunk get close sketches
    and unrelated ones near-orthogonal ones. The features are fixed (seeded), not learned, so every
    checkpoint of a configuration uses the same keys.
    """

    f_depth: torch.Tensor
    f_pos: torch.Tensor
    phase: torch.Tensor
    kind_phase: torch.Tensor

    def __init__(self, n: int, n_kinds: int, seed: int = 1234) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("f_depth", torch.randint(0, 33, (n,), generator=g).float(), persistent=False)
        self.register_buffer("f_pos", torch.randint(1, 65, (n,), generator=g).float(), persistent=False)
        self.register_buffer("phase", torch.rand(n, generator=g) * 2 * math.pi, persistent=False)
        self.register_buffer("kind_phase", torch.rand(n_kinds, n, generator=g) * 2 * math.pi, persistent=False)

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        ang = 2 * math.pi * (b["depth"].float().unsqueeze(-1) * self.f_depth + b["pos"].float().unsqueeze(-1) * self.f_pos)
        return math.sqrt(2.0) * torch.cos(ang + self.phase + self.kind_phase[b["kind"].long()])


class SaneAutoencoder(nn.Module):
    kind_gain: torch.Tensor

    def __init__(self, cfg: SaneModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        self.enc_coords = ChunkCoords(cfg)
        self.dec_coords = ChunkCoords(cfg)
        self.value_in = nn.Linear(cfg.chunk_size, d)
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.encoder = _stack(cfg, cfg.enc_layers)
        self.enc_norm = nn.LayerNorm(d)
        self.to_latent = nn.Linear(d, cfg.latent_dim)
        self.from_latent = nn.Linear(cfg.latent_dim, d)
        self.decoder = _stack(cfg, cfg.dec_layers)
        self.dec_norm = nn.LayerNorm(d)
        self.value_out = nn.Linear(d, cfg.chunk_size)
        self.head = nn.Sequential(nn.Linear(cfg.pooled_dim, 256), nn.GELU(), nn.Linear(256, cfg.embed_dim))
        self.sketch = CoordSketch(cfg.n_features, len(KINDS)) if cfg.pool == "sketch" else None
        # Log-gain of each tensor kind's latents in the pooled embedding: zero (gain 1) unless fitted on
        # known lineages (:mod:`sane.calibrate`); a buffer, so gradient training leaves it alone.
        self.register_buffer("kind_gain", torch.zeros(len(KINDS)))

    def encode(self, b: dict[str, torch.Tensor], chunk_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-chunk latents ``[B, W, latent_dim]``; ``chunk_mask`` True hides a chunk's values."""
        x = self.value_in(b["values"])
        if chunk_mask is not None:
            x = torch.where(chunk_mask.unsqueeze(-1), self.mask_token.to(x.dtype).expand_as(x), x)
        x = x + self.enc_coords(b)
        h = self.encoder(x, src_key_padding_mask=~b["mask"])
        return self.to_latent(self.enc_norm(h))

    def decode(self, z: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.from_latent(z) + self.dec_coords(b)
        h = self.decoder(h, src_key_padding_mask=~b["mask"])
        return self.value_out(self.dec_norm(h))

    def pool_sums(self, z: torch.Tensor, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Additive per-window sums over real chunks, so windows of one model combine exactly
        (:meth:`pool_finish`): count, sum of latents, and either the sum of squares (moments) or
        the sums of latent x feature and of features (sketch).

        Each chunk's latent is first scaled by its kind's gain (``exp(kind_gain)``): the pooled vector
        is what retrieval compares, and kinds differ in how much of a model's identity survives a
        fine-tune (a 200-step fine-tune moves the anchors' Gram by 0.2-0.4 of its squared norm, the
        block circuits by 1.0-1.7), which a gain per kind can weigh and a shared encoder does not."""
        z = z * self.kind_gain.exp()[b["kind"].long()].unsqueeze(-1).to(z.dtype)
        m = b["mask"].unsqueeze(-1).to(z.dtype)
        zm = z * m
        out = {"n": m.sum(1).squeeze(-1), "z": zm.sum(1)}
        if self.sketch is None:
            out["zz"] = (zm * z).sum(1)
        else:
            phi = self.sketch(b).to(z.dtype) * m
            out["zphi"] = torch.einsum("bwl,bwf->blf", zm, phi).flatten(1)
            out["phi"] = phi.sum(1)
        return out

    def pool_finish(self, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, pooled_dim]``: mean and std of the latents, or the sketch of the centred latents
        (sum of (z - mean z) x features, over the real chunks, divided by their count)."""
        n = sums["n"].clamp_min(1.0).unsqueeze(-1)
        mean = sums["z"] / n
        if self.sketch is None:
            var = (sums["zz"] / n - mean**2).clamp_min(0.0)
            return torch.cat([mean, (var + 1e-6).sqrt()], dim=-1)
        centred = sums["zphi"] - torch.einsum("bl,bf->blf", mean, sums["phi"]).flatten(1)
        return centred / n.sqrt()

    def pool(self, z: torch.Tensor, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One window's pooled vector ``[B, pooled_dim]`` and its real-chunk counts ``[B]``."""
        sums = self.pool_sums(z, b)
        return self.pool_finish(sums), sums["n"]

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(pooled)

    def forward(self, b: dict[str, torch.Tensor], chunk_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z = self.encode(b, chunk_mask)
        recon = self.decode(z, b)
        pooled, _ = self.pool(z, b)
        return {"latents": z, "recon": recon, "pooled": pooled, "proj": self.project(pooled)}


def float_mask(b: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """``[B, W, C]`` True for real floats (padding chunks and the padded tail of a tensor excluded)."""
    ar = torch.arange(chunk_size, device=b["valid"].device)
    return (ar.view(1, 1, -1) < b["valid"].unsqueeze(-1)) & b["mask"].unsqueeze(-1)


def recon_loss(recon: torch.Tensor, target: torch.Tensor, fmask: torch.Tensor) -> torch.Tensor:
    err = (recon.float() - target.float()) ** 2 * fmask
    return err.sum() / fmask.sum().clamp_min(1)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent (SimCLR): view ``a[i]`` must pick ``b[i]`` among all 2B-1 other views of the batch."""
    z = F.normalize(torch.cat([a, b]).float(), dim=-1)
    n = a.shape[0]
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)
