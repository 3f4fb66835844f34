"""`xsae align crosscoder`: pair two models' positions, harvest, train a crosscoder (or universal SAE)
per layer pair, and score it on held-out documents next to its null and the ridge map.

Every figure sits beside references from the same run:

* per-model R^2 of the reconstruction from the joint code (1 - FVU);
* cross-reconstruction (code read from A alone, decoded into B and back) beside the ridge map
  between the activations fit on the train pairs, and the ridge map fit on the *test* pairs (an
  upper bound for a linear map on those rows);
* the same crosscoder trained on shuffled pairs (B's train rows permuted) as the null, scored on
  the real test pairs; shared / exclusive fractions and the relative-norm histogram for both.

The pairing aligns two tokenizers, so this takes two models; a pairing that keeps less than
``min_kept`` of either model's tokens is refused with the fractions it kept.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from xsae_cli.align.settings import AlignSettings, CrosscoderSettings
from xsae_cli.core.errors import XsaeError

REPORT = "crosscoder_report.json"
REPORT_FORMAT = "xsae-crosscoder-report"


@dataclass
class CrosscoderSpec:
    models: list[str]
    out: Path
    settings: AlignSettings = field(default_factory=AlignSettings)
    cc: CrosscoderSettings = field(default_factory=CrosscoderSettings)
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    force: bool = False
    trust_remote_code: bool = False
    diff: bool = False  # `align diff`: rank latents by exclusivity, with their top test contexts
    top_latents: int = 10


def parse_models(text: str | list[str]) -> list[str]:
    models = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    if len(models) < 2:
        raise XsaeError(f"--models needs two models, got {len(models)}", "pass --models a,b")
    if len(models) > 2:
        raise XsaeError(f"--models names {len(models)} models, but the pairing aligns the positions of two tokenizers", "pass two models: --models a,b")
    return models


def _r2(x: torch.Tensor, pred: torch.Tensor) -> float:
    x, pred = x.double(), pred.double()
    return float(1 - (x - pred).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))


def ridge_refs(xa: dict[str, torch.Tensor], xb: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Ridge A->B and B->A: fit on train (penalty on val), scored on test; and fit on test (the linear upper bound)."""
    from xsae_cli.align.mappers.ridge import Ridge

    out: dict[str, Any] = {}
    for name, (x, y) in {"a->b": (xa, xb), "b->a": (xb, xa)}.items():
        fitted = Ridge().fit(x["train"], y["train"], x["val"], y["val"])
        upper = Ridge().fit(x["test"], y["test"], x["test"], y["test"])
        out[name] = {"ridge": _r2(y["test"], fitted.predict(x["test"])), "ridge_upper": _r2(y["test"], upper.predict(x["test"]))}
    return out


def check_same_tokenizer(names: list[str], trust_remote_code: bool) -> None:
    """``align diff`` pairs positions one to one: both models must tokenize alike (checked before any weights load)."""
    from xsae_cli.align.sides import _tokenizer
    from xsae_cli.zoo.registry import resolve_entry

    toks = [_tokenizer(resolve_entry(n), n, trust_remote_code) for n in names]
    if toks[0].get_vocab() != toks[1].get_vocab():
        raise XsaeError(
            f"{names[0]} and {names[1]} use different tokenizers; align diff compares a model with a fine-tune of itself",
            f"use `xsae align crosscoder --models {names[0]},{names[1]}` for models with different tokenizers",
        )


@torch.no_grad()
def rank_exclusive(model: Any, test: list[torch.Tensor], windows: Any, chosen: torch.Tensor, tokenizer: Any, top: int, contexts: int = 3, span: int = 8) -> dict[str, Any]:
    """The latents most exclusive to each model (relative decoder norm), alive on test, with their top test contexts."""
    from xsae_cli.align.crosscoder import latent_stats

    st = latent_stats(model, test)
    rel = torch.tensor(st["relative_norm"])
    rate = torch.tensor(st["firing_rate"])
    codes = model.encode([model.normalise(m, x) for m, x in enumerate(test)])
    ids = windows.input_ids
    out: dict[str, Any] = {}
    for m, name in enumerate(model.cfg.models):
        score = torch.where(rate > 0, rel[m], torch.full_like(rel[m], -1.0))
        picked = [int(i) for i in score.argsort(descending=True)[:top] if score[i] >= 0]
        rows = []
        for lat in picked:
            acts = codes[:, lat]
            best = [int(i) for i in acts.argsort(descending=True)[:contexts] if acts[i] > 0]
            ctx = []
            for r in best:
                w, pos = int(chosen[r, 0]), int(chosen[r, 1])
                left = tokenizer.decode(ids[w, max(0, pos - span) : pos].tolist())
                ctx.append({"text": left, "token": tokenizer.decode(ids[w, pos : pos + 1].tolist()), "activation": round(float(acts[r]), 4)})
            rows.append({"latent": lat, "relative_norm": round(float(rel[m, lat]), 4), "firing_rate": round(float(rate[lat]), 5), "contexts": ctx})
        out[name] = rows
    return out


