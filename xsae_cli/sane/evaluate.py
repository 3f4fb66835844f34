"""Lineage benchmark: does a model's embedding land nearest to the model it was derived from?

Bases: random-initialised members of the tiny demo families, several seeds each (same
architecture, same init distribution: only the values tell them apart), plus any zoo models
named with ``extra_bases``. Variants of every base: Gaussian noise at 1e-3, 1e-2 and 0.3 of each
tensor's std, 10% and 50% magnitude pruning, an int8 round trip, and a function-preserving
permutation of MLP neurons (checked to leave the logits unchanged). Nothing about the transforms
is used in training, so every transform type is held out.

Scores: top-1 retrieval of the base among all bases by cosine distance, per transform type, for
SANE embeddings and for two baselines computed in the same run: per-tensor quantile statistics
(tensors matched by name; a model sharing no tensor name is infinitely far) and a randomly
initialised encoder of the same shape as the checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import atomic_write_json

TRANSFORMS = ("noise_1e-3", "noise_1e-2", "noise_0.3", "prune_10", "prune_50", "int8", "permute_mlp")
QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)


def transform_state(state: dict[str, Any], kind: str, seed: int) -> dict[str, Any]:
    """Apply one transform to a state dict of float tensors (a new dict; the input is untouched)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind == "permute_mlp":
        return permute_mlp(state, g)
    out = {}
    for name, t in state.items():
        if not t.is_floating_point() or t.numel() < 2:
            out[name] = t.clone()
            continue
        x = t.float()
        if kind.startswith("noise_"):
            rel = float(kind.split("_", 1)[1])
            x = x + rel * x.std() * torch.randn(x.shape, generator=g)
        elif kind.startswith("prune_"):
            frac = int(kind.split("_", 1)[1]) / 100
            if x.dim() >= 2:
                k = int(frac * x.numel())
                if k > 0:
                    thresh = x.abs().reshape(-1).kthvalue(k).values
                    x = torch.where(x.abs() <= thresh, torch.zeros_like(x), x)
        elif kind == "int8":
            scale = x.abs().max().clamp_min(1e-12) / 127
            x = (x / scale).round().clamp(-127, 127) * scale
        else:
            raise XsaeError(f"unknown transform '{kind}'", f"use one of {', '.join(TRANSFORMS)}")
        out[name] = x.to(t.dtype)
    return out


def permute_mlp(state: dict[str, Any], g: Any) -> dict[str, Any]:
    """Permute the hidden neurons of every MLP block: up/gate rows (and biases), down columns.

    Handles nn.Linear layouts (Llama, Qwen2, Mistral, Gemma, GPT-NeoX, BERT) and GPT-2's Conv1D
    (``mlp.c_fc`` is [in, out], ``mlp.c_proj`` is [hidden, out]). The model's function is unchanged.
    """
    import torch

    from xsae_cli.sane.tokenizer import CoordScheme, tensor_kind

    layer_re = CoordScheme().layer_re()
    groups: dict[str, dict[str, list[str]]] = {}
    for name in state:
        m = layer_re.search(name)
        kind = tensor_kind(name)
        if not m or kind not in ("mlp_up", "mlp_gate", "mlp_down"):
            continue
        groups.setdefault(name[: m.end()], {}).setdefault(kind, []).append(name)
    out = {k: v.clone() for k, v in state.items()}
    for kinds in groups.values():
        ups = kinds.get("mlp_up", []) + kinds.get("mlp_gate", [])
        downs = kinds.get("mlp_down", [])
        up_w = [n for n in ups if n.endswith("weight")]
        if not up_w or not downs:
            continue
        conv1d = "c_fc" in up_w[0]
        n_hidden = state[up_w[0]].shape[1 if conv1d else 0]
        perm = torch.randperm(n_hidden, generator=g)
        for n in ups:
            t = state[n]
            axis = 1 if (conv1d and n.endswith("weight")) else 0
            out[n] = t.index_select(axis, perm).clone()
        for n in downs:
            if n.endswith("bias"):
                continue
            axis = 0 if conv1d else 1
            out[n] = state[n].index_select(axis, perm).clone()
    return out


def quantile_features(state_iter: Any) -> dict[str, np.ndarray]:
    """Per-tensor quantiles plus mean and std: the statistics baseline."""
    import torch

    q = torch.tensor(QUANTILES, dtype=torch.float32)
    feats = {}
    for name, t in state_iter:
        if not t.is_floating_point() or t.numel() < 2:
            continue
        x = t.reshape(-1).float()
        if x.numel() > 1_000_000:
            x = x[torch.linspace(0, x.numel() - 1, 1_000_000).long()]
        feats[name] = np.concatenate([torch.quantile(x, q).numpy(), [float(x.mean()), float(x.std())]])
    return feats


