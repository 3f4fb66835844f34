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
(mean and std; padding excluded); a projection head maps it to ``embed_dim`` (512) for the
contrastive loss and for model embeddings.
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

    def validate(self) -> None:
        if self.latent_dim >= self.chunk_size:
            raise XsaeError(f"latent_dim {self.latent_dim} is not smaller than chunk_size {self.chunk_size}", "the per-chunk latent must be a bottleneck: lower latent_dim")
        if self.d_model % self.n_heads:
            raise XsaeError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}", "pick matching sizes")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Sinusoid(nn.Module):
    """sin/cos of a scalar in [0, 1] at geometric frequencies from 1/2 to ``max_freq`` cycles."""

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
        return (
            self.depth_proj(self.depth_sin(b["depth"]))
            + self.pos_proj(self.pos_sin(b["pos"]))
            + self.kind(b["kind"])
            + self.stats(torch.cat([b["stats"], fill], dim=-1))
        )


def _stack(cfg: SaneModelConfig, layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.ff_mult * cfg.d_model, cfg.dropout, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class SaneAutoencoder(nn.Module):
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
        self.head = nn.Sequential(nn.Linear(2 * cfg.latent_dim, 256), nn.GELU(), nn.Linear(256, cfg.embed_dim))

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

    @staticmethod
    def pool(z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked mean and std of latents over real chunks: ``[B, 2 * latent]`` and counts ``[B]``."""
        m = mask.unsqueeze(-1).to(z.dtype)
        n = m.sum(1).clamp_min(1.0)
        mean = (z * m).sum(1) / n
        var = (((z - mean.unsqueeze(1)) ** 2) * m).sum(1) / n
        return torch.cat([mean, (var + 1e-6).sqrt()], dim=-1), mask.sum(1).float()

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(pooled)

    def forward(self, b: dict[str, torch.Tensor], chunk_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z = self.encode(b, chunk_mask)
        recon = self.decode(z, b)
        pooled, _ = self.pool(z, b["mask"])
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
