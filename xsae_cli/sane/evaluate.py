"""Lineage benchmark: does a model's embedding land nearest to the model it was derived from?

Bases: the real SmolLM2-135M and MiniLM-L6 (when fetched) and random-initialised members of
several tiny families (GPT-2, GPT-NeoX, Qwen2, Mistral, Gemma, BERT), several seeds each, so that
same-architecture bases differ only in their values. Variants of every base (:data:`TRANSFORMS`):
fine-tunes on the built-in corpus (short and long), Gaussian noise at 1e-3, 1e-2 and 0.3 of each
tensor's std, 10% and 50% magnitude pruning, an int8 round trip, function-preserving permutations
(MLP neurons, attention heads, residual-stream coordinates, all three), norm rescaling and an exact
rotation of the residual stream after the norm gains are folded (tied heads untied; not for post-LN
BERT), all checked against the base's logits when the zoo is built, and combinations with
fine-tunes, built in their stated order (permutation or rotation first, then the fine-tune).

Real bases are transformed and fine-tuned whole (the permutation check runs the whole model), but
only ``real_layers`` evenly spaced blocks (no token embeddings) are written out and compared, and
every model is embedded from at most ``max_windows`` evenly spaced windows: this keeps the run to
minutes on a CPU. Both are recorded in the JSON.

Transform types are held out of SANE training by folds (:data:`FOLDS`): fold 1 trains on the mild
types and evaluates the permutations, norm rescaling and the hard types; fold 2 the reverse. SANE
trains on the bases plus the variants of its fold's training types; its second contrastive view of
a window is, with probability ``lineage_views``, the same window of another member of the window's
lineage (a known transform used as an augmentation). After training, the per-kind pooling gains are
fitted on the same training models' lineages (:mod:`calibrate`; ``fit_gains``). Each transform type
is scored in the fold that holds it out. Three baselines are scored on the same members in the same
run: the raw weights' cosine (shared tensors as stored, sampled), per-tensor quantile statistics (tensors matched by name; no shared name -> infinitely far) and
a randomly initialised encoder of the checkpoint's shape (gains of 1).

Scores per transform type (queries: its variants; gallery: all bases): top-1 retrieval of the base,
mean reciprocal rank (= mean average precision with one relevant base) and AUROC (own base vs other
bases). Per fold over all pairs of its evaluated members: mAP and AUROC for same-lineage pairs.
Masked-chunk reconstruction R^2 on windows of held-out models against the per-tensor-mean baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import atomic_write_json
from xsae_cli.sane import LINEAGE_FAMILIES, LINEAGE_REAL
from xsae_cli.sane.lineage.zoo import HARD, TRANSFORMS
from xsae_cli.sane.settings import LineageSettings

# Held-out types of each fold; a fold trains on every other type.
FOLDS: tuple[tuple[str, ...], ...] = (
    ("perm_mlp", "perm_heads", "perm_resid", "perm_full", "norm_rescale", "rotate_resid", "noise_0.3", "ft_long", "perm_full+ft_long", "rotate_resid+ft_long"),
    ("noise_1e-3", "noise_1e-2", "prune_10", "prune_50", "int8", "ft_short", "noise_1e-2+ft_short", "prune_30+ft_short"),
)
FAMILIES = LINEAGE_FAMILIES
REAL = LINEAGE_REAL


# --- the run -------------------------------------------------------------------------------


def evaluate(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See :func:`_evaluate`; library chatter on stdout (DeepSpeed's logger) goes to stderr."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        return _evaluate(*args, **kwargs)


def _evaluate(
    workdir: Path,
    settings: LineageSettings = LineageSettings(),
    checkpoint: Path | None = None,
    log: Callable[[str], None] | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    on_member: Callable[[str], None] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build the lineage zoo, train SANE per fold (unless ``checkpoint``), embed, score, write lineage.json."""
    from xsae_cli.core.hardware import package_versions
    from xsae_cli.sane.dataset import ModelSource, TokenizedModel, tokenize_to_cache
    from xsae_cli.sane.embed import embed_tokenized
    from xsae_cli.sane.lineage.baselines import (
        quantile_features,
        quantile_matrix,
        random_encoder,
        raw_cosine_matrix,
        raw_features,
    )
    from xsae_cli.sane.lineage.metrics import (
        METHODS,
        cosine_matrix,
        goals,
        masked_r2,
        nearest_check,
        retrieval_scores,
    )
    from xsae_cli.sane.lineage.zoo import build_lineage_zoo, kept_layers
    from xsae_cli.sane.model import SaneModelConfig
    from xsae_cli.sane.settings import SaneTrainSettings
    from xsae_cli.sane.tokenizer import CoordScheme
    from xsae_cli.sane.train import (
        checkpoint_scheme,
        load_model,
        read_checkpoint_config,
        train,
    )
    from xsae_cli.zoo.sources import file_sha256, resolve
    from xsae_cli.zoo.weights import iter_weights

    s = settings
    if s.seeds < 2:
        raise XsaeError(f"--seeds {s.seeds} gives one base per family: lineage would be trivial", "use --seeds 2 or more")
    stray = [f for f in s.holdout_families if f not in s.families]
    if stray:
        raise XsaeError(f"--holdout-families {', '.join(stray)} not among --families", "hold out families that the zoo builds")
    if not 1 <= s.folds <= len(FOLDS):
        raise XsaeError(f"--folds {s.folds} is out of range", f"use 1 to {len(FOLDS)}")
    workdir = Path(workdir)
    out_json = workdir / "lineage.json"
    if out_json.exists() and not force:
        raise XsaeError(f"{out_json} already exists", "pass --force to replace it, or choose another --out")
    scheme, chunk_size = CoordScheme(view=s.view), SaneModelConfig().chunk_size
    if checkpoint is not None:  # scored as it was trained: its own coordinate scheme, read before any work
        meta0 = read_checkpoint_config(Path(checkpoint))
        scheme, chunk_size = checkpoint_scheme(meta0, str(checkpoint), warn=log), int(meta0["chunk_size"])
        if scheme.view != s.view:
            if log:
                log(f"{checkpoint} was trained on the {scheme.view} view: SANE and the random encoder read that view, not {s.view}")
            s = replace(s, view=scheme.view)
    t0 = time.perf_counter()
    built = build_lineage_zoo(workdir, s, log, on_member)
    bad = {b: {t: d for t, d in c.items() if d > 1e-4} for b, c in built.function_check.items()}
    bad = {b: c for b, c in bad.items() if c}
    if bad:
        raise RuntimeError(f"a function-preserving transform changed the logits: {bad}")
    members = built.members
    base_of = {m.name: m.base for m in members}
    transform_of = {m.name: m.transform for m in members}

    t1 = time.perf_counter()
    cache = workdir / "sane-cache"
    tms: dict[str, TokenizedModel] = {}
    for m in members:
        r = resolve(str(m.path))
        tms[m.name] = TokenizedModel(tokenize_to_cache(ModelSource(m.name, r, file_sha256(list(r.weight_files))), chunk_size, scheme, cache_dir=cache), m.name)
    qfeats = {m.name: quantile_features(iter_weights(resolve(str(m.path)))) for m in members}
    rfeats = {m.name: raw_features(iter_weights(resolve(str(m.path)))) for m in members}
    tokenize_s = time.perf_counter() - t1

    def embed_all(model: Any, names: list[str]) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        vecs = np.stack([embed_tokenized(model, tms[n], ws, max_windows=s.max_windows)[0] for n in names])
        return vecs, (time.perf_counter() - t) / max(len(names), 1)

    folds_out = []
    per_type: dict[str, dict[str, Any]] = {}
    per_family: dict[str, dict[str, dict[str, Any]]] = {}  # held-out family -> type -> method -> scores
    for fi in range(s.folds):
        held = list(FOLDS[fi])
        trained_types = [t for t in TRANSFORMS if t not in held]
        held_fams = set(s.holdout_families)
        train_names = [m.name for m in members if (m.transform == "base" or m.transform in trained_types) and m.family not in held_fams]
        eval_names = [m.name for m in members if m.transform == "base" or m.transform in held]
        t2 = time.perf_counter()
        history: list[dict[str, Any]] = []
        if checkpoint is None:
            run = workdir / f"run-fold{fi + 1}"
            group = {b: i for i, b in enumerate(dict.fromkeys(base_of[n] for n in train_names))}
            ts = SaneTrainSettings(
                epochs=s.epochs,
                batch_size=s.batch_size,
                window_size=s.window_size,
                steps_per_epoch=s.steps_per_epoch,
                device="cpu",
                lr=s.lr,
                seed=s.seed + 1000 * s.train_seed + fi,
                lineage_views=s.lineage_views,
            )
            res = train(
                [tms[n] for n in train_names], run, ts, SaneModelConfig(d_model=s.d_model, latent_dim=s.latent_dim), force=True, on_step=on_step, lineage=[group[base_of[n]] for n in train_names]
            )
            ckpt = res.last_checkpoint
            history = res.history
        else:
            ckpt = Path(checkpoint)
        train_s = time.perf_counter() - t2
        assert ckpt is not None, "training wrote no checkpoint"
        model, meta = load_model(Path(ckpt))
        ws = int(meta["settings"]["window_size"])
        gains: dict[str, float] = {}
        if s.fit_gains and checkpoint is None:
            from xsae_cli.sane.calibrate import fit_into, write_weights

            gains = fit_into(model, {n: tms[n] for n in train_names}, {n: base_of[n] if transform_of[n] != "base" else n for n in train_names}, ws, s.max_windows)
            write_weights(model, meta, Path(ckpt), kind_gains=gains)  # so `xsae sane embed --checkpoint` on it embeds as scored here
            if log:
                log(f"fold {fi + 1}: pooling gains fitted on the training lineages: " + ", ".join(f"{k} {v:.2f}" for k, v in gains.items()))
        random_model = random_encoder(meta["model"])
        sane_vecs, sane_embed_s = embed_all(model, eval_names)
        rand_vecs, _ = embed_all(random_model, eval_names)
        qmat = quantile_matrix([qfeats[n] for n in eval_names])
        dists = {
            "sane": cosine_matrix(sane_vecs),
            "quantile_baseline": qmat,
            "random_encoder_baseline": cosine_matrix(rand_vecs),
            "raw_cosine_baseline": raw_cosine_matrix([rfeats[n] for n in eval_names]),
        }
        real_bases = frozenset(m.name for m in members if m.transform == "base" and m.family in REAL)
        scores = {k: retrieval_scores(eval_names, base_of, transform_of, d, held, real_bases) for k, d in dists.items()}
        from xsae_cli.sane.transforms import FUNCTION_PRESERVING

        nearest = {k: nearest_check(eval_names, base_of, transform_of, d, FUNCTION_PRESERVING) for k, d in dists.items()}
        recon = masked_r2(model, [tms[n] for n in eval_names if transform_of[n] != "base"], ws, seed=s.seed)
        family_of = {m.name: m.family for m in members}
        for fam in s.holdout_families:  # its variants against its own family's bases, every method
            names_f = [n for n in eval_names if family_of[n] == fam]
            idx = np.array([eval_names.index(n) for n in names_f])
            for k, d in dists.items():
                sc = retrieval_scores(names_f, base_of, transform_of, np.asarray(d)[np.ix_(idx, idx)], held)
                for t in held:
                    per_family.setdefault(fam, {}).setdefault(t, {"fold": fi + 1, "hard": t in HARD})[k] = sc["per_type"][t]
        for t in held:
            per_type[t] = {"fold": fi + 1, "hard": t in HARD, **{k: scores[k]["per_type"][t] for k in METHODS}}
            if t in nearest["sane"]:
                per_type[t]["base_nearer_than_other_lineages"] = {k: nearest[k][t]["fraction"] for k in METHODS}
        folds_out.append(
            {
                "fold": fi + 1,
                "held_out": held,
                "trained_on": trained_types,
                "n_train_models": len(train_names),
                "kind_gains": gains,
                "n_eval_models": len(eval_names),
                "checkpoint": str(ckpt),
                "train_seconds": train_s,
                "train_history": history,
                "embed_seconds_per_model": sane_embed_s,
                "pairs": {k: {"map": scores[k]["map"], "auroc": scores[k]["auroc"]} for k in METHODS},
                "reconstruction_held_out": recon,
            }
        )
        if log:
            log(
                f"fold {fi + 1}: held out {', '.join(held)}; SANE mAP {scores['sane']['map']:.3f}, quantile {scores['quantile_baseline']['map']:.3f}, random encoder {scores['random_encoder_baseline']['map']:.3f}"
            )

    held_types = [t for t in TRANSFORMS if t in per_type]
    result = {
        "format": "xsae-sane-lineage",
        "settings": s.to_dict(),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "n_bases": sum(m.transform == "base" for m in members),
        "n_variants": sum(m.transform != "base" for m in members),
        "bases": [m.name for m in members if m.transform == "base"],
        "transforms": {t: list(ops) for t, ops in TRANSFORMS.items()},
        "hard": list(HARD),
        "folds": folds_out,
        "per_type": {t: per_type[t] for t in held_types},
        "holdout_families": list(s.holdout_families),
        "per_held_out_family": per_family,
        "function_check_max_rel_logit_diff": max((d for c in built.function_check.values() for d in c.values()), default=None),
        "function_check": built.function_check,
        "coverage": {
            "real_layers_kept": {m.name: kept_layers(tms[m.name]) for m in members if m.transform == "base" and m.family in REAL},
            "max_windows": s.max_windows,
            "window_size": s.window_size,
            "chunk_fraction_embedded": {m.name: min(1.0, s.max_windows * s.window_size / tms[m.name].n_chunks) for m in members if m.transform == "base"},
        },
        "goals": goals(per_type),
        "seconds": {"build": built.seconds, "tokenize_and_quantiles": tokenize_s, "total": time.perf_counter() - t0},
        "versions": package_versions(),
    }
    atomic_write_json(out_json, result)
    return result
