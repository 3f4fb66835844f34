"""Crosscoders and universal SAEs: one dictionary over the paired positions of two or more models.

A latent has one encoder row and one decoder row *per model* (models may differ in width; the
pairing of :mod:`xsae_cli.align.pairing` lines their positions up across tokenizers), and one
shared code. Two objectives:

* ``crosscoder`` (Lindsey et al. 2024, "Sparse crosscoders"): the code is read from all models at
  once, ``z = s(sum_m (x_m - b_m) W_enc_m + b_enc)``, and every decoder reconstructs its own model;
  the loss is the summed per-model FVU.
* ``universal`` (Thasarathan et al., ICML 2025, "Universal sparse autoencoders"): the code is read
  from *one* model at a time, and every decoder reconstructs its own model from it; the loss is
  the mean over source models m and targets n of FVU(x_n, dec_n(enc_m(x_m))), so it includes
  cross-reconstruction (encode A, decode B).

Sparsity ``s``: ``topk`` (k per token), ``batchtopk`` (k per token on average over the batch in
training; a learned threshold, an EMA of the smallest kept value, at inference), or ``l1`` (ReLU, and
the penalty ``l1_coefficient * sum_i z_i * sum_m ||W_dec_m[i]||`` of the crosscoder papers).

Inputs are centred and scaled per model by one scalar each (their train RMS), so each model weighs
the same in the loss whatever its norm. Per latent (:func:`latent_stats`): the decoder norm per
model, the relative norm ``||d_m|| / sum_n ||d_n||`` (two models: 0.5 = shared, 0 or 1 = exclusive)
and the firing rate when the code is read from each model alone.

Reading the code from one model only (``encode(xs, only=m)``): for the universal objective that
is what it is trained for; for the crosscoder the one model's term is multiplied by the number of
models. The crosscoder is not trained for that (its encoders may split a direction between the
models in any proportion), so its one-model figures are low even for a rotated copy (synthetic:
joint R^2 0.93 each, one-model 0.1-0.3); cross-reconstruction is the universal objective's figure
(same case: 0.93 from either model into either, unrelated models: -0.01).

Saved as ``crosscoder.safetensors`` (``W_enc.<m>`` [d_m, d_sae], ``W_dec.<m>`` [d_sae, d_m],
``b_dec.<m>``, ``mean.<m>``, ``scale.<m>``, ``b_enc``, ``threshold``) plus ``crosscoder.json``
(format, models, widths, d_sae, k, sparsity, objective, l1_coefficient): :func:`save` and :func:`load`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "xsae-crosscoder"
SPARSITIES = ("topk", "batchtopk", "l1")
OBJECTIVES = ("crosscoder", "universal")
SHARED_BAND = (0.3, 0.7)  # relative norm of the first model inside this band: shared; at or below 0.1 / at or above 0.9: exclusive
EXCLUSIVE = 0.1


@dataclass
class CrosscoderConfig:
    models: list[str]
    widths: list[int]
    d_sae: int
    k: int = 8
    sparsity: str = "topk"
    objective: str = "crosscoder"
    l1_coefficient: float = 1e-3

    def __post_init__(self) -> None:
        from xsae_cli.core.errors import XsaeError

        if len(self.models) < 2 or len(self.models) != len(self.widths):
            raise XsaeError(f"a crosscoder needs two or more models with one width each, got {self.models} and widths {self.widths}", "pass --models a,b[,c]")
        if self.sparsity not in SPARSITIES:
            raise XsaeError(f"unknown sparsity '{self.sparsity}'", f"use one of: {', '.join(SPARSITIES)}")
        if self.objective not in OBJECTIVES:
            raise XsaeError(f"unknown objective '{self.objective}'", f"use one of: {', '.join(OBJECTIVES)}")
        if not 1 <= self.k <= self.d_sae:
            raise XsaeError(f"k={self.k} must be in 1..d_sae ({self.d_sae})", "lower --k or raise --expansion")


class Crosscoder(nn.Module):
    """Per-model encoders and decoders around one shared sparse code."""

    threshold: torch.Tensor

    def __init__(self, cfg: CrosscoderConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        n = len(cfg.widths)
        self.W_dec = nn.ParameterList()
        self.W_enc = nn.ParameterList()
        for d in cfg.widths:
            dec = torch.randn(cfg.d_sae, d, generator=g)
            dec = dec / dec.norm(dim=1, keepdim=True) / math.sqrt(n)  # equal norms: every latent starts shared
            self.W_dec.append(nn.Parameter(dec))
            self.W_enc.append(nn.Parameter(dec.t().clone()))
        self.b_dec = nn.ParameterList([nn.Parameter(torch.zeros(d)) for d in cfg.widths])
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.register_buffer("threshold", torch.zeros(()))
        for name in ("mean", "scale"):
            for m, d in enumerate(cfg.widths):
                self.register_buffer(f"{name}_{m}", torch.zeros(d) if name == "mean" else torch.ones(()))

    # -- normalisation
    def fit_normalisation(self, xs: list[torch.Tensor]) -> None:
        for m, x in enumerate(xs):
            mu = x.double().mean(0)
            getattr(self, f"mean_{m}").copy_(mu.float())
            getattr(self, f"scale_{m}").copy_((x.double() - mu).pow(2).sum(1).mean().sqrt().clamp_min(1e-8).float())

    def normalise(self, m: int, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - getattr(self, f"mean_{m}")) / getattr(self, f"scale_{m}")

    def denormalise(self, m: int, x: torch.Tensor) -> torch.Tensor:
        return x * getattr(self, f"scale_{m}") + getattr(self, f"mean_{m}")

    # -- the code
    def pre(self, xs: list[torch.Tensor | None], only: int | None = None) -> torch.Tensor:
        """Pre-activations from normalised inputs: all models' terms, or model ``only``'s (see the module docstring)."""
        terms = [(x - self.b_dec[m]) @ self.W_enc[m] for m, x in enumerate(xs) if x is not None and (only is None or m == only)]
        total = sum(terms[1:], terms[0])
        if only is not None and self.cfg.objective == "crosscoder":
            total = total * len(self.cfg.widths)
        return total + self.b_enc

    def sparsify(self, pre: torch.Tensor, train: bool = False) -> torch.Tensor:
        cfg = self.cfg
        if cfg.sparsity == "l1":
            return torch.relu(pre)
        act = torch.relu(pre)
        if cfg.sparsity == "batchtopk" and train:
            flat = act.flatten()
            keep = min(flat.numel(), cfg.k * act.shape[0])
            top = flat.topk(keep)
            out = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(act)
            kept = top.values[top.values > 0]
            if kept.numel():
                with torch.no_grad():
                    t = self.threshold
                    t.copy_(kept.min() if float(t) == 0 else 0.99 * t + 0.01 * kept.min())
            return out
        if cfg.sparsity == "batchtopk":
            return act * (act > self.threshold)
        top = act.topk(cfg.k, dim=1)
        return torch.zeros_like(act).scatter(1, top.indices, top.values)

    def encode(self, xs: list[torch.Tensor | None], only: int | None = None, train: bool = False) -> torch.Tensor:
        return self.sparsify(self.pre(xs, only), train)

    def decode(self, z: torch.Tensor, m: int) -> torch.Tensor:
        return z @ self.W_dec[m] + self.b_dec[m]

    def decoder_norms(self) -> torch.Tensor:
        """[n_models, d_sae]."""
        return torch.stack([w.detach().norm(dim=1) for w in self.W_dec])


def _fvu(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    return (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


@dataclass
class TrainResult:
    model: Crosscoder
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0


def train(xs: list[torch.Tensor], cfg: CrosscoderConfig, steps: int = 2000, batch_size: int = 512, lr: float = 1e-3, seed: int = 0, device: str = "cpu") -> TrainResult:
    """Fit on paired rows ``xs`` (one [n, d_m] tensor per model, row i of each the same position)."""
    from xsae_cli.core.errors import XsaeError

    n = xs[0].shape[0]
    if any(x.shape[0] != n for x in xs) or any(x.shape[1] != d for x, d in zip(xs, cfg.widths, strict=True)):
        raise XsaeError(f"paired rows must agree: shapes {[tuple(x.shape) for x in xs]} for widths {cfg.widths}", "pass one row per paired position for every model")
    model = Crosscoder(cfg, seed).to(device)
    model.fit_normalisation(xs)
    xn = [model.normalise(m, x.to(device)) for m, x in enumerate(xs)]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    out = TrainResult(model)
    n_models = len(xs)
    for step in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g).to(device)
        batch = [x[idx] for x in xn]
        if cfg.objective == "universal":
            losses = []
            for src in range(n_models):
                z = model.encode(list(batch), only=src, train=True)
                losses += [_fvu(batch[t], model.decode(z, t)) for t in range(n_models)]
            loss = torch.stack(losses).mean()
        else:
            z = model.encode(list(batch), train=True)
            loss = torch.stack([_fvu(batch[t], model.decode(z, t)) for t in range(n_models)]).mean()
        if cfg.sparsity == "l1":
            summed = torch.stack([w.norm(dim=1) for w in model.W_dec]).sum(0)  # sum over models of each latent's decoder norm
            loss = loss + cfg.l1_coefficient * (z * summed).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            out.history.append({"step": step, "loss": float(loss.detach())})
    out.steps = steps
    model.eval()
    return out


@torch.no_grad()
def evaluate(model: Crosscoder, xs: list[torch.Tensor]) -> dict[str, Any]:
    """Held-out figures on paired rows: per-model R^2 from the joint code; R^2 of model n from model m's code alone."""
    xn = [model.normalise(m, x) for m, x in enumerate(xs)]
    n_models = len(xs)
    names = model.cfg.models
    joint = model.encode(list(xn))
    own = {names[t]: float(1 - _fvu(xn[t], model.decode(joint, t))) for t in range(n_models)}
    cross: dict[str, float] = {}
    for s in range(n_models):
        z = model.encode(list(xn), only=s)
        for t in range(n_models):
            cross[f"{names[s]}->{names[t]}"] = float(1 - _fvu(xn[t], model.decode(z, t)))
    return {"r2_joint": own, "r2_from_one": cross, "l0": float((joint > 0).sum(1).float().mean())}


