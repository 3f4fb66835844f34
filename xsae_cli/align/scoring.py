"""Scoring one layer pair: every mapper both ways in both spaces, next to its mean predictor,
shuffled-pair null, second-SAE reference and upper bound; CKA / SVCCA; direct latent matching. Pure
functions of the rows.

Two references sit beside every mapper's held-out score:

* ``upper``: the same mapper fit on the *test* pairs themselves and scored on them. For the linear
  mappers this is the in-sample optimum of their class on those rows, so no map of that class fit
  on other rows can score higher on them: a true upper bound (for the MLP, up to its optimiser).
* ``sae_ref`` (called ``ceiling`` in earlier reports, which it is not: on an exactly rotated copy the exact
  maps reach R^2 1.000 against its 0.77): the same mapper from the target model to itself through
  its second-seed SAE, i.e. how much of the target one SAE's reconstruction (or code) carries.

A :class:`Views` is one model at one layer on the paired rows of every split: its activations, the
codes of its two SAEs (different seeds) and SAE 2's reconstruction (the reference's input).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from xsae_cli.align.linear import Svcca, linear_cka
from xsae_cli.align.mappers import make_mapper
from xsae_cli.align.metrics import code_scores, mean_code_scores, regression_scores

if TYPE_CHECKING:
    from xsae_cli.align.transfer import TransferSpec

SPACES = ("acts", "codes")
DIRECTIONS = ("a->b", "b->a")


@torch.no_grad()
def encode(sae: Any, x: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    dev = next(sae.parameters()).device
    return torch.cat([sae.encode(x[i : i + batch].to(dev)).float().cpu() for i in range(0, x.shape[0], batch)]) if x.shape[0] else torch.zeros((0, sae.cfg.d_sae))


@torch.no_grad()
def decode(sae: Any, codes: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    dev = next(sae.parameters()).device
    return torch.cat([sae.decode(codes[i : i + batch].to(dev)).float().cpu() for i in range(0, codes.shape[0], batch)]) if codes.shape[0] else torch.zeros((0, sae.cfg.d_in))


def sae_health(sae: Any, x: torch.Tensor, codes: torch.Tensor) -> dict[str, float]:
    """Held-out FVU, L0 and dead fraction of an SAE on the paired test rows."""
    from xsae_cli.sae.metrics import fvu

    recon = decode(sae, codes)
    return {"fvu": float(fvu(x, recon)), "l0": float((codes > 0).sum(1).float().mean()), "dead_fraction": float(((codes > 0).sum(0) == 0).float().mean())}


def _shuffle(t: torch.Tensor, seed: int) -> torch.Tensor:
    return t[torch.randperm(t.shape[0], generator=torch.Generator().manual_seed(seed))]


def _round(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 5) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    return obj


@dataclass
class Views:
    """One model at one layer, on the paired rows of every split: activations, codes of both SAEs."""

    acts: dict[str, torch.Tensor]
    codes1: dict[str, torch.Tensor]
    codes2: dict[str, torch.Tensor]
    recon2: dict[str, torch.Tensor]
    sae1: Any
    k: int


def _views(acts: dict[str, torch.Tensor], sae1: Any, sae2: Any) -> Views:
    codes1 = {s: encode(sae1, x) for s, x in acts.items()}
    codes2 = {s: encode(sae2, x) for s, x in acts.items()}
    recon2 = {s: decode(sae2, c) for s, c in codes2.items()}
    k = int(sae1.cfg.k) if getattr(sae1.cfg, "k", None) else max(1, round(float((codes1["train"] > 0).sum(1).float().mean())))
    return Views(acts, codes1, codes2, recon2, sae1, k)


def score_direction(src: Views, tgt: Views, spec: TransferSpec, tick: Callable[[], None], keep_maps: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for one direction at one layer pair: every space x mapper, with mean / null / sae_ref / upper."""
    rows: list[dict[str, Any]] = []
    thr = spec.settings.match_threshold
    for space in SPACES:
        if space == "acts":
            x, y, x_ceil = src.acts, tgt.acts, tgt.recon2
        else:
            x, y, x_ceil = src.codes1, tgt.codes1, tgt.codes2
        y_mean = y["train"].double().mean(0)
        mean_pred = y_mean.float()[None].expand(y["test"].shape[0], -1)
        mean_scores = regression_scores(mean_pred, y["test"], y_mean)
        if space == "acts":
            mean_codes = encode(tgt.sae1, mean_pred[:1]).expand(y["test"].shape[0], -1).contiguous()
            mc = code_scores(mean_codes, tgt.codes1["test"], active_pred=mean_codes, threshold=thr, hungarian=False)
            mc.update({"matched": 0, "matched_fraction": 0.0})
            mean_scores.update(mc)
        else:
            mean_scores.update(mean_code_scores(tgt.codes1["train"], tgt.codes1["test"], tgt.k, thr))
        y_null = {s: _shuffle(y[s], spec.seed + 17 + i) for i, s in enumerate(("train", "val"))}
        for mapper_name in spec.settings.mappers:
            row: dict[str, Any] = {"space": space, "mapper": mapper_name, "mean": _round(mean_scores)}
            for variant, (xs, ys) in {
                "test": (x, y),
                "null": (x, {**y, **y_null}),
                "sae_ref": (x_ceil, y),
                "upper": (x, y),
            }.items():
                mapper = make_mapper(mapper_name, space, spec)
                fit_on = ("test", "test") if variant == "upper" else ("train", "val")  # upper: fit on the rows it is scored on
                fitted = mapper.fit(xs[fit_on[0]], ys[fit_on[0]], xs[fit_on[1]], ys[fit_on[1]])
                pred = fitted.predict(xs["test"])
                scores = regression_scores(pred, y["test"], ys["train"].double().mean(0))
                if space == "acts":
                    pc = encode(tgt.sae1, pred)
                    scores.update(code_scores(pc, tgt.codes1["test"], active_pred=pc, threshold=thr))
                else:
                    scores.update(code_scores(pred, tgt.codes1["test"], k=tgt.k, threshold=thr))
                row[variant] = _round(scores)
                fit_info = {k: v for k, v in fitted.info.items() if k not in ("history", "val_curve", "settings")}
                row.setdefault("fit", {})[variant] = _round(fit_info)
                if variant == "test" and space == "acts":
                    keep_maps[mapper_name] = fitted
                tick()
            rows.append(row)
    return rows


