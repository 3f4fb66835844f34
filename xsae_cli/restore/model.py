"""The character-level restoration transformer, weight-compatible with checkpoints users already have.

Pre-LN blocks (ln1 -> bidirectional self-attention with rotate-half RoPE -> residual; ln2 -> ff =
Linear, GELU, Linear -> residual), ``final_ln`` and a ``head`` with bias. Parameter names match the
original code exactly (``embed``, ``layers.N.{ln1,attn.{q,k,v,out}_proj,ln2,ff.0,ff.2}``,
``final_ln``, ``head``), so its ``{"model_state_dict", "config", "vocab_size"}`` checkpoints load.

The original sliced its ``[1, 1, max_position, head_dim]`` cos/sin cache along the *first* axis
(``cos[:seq_len]``), a no-op that only broadcast when ``seq_len == max_position``. Here the cache is
sliced along the sequence axis, which gives bit-identical values at that length and correct
rotations at every other length (tests/unit/restore/test_model.py checks both).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xsae_cli.core.errors import XsaeError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
FORMAT = "xsae-restoration"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass
class RestorationConfig:
    """The original config's keys, plus ``attn_bias`` (absent from old configs: read from the weights)."""

    vocab_size: int
    max_position: int = 768
    d_model: int = 384
    n_heads: int = 8
    d_ff: int = 1536
    n_layers: int = 16
    dropout: float = 0.1
    rotary_base: int = 10000
    attn_bias: bool = True

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.d_model < 1 or self.n_heads < 1 or self.n_layers < 1 or self.max_position < 1:
            raise XsaeError(f"bad restoration config {self.to_dict()}", "vocab_size, d_model, n_heads, n_layers and max_position must be positive")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise XsaeError(f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size", "RoPE rotates pairs of each head's dimensions")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> RestorationConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise XsaeError(f"{where}: unknown restoration config key(s) {', '.join(unknown)}", f"valid keys: {', '.join(sorted(known))}")
        if "vocab_size" not in data:
            raise XsaeError(f"{where}: the config has no vocab_size", "add it (the number of rows of embed.weight)")
        return cls(**data)


# The sizes of the original model ("seed") and a small one for tests and the demo ("tiny").
PRESETS: dict[str, dict[str, Any]] = {
    "seed": {"max_position": 768, "d_model": 384, "n_heads": 8, "d_ff": 1536, "n_layers": 16, "dropout": 0.1, "rotary_base": 10000},
    "tiny": {"max_position": 128, "d_model": 64, "n_heads": 4, "d_ff": 256, "n_layers": 4, "dropout": 0.0, "rotary_base": 10000},
}


def preset_config(name: str, vocab_size: int) -> RestorationConfig:
    if name not in PRESETS:
        raise XsaeError(f"unknown preset '{name}'", f"use one of {', '.join(PRESETS)}")
    return RestorationConfig(vocab_size=vocab_size, **PRESETS[name])


# ----------------------------------------------------------------------------------------------- RoPE


def rotary_cache(head_dim: int, length: int, base: float, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[length, head_dim]`` computed exactly as the original did (float32, rotate-half layout)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    positions = torch.arange(length, device=device).float()
    freqs = torch.einsum("i,j->ij", positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [batch, heads, seq, head_dim]`` by the first ``seq`` rows of the cache."""
    seq = x.shape[-2]
    cos, sin = cos[:seq].to(x.dtype), sin[:seq].to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ------------------------------------------------------------------------------------------- modules


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, cfg: RestorationConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.attn_bias)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.attn_bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        bsz, seq, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(bsz, seq, self.n_heads, self.head_dim).transpose(1, 2)

        q = apply_rotary(heads(self.q_proj(x)), cos, sin)
        k = apply_rotary(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        # Bidirectional: no causal mask. Padding keys get the original's additive -1e9.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout.p if self.training else 0.0, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(bsz, seq, dim))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: RestorationConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.attn = MultiHeadSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.ff = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x), cos, sin, attn_mask))
        return x + self.dropout(self.ff(self.ln2(x)))


class RestorationModel(nn.Module):
    """Token ids ``[batch, seq]`` -> logits ``[batch, seq, vocab]``; ``attention_mask`` 1 = real, 0 = pad."""

    def __init__(self, cfg: RestorationConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_ln = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def rotary(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin cache, at least ``max_position`` long and grown on demand (kept out of the state dict)."""
        need = max(length, self.config.max_position)
        if self._rope is None or self._rope[0].device != device or self._rope[0].shape[0] < need:
            self._rope = rotary_cache(self.config.head_dim, need, self.config.rotary_base, device)
        return self._rope

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.dropout(self.embed(input_ids))
        cos, sin = self.rotary(input_ids.shape[1], x.device)
        mask = None
        if attention_mask is not None:
            mask = ((1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e9).to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.head(self.final_ln(x))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ------------------------------------------------------------------------------------------- loading


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load whose error lists every missing and unexpected key on one line."""
    expected = set(model.state_dict())
    got = set(state)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        raise XsaeError(f"{where} does not match the restoration model ({'; '.join(parts)})", "point at a RestorationModel checkpoint (embed.weight, layers.N.attn.q_proj.weight, ..., head.weight)")
    for name, tensor in model.state_dict().items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise XsaeError(f"{where}: {name} has shape {tuple(state[name].shape)}, the config needs {tuple(tensor.shape)}", "the checkpoint's config and weights disagree")
    model.load_state_dict(state)


def has_attn_bias(state: dict[str, Any]) -> bool:
    """Checkpoints written by the original code carry attention biases; its documentation lists none."""
    return any(k.startswith("layers.") and ".attn." in k and k.endswith(".bias") for k in state)


def build_from_state(cfg_dict: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> RestorationModel:
    data = dict(cfg_dict)
    data.setdefault("attn_bias", has_attn_bias(state))
    cfg = RestorationConfig.from_dict(data, where)
    model = RestorationModel(cfg)
    load_weights(model, state, where)
    return model.eval()


@dataclass
class Loaded:
    """A model, the vocabulary its ids mean, and what was read."""

    model: RestorationModel
    vocab: Any  # xsae_cli.restore.data.Vocab
    path: Path
    meta: dict[str, Any]


def load_restoration(path: str | os.PathLike[str], vocab: str | os.PathLike[str] | None = None, device: Any = "cpu") -> Loaded:
    """Load an xsae model folder (config.json + model.safetensors + vocab.json) or an original ``.pt``.

    An original checkpoint (``{"model_state_dict", "config", "vocab_size"}``, read with
    ``weights_only=True``) carries no vocabulary: the original code used Unicode code points as ids,
    so that is the vocabulary unless ``vocab`` (or a vocab.json beside the file) says otherwise.
    """
    from xsae_cli.core.io import load_safetensors, read_json, safe_torch_load
    from xsae_cli.restore.data import CodepointVocab, Vocab

    p = Path(path)
    if not p.exists():
        raise XsaeError(f"model not found: {p}", "pass a folder written by `xsae restore train` or a .pt checkpoint")
    if p.is_file() and p.name == MODEL_FILE:
        p = p.parent
    if p.is_dir():
        if not (p / CONFIG_FILE).exists() or not (p / MODEL_FILE).exists():
            raise XsaeError(f"{p} holds no restoration model ({CONFIG_FILE} and {MODEL_FILE} expected)", "pass the --out folder of `xsae restore train`")
        meta = read_json(p / CONFIG_FILE, "model config")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
            raise XsaeError(f"{p / CONFIG_FILE} is not an xsae restoration model config", "pass the --out folder of `xsae restore train`")
        model = build_from_state(meta["model"], load_safetensors(p / MODEL_FILE), str(p / MODEL_FILE))
        voc = Vocab.load(vocab or p / VOCAB_FILE)
    elif p.suffix.lower() in TORCH_SUFFIXES:
        obj = safe_torch_load(p)
        if not isinstance(obj, dict) or "model_state_dict" not in obj or "config" not in obj:
            keys = ", ".join(sorted(map(str, obj))[:8]) if isinstance(obj, dict) else type(obj).__name__
            raise XsaeError(f"{p} is not a restoration checkpoint (found {keys})", 'expected a dict with "model_state_dict", "config" and "vocab_size"')
        cfg = dict(obj["config"])
        if "vocab_size" in obj and cfg.get("vocab_size") not in (None, obj["vocab_size"]):
            raise XsaeError(f"{p}: vocab_size {obj['vocab_size']} disagrees with config vocab_size {cfg['vocab_size']}", "re-save the checkpoint with one vocabulary size")
        cfg.setdefault("vocab_size", obj.get("vocab_size"))
        model = build_from_state(cfg, obj["model_state_dict"], str(p))
        meta = {"format": "original-pt", "model": model.config.to_dict()}
        beside = p.with_name(VOCAB_FILE)
        if vocab is not None:
            voc = Vocab.load(vocab)
        elif beside.exists():
            voc = Vocab.load(beside)
        else:
            voc = CodepointVocab(model.config.vocab_size)
    else:
        raise XsaeError(f"unsupported model file {p}", f"pass a model folder or a PyTorch checkpoint ({', '.join(TORCH_SUFFIXES)})")
    if len(voc) != model.config.vocab_size:
        raise XsaeError(f"the vocabulary has {len(voc)} entries but the model's vocab_size is {model.config.vocab_size}", "use the vocab.json written with this model")
    return Loaded(model.to(device), voc, p, meta)


def save_model(model: RestorationModel, vocab: Any, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """Write config.json + model.safetensors + vocab.json into an existing (temporary) folder."""
    from xsae_cli.core.hardware import package_versions
    from xsae_cli.core.io import atomic_write_json, save_safetensors

    save_safetensors(dict(model.state_dict()), folder / MODEL_FILE, metadata={"format": "pt"})
    vocab.save(folder / VOCAB_FILE)
    atomic_write_json(folder / CONFIG_FILE, {"format": FORMAT, "model": model.config.to_dict(), "vocab": VOCAB_FILE, "versions": package_versions(), **(extra or {})})