def quantile_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    shared = [n for n in a if n in b and a[n].shape == b[n].shape]
    if not shared:
        return float("inf")
    return float(np.mean([np.linalg.norm(a[n] - b[n]) / (np.linalg.norm(b[n]) + 1e-12) for n in shared]))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 - float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


@dataclass
class Member:
    name: str
    path: Path
    base: str
    transform: str  # "base" for bases


def _save_variant(base_dir: Path, state: dict[str, Any], target: Path) -> None:
    import shutil

    from xsae_cli.core.io import atomic_dir, save_safetensors

    with atomic_dir(target, force=True) as tmp:
        for f in base_dir.iterdir():
            if f.suffix == ".json" and f.name != "model.safetensors.index.json":
                shutil.copy(f, tmp / f.name)
        save_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})


def _logits(folder: Path, ids: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from xsae_cli.zoo.sources import quiet_transformers

    quiet_transformers()
    m = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


def build_lineage_zoo(workdir: Path, families: list[str], seeds: int, log: Callable[[str], None] | None = None) -> tuple[list[Member], dict[str, float]]:
    """Bases (tiny demo families x seeds) and their variants, as HF folders under ``workdir``."""
    import torch

    from xsae_cli.core.io import atomic_dir
    from xsae_cli.zoo.demo import TINY
    from xsae_cli.zoo.sources import quiet_transformers, resolve
    from xsae_cli.zoo.weights import iter_weights

    quiet_transformers()
    unknown = [f for f in families if f not in TINY]
    if unknown:
        raise XsaeError(f"unknown lineage families: {', '.join(unknown)}", f"use some of {', '.join(TINY)}")
    members: list[Member] = []
    perm_check: dict[str, float] = {}
    ids = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    for fam in families:
        build = TINY[fam][0]
        for s in range(seeds):
            name = f"{fam}-s{s}"
            folder = workdir / "bases" / name
            if not (folder / "config.json").exists():
                torch.manual_seed(1000 + 17 * s + len(fam))
                model = build()
                with atomic_dir(folder, force=True) as tmp:
                    model.save_pretrained(tmp, safe_serialization=True)
            members.append(Member(name, folder, name, "base"))
            state = {n: t.clone() for n, t in iter_weights(resolve(str(folder)))}
            for i, tr in enumerate(TRANSFORMS):
                vname = f"{name}~{tr}"
                vfolder = workdir / "variants" / vname
                if not (vfolder / "model.safetensors").exists():
                    _save_variant(folder, transform_state(state, tr, seed=7919 * s + i), vfolder)
                members.append(Member(vname, vfolder, name, tr))
                if tr == "permute_mlp":
                    perm_check[vname] = float((_logits(folder, ids) - _logits(vfolder, ids)).abs().max())
            if log:
                log(f"built {name} and {len(TRANSFORMS)} variants")
    return members, perm_check


def masked_r2(model: Any, tms: list[Any], window_size: int, n_windows: int = 16, mask_prob: float = 0.15, seed: int = 0) -> dict[str, float]:
    """Masked-chunk reconstruction on held-out windows: R^2 against the per-tensor-mean baseline.

    Values are normalised per tensor, so the per-tensor mean predicts 0 and its error is the mean
    square of the targets; R^2 = 1 - MSE(model) / MSE(per-tensor mean) (0: no better than the mean).
    """
    import torch

    from xsae_cli.sane.dataset import WindowSampler, collate
    from xsae_cli.sane.model import float_mask

    rng = np.random.default_rng([seed, 99])
    sampler = WindowSampler(tms, window_size)
    wins = [sampler.sample(rng)[1] for _ in range(n_windows)]
    b = collate(wins)
    cmask = torch.from_numpy(np.stack([(rng.random(window_size) < mask_prob) & w["mask"] for w in wins]))
    with torch.no_grad():
        recon = model.decode(model.encode(b, cmask), b)
    fm = float_mask(b, model.cfg.chunk_size)
    out = {}
    for key, sel in (("masked", fm & cmask.unsqueeze(-1)), ("visible", fm & ~cmask.unsqueeze(-1))):
        n = sel.sum().clamp_min(1)
        mse = float(((recon - b["values"]) ** 2 * sel).sum() / n)
        base = float((b["values"] ** 2 * sel).sum() / n)
        out[f"r2_{key}"] = 1.0 - mse / base if base > 0 else float("nan")
        out[f"mse_{key}"] = mse
        out[f"mse_tensor_mean_{key}"] = base
    return out


def top1_by_transform(members: list[Member], dist: Callable[[str, str], float]) -> dict[str, float]:
    bases = [m.name for m in members if m.transform == "base"]
    hits: dict[str, list[bool]] = {}
    for m in members:
        if m.transform == "base":
            continue
        best = min(bases, key=lambda b: (dist(m.name, b), b))
        hits.setdefault(m.transform, []).append(best == m.base)
    out = {t: float(np.mean(v)) for t, v in hits.items()}
    out["all"] = float(np.mean([x for v in hits.values() for x in v])) if hits else float("nan")
    return out


def evaluate(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See :func:`_evaluate`; library chatter on stdout (DeepSpeed's logger) goes to stderr."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        return _evaluate(*args, **kwargs)


def _evaluate(
    workdir: Path,
    checkpoint: Path | None,
    families: list[str],
    seeds: int = 3,
    train_epochs: int = 3,
    window_size: int = 256,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Build the lineage zoo, (train if no checkpoint,) embed everything, score retrieval."""
    import torch

    from xsae_cli.core.hardware import package_versions
    from xsae_cli.sane.dataset import ModelSource, TokenizedModel, tokenize_to_cache
    from xsae_cli.sane.embed import embed_tokenized
    from xsae_cli.sane.model import SaneAutoencoder, SaneModelConfig
    from xsae_cli.sane.train import TrainSettings, load_model, train
    from xsae_cli.zoo.sources import file_sha256, resolve
    from xsae_cli.zoo.weights import iter_weights

    t0 = time.perf_counter()
    workdir = Path(workdir)
    members, perm_check = build_lineage_zoo(workdir, families, seeds, log)
    bad = {k: v for k, v in perm_check.items() if v > 1e-4}
    if bad:
        raise RuntimeError(f"MLP permutation changed the logits: {bad}")
    cache = workdir / "sane-cache"
    tms: dict[str, TokenizedModel] = {}
    for m in members:
        r = resolve(str(m.path))
        tms[m.name] = TokenizedModel(tokenize_to_cache(ModelSource(m.name, r, file_sha256(list(r.weight_files))), cache_dir=cache), m.name)
    if checkpoint is None:
        run = workdir / "run"
        base_tms = [tms[m.name] for m in members if m.transform == "base"]
        res = train(base_tms, run, TrainSettings(epochs=train_epochs, batch_size=8, window_size=window_size, steps_per_epoch=20, device="cpu", lr=1e-3, seed=seed), SaneModelConfig(d_model=64, latent_dim=16), on_step=on_step)
        checkpoint = res.last_checkpoint
    model, meta = load_model(Path(checkpoint))
    ws = int(meta["settings"]["window_size"])
    torch.manual_seed(12345)
    random_model = SaneAutoencoder(SaneModelConfig(**meta["model"])).eval()
    sane_vecs = {n: embed_tokenized(model, tm, ws)[0] for n, tm in tms.items()}
    rand_vecs = {n: embed_tokenized(random_model, tm, ws)[0] for n, tm in tms.items()}
    qfeats = {m.name: quantile_features(iter_weights(resolve(str(m.path)))) for m in members}
    scores = {
        "sane": top1_by_transform(members, lambda a, b: cosine(sane_vecs[a], sane_vecs[b])),
        "quantile_baseline": top1_by_transform(members, lambda a, b: quantile_distance(qfeats[a], qfeats[b])),
        "random_encoder_baseline": top1_by_transform(members, lambda a, b: cosine(rand_vecs[a], rand_vecs[b])),
    }
    held_out = [tms[m.name] for m in members if m.transform != "base"]
    recon = masked_r2(model, held_out, ws, seed=seed)
    # Family retrieval (architecture), which SANE should get right even when lineage is hard.
    fam = {m.name: m.base.rsplit("-s", 1)[0] for m in members}
    bases = [m.name for m in members if m.transform == "base"]
    fam_hits = [fam[min((b for b in bases if b != m.name), key=lambda b: cosine(sane_vecs[m.name], sane_vecs[b]))] == fam[m.name] for m in members if m.transform == "base"]
    result = {
        "format": "xsae-sane-lineage",
        "checkpoint": str(checkpoint),
        "families": families,
        "seeds": seeds,
        "seed": seed,
        "n_bases": len(bases),
        "n_variants": len(members) - len(bases),
        "transforms": list(TRANSFORMS),
        "held_out": "all transform types (training is self-supervised on the bases only)",
        "top1": scores,
        "reconstruction_held_out": recon,
        "family_top1_sane_bases": float(np.mean(fam_hits)) if fam_hits else None,
        "permutation_max_logit_diff": max(perm_check.values()) if perm_check else None,
        "seconds": time.perf_counter() - t0,
        "versions": package_versions(),
    }
    atomic_write_json(workdir / "lineage.json", result)
    return result


def format_table(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for t in [*result["transforms"], "all"]:
        rows.append([t] + [f"{result['top1'][k].get(t, float('nan')):.2f}" for k in ("sane", "quantile_baseline", "random_encoder_baseline")])
    return rows