@torch.no_grad()
def latent_stats(model: Crosscoder, xs: list[torch.Tensor]) -> dict[str, Any]:
    """Per latent: decoder norm per model, relative norm per model, firing rate from the joint code and from each model alone."""
    norms = model.decoder_norms()
    rel = norms / norms.sum(0).clamp_min(1e-12)
    xn = [model.normalise(m, x) for m, x in enumerate(xs)]
    joint = (model.encode(list(xn)) > 0).float().mean(0)
    alone = torch.stack([(model.encode(list(xn), only=m) > 0).float().mean(0) for m in range(len(xs))])
    alive = joint > 0
    r0 = rel[0]
    shared = alive & (r0 > SHARED_BAND[0]) & (r0 < SHARED_BAND[1])
    out = {
        "decoder_norm": norms.tolist(),
        "relative_norm": rel.tolist(),
        "firing_rate": joint.tolist(),
        "firing_rate_alone": alone.tolist(),
        "alive": int(alive.sum()),
        "shared_fraction": float(shared.sum() / alive.sum().clamp_min(1)),
        "exclusive_fraction": {name: float((alive & (rel[m] >= 1 - EXCLUSIVE)).sum() / alive.sum().clamp_min(1)) for m, name in enumerate(model.cfg.models)},
        "histogram": torch.histc(r0[alive], bins=20, min=0, max=1).tolist(),
    }
    return out