def similarity(a: Views, b: Views, seed: int) -> dict[str, Any]:
    """CKA (activations, codes) and held-out SVCCA between the layers, with null and second-SAE references."""
    svcca = Svcca()
    t_a, t_b = a.acts["test"], b.acts["test"]
    out: dict[str, Any] = {}
    out["cka_acts"] = {
        "test": linear_cka(t_a, t_b),
        "null": linear_cka(t_a, _shuffle(t_b, seed)),
        "sae_ref_a": linear_cka(a.recon2["test"], t_a),
        "sae_ref_b": linear_cka(b.recon2["test"], t_b),
    }
    out["cka_codes"] = {
        "test": linear_cka(a.codes1["test"], b.codes1["test"]),
        "null": linear_cka(a.codes1["test"], _shuffle(b.codes1["test"], seed)),
        "sae_ref_a": linear_cka(a.codes2["test"], a.codes1["test"]),
        "sae_ref_b": linear_cka(b.codes2["test"], b.codes1["test"]),
    }
    real = svcca.score(a.acts["train"], b.acts["train"], t_a, t_b)
    null = svcca.score(a.acts["train"], _shuffle(b.acts["train"], seed), t_a, t_b)
    ceil_a = svcca.score(a.recon2["train"], a.acts["train"], a.recon2["test"], t_a)
    ceil_b = svcca.score(b.recon2["train"], b.acts["train"], b.recon2["test"], t_b)
    out["svcca_acts"] = {
        "test": real["svcca"],
        "null": null["svcca"],
        "sae_ref_a": ceil_a["svcca"],
        "sae_ref_b": ceil_b["svcca"],
        "in_sample": real["svcca_in_sample"],
        "null_in_sample": null["svcca_in_sample"],
        "dims_a": real["dims_a"],
        "dims_b": real["dims_b"],
        "train_rows_per_dim": real["rows_per_dim"],
    }
    return _round(out)


def latent_matching(a: Views, b: Views, threshold: float, seed: int) -> dict[str, Any]:
    """SAE A's latents against SAE B's directly (no mapper): Hungarian on test correlations."""
    from xsae_cli.align.metrics import correlation_matrix, hungarian_matches

    def match(p: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        alive = (t > 0).sum(0) >= 5
        return hungarian_matches(correlation_matrix(p, t), threshold, alive)

    corr = correlation_matrix(a.codes1["test"], b.codes1["test"])
    alive = (b.codes1["test"] > 0).sum(0) >= 5
    return _round(
        {
            "test": hungarian_matches(corr, threshold, alive),
            "top_pairs": top_matched_pairs(corr, alive),
            "null": match(a.codes1["test"], _shuffle(b.codes1["test"], seed)),
            "sae_ref_a": match(a.codes2["test"], a.codes1["test"]),
            "sae_ref_b": match(b.codes2["test"], b.codes1["test"]),
        }
    )


TOP_PAIRS = 24


def top_matched_pairs(corr: torch.Tensor, alive: torch.Tensor, n: int = TOP_PAIRS) -> dict[str, Any]:
    """The ``n`` best one-to-one latent pairs and their test correlations with each other.

    What ``xsae viz align`` draws as a heatmap: the full [d_sae_a, d_sae_b] matrix is too big to keep
    in a report, and the pairs' own block (diagonal = the pair, off-diagonal = how specific it is)
    is the part a reader looks at. Rows are A's latents, columns B's, both in order of the pair's r.
    """
    from scipy.optimize import linear_sum_assignment

    cols = torch.nonzero(alive).flatten()
    if cols.numel() == 0:
        return {"latents_a": [], "latents_b": [], "r": []}
    sub = corr[:, cols].double().nan_to_num(0.0).numpy()
    rows, picked = linear_sum_assignment(sub, maximize=True)
    order = sub[rows, picked].argsort()[::-1][:n]
    la = [int(rows[i]) for i in order]
    lb = [int(cols[picked[i]]) for i in order]
    block = corr[la][:, lb].double()
    return {"latents_a": la, "latents_b": lb, "r": [[round(float(v), 3) for v in row] for row in block]}