def one_layer_pair(spec: CrosscoderSpec, names: list[str], xa: dict[str, torch.Tensor], xb: dict[str, torch.Tensor], folder: Path) -> dict[str, Any]:
    from xsae_cli.align.crosscoder import CrosscoderConfig, evaluate, latent_stats, save, train

    c = spec.cc
    widths = [xa["train"].shape[1], xb["train"].shape[1]]
    cfg = CrosscoderConfig(names, widths, d_sae=c.expansion * max(widths), k=c.k, sparsity=c.sparsity, objective=c.objective, l1_coefficient=c.l1_coefficient)
    t0 = time.perf_counter()
    real = train([xa["train"], xb["train"]], cfg, steps=c.steps, batch_size=c.batch_size, lr=c.lr, seed=spec.seed)
    seconds = time.perf_counter() - t0
    perm = torch.randperm(xb["train"].shape[0], generator=torch.Generator().manual_seed(spec.seed + 17))
    null = train([xa["train"], xb["train"][perm]], cfg, steps=c.steps, batch_size=c.batch_size, lr=c.lr, seed=spec.seed)
    test = [xa["test"], xb["test"]]
    save(real.model, folder)
    stats, null_stats = latent_stats(real.model, test), latent_stats(null.model, test)
    summary = ("alive", "shared_fraction", "exclusive_fraction", "histogram")
    return {
        "config": asdict(cfg),
        "train_seconds": round(seconds, 2),
        "final_loss": real.history[-1]["loss"],
        "test": evaluate(real.model, test),
        "null": evaluate(null.model, test),
        "ridge": ridge_refs(xa, xb),
        "latents": {k: stats[k] for k in summary},
        "latents_null": {k: null_stats[k] for k in summary},
        "per_latent": {k: stats[k] for k in ("decoder_norm", "relative_norm", "firing_rate", "firing_rate_alone")},
        "folder": str(folder),
        "_model": real.model,
    }


def run_crosscoder(spec: CrosscoderSpec) -> dict[str, Any]:
    """The whole run; writes ``crosscoder_report.json`` and one crosscoder folder per layer pair under ``spec.out``."""
    from xsae_cli.align.sides import blocks_of, load_sides, parse_layers
    from xsae_cli.align.stages import check_counts, harvest, measure_widths, pair
    from xsae_cli.align.transfer import TransferSpec, json_safe
    from xsae_cli.core.console import info
    from xsae_cli.core.hardware import memory_report, seed_everything
    from xsae_cli.core.io import atomic_write_json

    names = parse_models(spec.models)
    if spec.diff:
        check_same_tokenizer(names, spec.trust_remote_code)
    out = Path(spec.out)
    if (out / REPORT).exists() and not spec.force:
        raise XsaeError(f"{out} already holds a crosscoder report", "pass --force to run it again, or choose another --out")
    t_start = time.perf_counter()
    seed_everything(spec.seed)
    tspec = TransferSpec(a=names[0], b=names[1], out=out, settings=spec.settings, device=spec.device, dtype=spec.dtype, seed=spec.seed, trust_remote_code=spec.trust_remote_code)
    layer_pairs = parse_layers(spec.settings.layers, (names[0], names[1]), blocks_of(names[0]), blocks_of(names[1]))
    A, B, device = load_sides(tspec, layer_pairs)
    pairing = pair(tspec, A.tokenizer, B.tokenizer)
    st = pairing.stats
    floor = spec.cc.min_kept
    if min(st["kept_a"], st["kept_b"]) < floor:
        raise XsaeError(
            f"the tokenizers share too few positions: {st['kept_a']:.1%} of {A.name}'s tokens and {st['kept_b']:.1%} of {B.name}'s are paired, below the floor of {floor:.0%}",
            "pair models whose tokenizers split text more alike, or lower [align.crosscoder] min_kept",
        )
    measure_widths(A, B, pairing)
    check_counts(pairing, A, B)
    info(f"paired {st['pairs']:,} positions: {st['kept_a']:.1%} of {A.name}'s tokens, {st['kept_b']:.1%} of {B.name}'s")
    data = harvest(tspec, (A, B), pairing)
    data.content.clear()
    if spec.force:
        shutil.rmtree(out / "crosscoders", ignore_errors=True)
    results = []
    for la, lb in layer_pairs:
        ha, hb = A.hooks[la], B.hooks[lb]
        info(f"training a {spec.cc.objective} on {A.name} layer {la} and {B.name} layer {lb}")
        xa = {s: data.paired["a"][s][ha].float() for s in ("train", "val", "test")}
        xb = {s: data.paired["b"][s][hb].float() for s in ("train", "val", "test")}
        entry = one_layer_pair(spec, names, xa, xb, out / "crosscoders" / f"{la}_{lb}")
        model = entry.pop("_model")
        if spec.diff:
            entry["exclusive_latents"] = rank_exclusive(model, [xa["test"], xb["test"]], pairing.corpus.splits["test"].a, pairing.chosen["test"], A.tokenizer, spec.top_latents)
        results.append({"layer_a": la, "layer_b": lb, "hook_a": ha, "hook_b": hb, **entry})
    report = {
        "format": REPORT_FORMAT,
        "version": 1,
        "models": names,
        "widths": {A.name: A.width, B.name: B.width},
        "pairing": st,
        "pairs_used": pairing.used,
        "floor_kept": floor,
        "results": results,
        "notes": {
            "r2": "1 - FVU on held-out test pairs, about the test mean",
            "r2_from_one": "code read from one model alone, decoded into each (crosscoder objective: that model's term x 2, not what it is trained for; universal: trained for it)",
            "null": "the same crosscoder trained on shuffled pairs (B's train rows permuted), scored on the real test pairs",
            "ridge_upper": "ridge fit on the test pairs themselves: an upper bound for a linear map between the activations on those rows",
            "shared": "alive latents whose relative decoder norm of the first model is in (0.3, 0.7); exclusive: that model's relative norm >= 0.9",
        },
        "timings": {"total": round(time.perf_counter() - t_start, 2)},
        "memory": memory_report(device),
        "config": json_safe(asdict(spec)),
    }
    atomic_write_json(out / REPORT, report)
    return report