def save(model: Crosscoder, folder: str | Path) -> None:
    """``crosscoder.safetensors`` + ``crosscoder.json`` under ``folder`` (written atomically)."""
    from safetensors.torch import save_file

    from xsae_cli.core.io import atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"b_enc": model.b_enc.detach(), "threshold": model.threshold.detach()}
    for m, name in enumerate(model.cfg.models):
        tensors.update(
            {
                f"W_enc.{name}": model.W_enc[m].detach(),
                f"W_dec.{name}": model.W_dec[m].detach(),
                f"b_dec.{name}": model.b_dec[m].detach(),
                f"mean.{name}": getattr(model, f"mean_{m}"),
                f"scale.{name}": getattr(model, f"scale_{m}"),
            }
        )
    tmp = folder / "crosscoder.safetensors.tmp"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(folder / "crosscoder.safetensors")
    atomic_write_json(folder / "crosscoder.json", {"format": FORMAT, "version": 1, **asdict(model.cfg)})


def load(folder: str | Path, device: str = "cpu") -> Crosscoder:
    from safetensors.torch import load_file

    from xsae_cli.core.errors import XsaeError

    folder = Path(folder)
    try:
        meta = json.loads((folder / "crosscoder.json").read_text())
    except (OSError, ValueError) as exc:
        raise XsaeError(f"{folder} holds no readable crosscoder.json ({exc.__class__.__name__})", "point at a folder written by xsae align crosscoder") from exc
    if meta.get("format") != FORMAT:
        raise XsaeError(f"{folder}/crosscoder.json is not an xsae crosscoder", "point at a folder written by xsae align crosscoder")
    cfg = CrosscoderConfig(**{k: meta[k] for k in ("models", "widths", "d_sae", "k", "sparsity", "objective", "l1_coefficient")})
    model = Crosscoder(cfg)
    t = load_file(str(folder / "crosscoder.safetensors"))
    with torch.no_grad():
        model.b_enc.copy_(t["b_enc"])
        model.threshold.copy_(t["threshold"])
        for m, name in enumerate(cfg.models):
            model.W_enc[m].copy_(t[f"W_enc.{name}"])
            model.W_dec[m].copy_(t[f"W_dec.{name}"])
            model.b_dec[m].copy_(t[f"b_dec.{name}"])
            getattr(model, f"mean_{m}").copy_(t[f"mean.{name}"])
            getattr(model, f"scale_{m}").copy_(t[f"scale.{name}"])
    return model.to(device).eval()
