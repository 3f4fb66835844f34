"""The whole alignment protocol: pair, represent, fit mappers both ways, score against nulls, intervene.

What ``xsae align transfer`` calls. Steps, and the one rule each step keeps:

1. **Pair** (:mod:`pairing`): one corpus through both tokenizers, split by document into
   train / val / test, positions paired where both tokenizers end a token at the same character.
2. **Represent**: residual-stream activations at the paired layers (block outputs), and the codes
   of two SAEs per model and layer trained on that model's *train* documents through the SAE
   engine with different seeds (or the first one loaded from disk in any supported format).
3. **Map** both directions, in activation space and in SAE-code space, with each mapper
   (:mod:`align.mappers`: Procrustes, ridge, MLP): fit on train, choose penalties / stop early on val, score on test.
4. **Score** every mapping next to three references from the same run: the *mean predictor*
   (the training mean of the target), the *shuffled-pair null* (the same mapper fit on train and
   val rows whose pairing was shuffled, scored on real test pairs), and the *ceiling* (the same
   mapper fit from the target model to itself seen through its second-seed SAE: codes of SAE 2 ->
   codes of SAE 1, or SAE 2's reconstruction -> activations). Plus CKA and SVCCA per layer pair.
5. **Intervene** (:mod:`interventions`): source latents' decoder directions mapped into the
   target's residual stream, with a random direction of the same norm as control.

Layers: a bare index names a block of model A; model B's block is the one at the same relative
depth (the same fraction of blocks applied: ``round((a + 1) * n_b / n_a) - 1``). ``a:b`` pairs
them explicitly. Activations are block outputs (the residual stream after block a).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from xsae_cli.align.linear import Svcca, linear_cka
from xsae_cli.align.mappers import (
    canonical,
    linear_mappers,
    make_mapper,
    mapper_entry,
    mapper_notes,
)
from xsae_cli.align.settings import AlignSettings, MlpMapperSettings
from xsae_cli.align.metrics import code_scores, mean_code_scores, regression_scores
from xsae_cli.core.console import info, progress, warn
from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import atomic_write_json, read_json
from xsae_cli.sae.settings import SaeTrainSettings

REPORT = "report.json"
REPORT_FORMAT = "xsae-align-report"
SPACES = ("acts", "codes")
DIRECTIONS = ("a->b", "b->a")


@dataclass
class TransferSpec:
    """One transfer run: the two models, where it goes, and the [align] / [align.sae] / [align.mlp] settings."""

    a: str
    b: str
    out: Path
    settings: AlignSettings = field(default_factory=AlignSettings)
    sae: SaeTrainSettings = field(default_factory=lambda: SaeTrainSettings(k=32, expansion=4, tokens=200_000, batch_size=2048))
    mlp: MlpMapperSettings = field(default_factory=MlpMapperSettings)
    sae_a: str | None = None  # folder of SAEs for model A (seed 1); the second seed is still trained
    sae_b: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    force: bool = False
    trust_remote_code: bool = False


# --------------------------------------------------------------------------------------- layers


def n_blocks(model: Any) -> int:
    """Number of transformer blocks (zoo/anatomy: the config's count, else the main ModuleList's)."""
    from xsae_cli.zoo.anatomy import count_blocks

    value = count_blocks(model)
    if value is not None:
        return value
    raise XsaeError(f"cannot tell how many blocks {type(model).__name__} has", "pair layers of a transformer with a num_hidden_layers config entry")


def blocks_of(name: str) -> int:
    """Blocks of a model from its config file alone (layer checks should not wait for a weight load)."""
    from xsae_cli.zoo.anatomy import config_blocks
    from xsae_cli.zoo.registry import resolve_entry

    value = config_blocks(resolve_entry(name).config)
    if value is not None:
        return value
    raise XsaeError(f"cannot tell how many blocks {name} has from its config", "pair layers of a transformer with a num_hidden_layers config entry")


def matched_depth(layer_a: int, n_a: int, n_b: int) -> int:
    """B's block after which the same fraction of blocks has run as after A's block ``layer_a``."""
    return min(n_b - 1, max(0, math.floor((layer_a + 1) * n_b / n_a + 0.5) - 1))


def parse_layers(specs: list[str], names: tuple[str, str], n_a: int, n_b: int) -> list[tuple[int, int]]:
    """``["5", "6", "7"]`` or ``["5:1", "15:3"]`` -> [(layer_a, layer_b), ...], checked against both depths."""
    out: list[tuple[int, int]] = []
    if not specs:
        raise XsaeError("no layers given", "pass e.g. --layers 5,6,7 (A's blocks; B at the same relative depth) or --layers 5:1,15:3")
    for raw in specs:
        text = str(raw).strip()
        parts = text.split(":")
        if len(parts) > 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
            raise XsaeError(f"bad layer '{text}'", "write a block index of model A (5) or an explicit pair a:b (5:1)")
        la = int(parts[0])
        if not 0 <= la < n_a:
            raise XsaeError(f"layer {la} is out of range for {names[0]} ({n_a} blocks)", f"pick layers of {names[0]} in 0..{n_a - 1}")
        if len(parts) == 2:
            lb = int(parts[1])
            if not 0 <= lb < n_b:
                raise XsaeError(f"layer {lb} is out of range for {names[1]} ({n_b} blocks)", f"pick layers of {names[1]} in 0..{n_b - 1}")
        else:
            lb = matched_depth(la, n_a, n_b)
        if (la, lb) not in out:
            out.append((la, lb))
    return out


# --------------------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    name: str
    model: Any
    tokenizer: Any
    blocks: int


def load_pair(spec: TransferSpec) -> tuple[Loaded, Loaded, Any]:
    from xsae_cli.align.pairing import check_fast
    from xsae_cli.core.hardware import resolve_device, resolve_dtype
    from xsae_cli.zoo.registry import resolve_entry
    from xsae_cli.zoo.sources import load_model

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    out = []
    for name in (spec.a, spec.b):
        model, tok = load_model(resolve_entry(name), device=device, dtype=dtype, trust_remote_code=spec.trust_remote_code)
        check_fast(tok, name)
        out.append(Loaded(name, model, tok, n_blocks(model)))
    return out[0], out[1], device


def _check_context(loaded: Loaded, context_size: int) -> None:
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and context_size > limit:
        raise XsaeError(f"context size {context_size} is longer than {loaded.name} accepts ({limit} positions)", f"pass --context-size {limit} or less")


def _texts(spec: TransferSpec) -> list[Any]:
    from xsae_cli.data.corpus import load_texts

    return load_texts(spec.settings.corpus, text_field=spec.settings.text_field, limit=spec.settings.limit)


def pair_stats(spec: TransferSpec) -> dict[str, Any]:
    """Pairing statistics of two models' tokenizers on a corpus (what ``xsae align pair`` shows)."""
    from xsae_cli.align.pairing import pair_corpus
    from xsae_cli.zoo.registry import resolve_entry

    toks = []
    for name in (spec.a, spec.b):
        toks.append(_tokenizer(resolve_entry(name), name, spec.trust_remote_code))
    corpus = pair_corpus(_texts(spec), toks[0], toks[1], names=(spec.a, spec.b), context_size=spec.settings.context_size, val_fraction=spec.settings.val_fraction, test_fraction=spec.settings.test_fraction, seed=spec.seed)
    return corpus.stats()


def _tokenizer(resolved: Any, name: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    from xsae_cli.zoo.sources import quiet_transformers

    folder = resolved.model_dir
    if folder is None:
        raise XsaeError(f"{name} has no model folder with a tokenizer", "add an HF folder (config.json and tokenizer files)")
    quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(folder, **({"trust_remote_code": True} if trust_remote_code else {}))
    except (OSError, ValueError) as exc:
        raise XsaeError(f"{name} has no usable tokenizer: {str(exc).splitlines()[0]}", "add a folder with tokenizer files") from exc


# --------------------------------------------------------------------------------------- SAEs


def train_side_saes(
    model_name: str,
    rows: dict[str, torch.Tensor],
    folder: Path,
    spec: TransferSpec,
    seed: int,
    device: Any,
    fingerprint: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One SAE per hook on ``rows`` through the SAE pipeline: (SAEs, training figures; None if reused).

    ``folder/train.json`` records what they were trained on; an interrupted training resumes from
    its checkpoints, and a folder trained on something else is started over.
    """
    from xsae_cli.sae.formats import load_sae
    from xsae_cli.sae.pipeline import InMemoryActivations, hook_dirname, train_saes

    hooks = list(rows)
    sae = spec.sae
    settings = sae.replace(
        checkpoint_every=max(50, sae.tokens // sae.batch_size // 4), keep_checkpoints=1,
        dead_tokens_threshold=min(1_000_000, max(2 * sae.batch_size, sae.tokens // 4)),
    )
    want = {"settings": json_safe({**asdict(settings), "seed": seed}), "data": fingerprint, "hooks": hooks}
    marker = folder / "train.json"
    if marker.exists():
        if read_json(marker, "SAE training record") == want and all((folder / hook_dirname(h) / "cfg.json").exists() for h in hooks):
            info(f"reusing the SAEs of {model_name} (seed {seed}) in {folder}")
            return {h: load_sae(folder / hook_dirname(h), device=device) for h in hooks}, None
        if read_json(marker, "SAE training record") != want:
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, want)
    info(f"training SAEs on {model_name} (seed {seed}): {', '.join(hooks)}; {settings.tokens:,} tokens over {int(next(iter(rows.values())).shape[0]):,} train rows")
    metadata = {h: {"model_name": model_name, "hook_name": h, "context_size": spec.settings.context_size, "dataset_path": spec.settings.corpus, "hook_site": "output", "prepend_bos": True} for h in hooks}
    trained = train_saes(InMemoryActivations(rows, settings.batch_size, seed), settings, folder, seed=seed, metadata=metadata, device=device)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    return trained.saes, {"tokens_per_second": trained.tokens_per_second, "seconds": trained.seconds, "tokens": trained.tokens}


def load_given_saes(path: str, hooks: list[str], layers: list[int], model_name: str, widths: dict[str, int], device: Any) -> dict[str, Any]:
    """SAEs for ``hooks`` from a folder (SAELens or sparsify layout, one SAE or a run folder of them)."""
    from xsae_cli.sae.formats import load_sae_dir

    found = load_sae_dir(path, device=device)
    out = {}
    for hook, layer in zip(hooks, layers):
        sae = found.get(hook)
        if sae is None:
            hits = [s for name, s in found.items() if (s.cfg.metadata or {}).get("hook_name") == hook or name.endswith(f".{layer}")]
            sae = hits[0] if len(hits) == 1 else (next(iter(found.values())) if len(found) == 1 and len(hooks) == 1 else None)
        if sae is None:
            raise XsaeError(f"{path} holds no SAE for {hook} of {model_name} (it holds: {', '.join(found)})", f"point at a folder with an SAE per paired layer, named {hook}")
        if sae.cfg.d_in != widths[hook]:
            raise XsaeError(f"SAE in {path} has d_in={sae.cfg.d_in} but {hook} of {model_name} has width {widths[hook]}", "use an SAE trained on that model and layer")
        out[hook] = sae.float().eval()
    return out


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


# --------------------------------------------------------------------------------------- mapping


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


def json_safe(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=str))


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
    """Rows for one direction at one layer pair: every space x mapper, with mean / null / ceiling."""
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
                "ceiling": (x_ceil, y),
            }.items():
                mapper = make_mapper(mapper_name, space, spec)
                fitted = mapper.fit(xs["train"], ys["train"], xs["val"], ys["val"])
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
    """CKA (activations, codes) and held-out SVCCA between the layers, with null and ceilings."""
    svcca = Svcca()
    t_a, t_b = a.acts["test"], b.acts["test"]
    out: dict[str, Any] = {}
    out["cka_acts"] = {
        "test": linear_cka(t_a, t_b),
        "null": linear_cka(t_a, _shuffle(t_b, seed)),
        "ceiling_a": linear_cka(a.recon2["test"], t_a),
        "ceiling_b": linear_cka(b.recon2["test"], t_b),
    }
    out["cka_codes"] = {
        "test": linear_cka(a.codes1["test"], b.codes1["test"]),
        "null": linear_cka(a.codes1["test"], _shuffle(b.codes1["test"], seed)),
        "ceiling_a": linear_cka(a.codes2["test"], a.codes1["test"]),
        "ceiling_b": linear_cka(b.codes2["test"], b.codes1["test"]),
    }
    real = svcca.score(a.acts["train"], b.acts["train"], t_a, t_b)
    null = svcca.score(a.acts["train"], _shuffle(b.acts["train"], seed), t_a, t_b)
    ceil_a = svcca.score(a.recon2["train"], a.acts["train"], a.recon2["test"], t_a)
    ceil_b = svcca.score(b.recon2["train"], b.acts["train"], b.recon2["test"], t_b)
    out["svcca_acts"] = {
        "test": real["svcca"], "null": null["svcca"], "ceiling_a": ceil_a["svcca"], "ceiling_b": ceil_b["svcca"],
        "in_sample": real["svcca_in_sample"], "null_in_sample": null["svcca_in_sample"],
        "dims_a": real["dims_a"], "dims_b": real["dims_b"], "train_rows_per_dim": real["rows_per_dim"],
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
    return _round({
        "test": hungarian_matches(corr, threshold, alive),
        "top_pairs": top_matched_pairs(corr, alive),
        "null": match(a.codes1["test"], _shuffle(b.codes1["test"], seed)),
        "ceiling_a": match(a.codes2["test"], a.codes1["test"]),
        "ceiling_b": match(b.codes2["test"], b.codes1["test"]),
    })


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


# --------------------------------------------------------------------------------------- protocol


def _subsample(pairs: torch.Tensor, cap: int, seed: int) -> torch.Tensor:
    if cap <= 0 or pairs.shape[0] <= cap:
        return pairs
    idx = torch.randperm(pairs.shape[0], generator=torch.Generator().manual_seed(seed))[:cap]
    return pairs[idx.sort().values]


def _check_counts(corpus: Any, widths: dict[str, int], names: tuple[str, str]) -> None:
    d = max(widths.values())
    n = {s: corpus.splits[s].n_pairs for s in ("train", "val", "test")}
    need = {"train": 2 * d, "val": max(16, d // 8), "test": d // 2}
    if any(n[s] < need[s] for s in n):
        raise XsaeError(
            f"too few paired tokens: train {n['train']:,}, val {n['val']:,}, test {n['test']:,} for widths {widths[names[0]]} ({names[0]}) and {widths[names[1]]} ({names[1]}); "
            f"need at least {need['train']:,} train, {need['val']:,} val and {need['test']:,} test pairs",
            "use more documents (--limit, or a larger --corpus)",
        )


def prepare_out(out: Path, force: bool) -> None:
    if (out / REPORT).exists() and not force:
        raise XsaeError(f"{out} already holds an alignment report", "pass --force to run it again, or choose another --out")
    if force and out.exists():
        shutil.rmtree(out / "saes", ignore_errors=True)
        (out / REPORT).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def run_transfer(spec: TransferSpec) -> dict[str, Any]:
    """Run the whole protocol and write ``report.json`` under ``spec.out``; return the report."""
    from xsae_cli.align.interventions import (
        Readout,
        median_norm,
        pick_latents,
        transfer_latents,
    )
    from xsae_cli.align.pairing import harvest_paired, pair_corpus
    from xsae_cli.core.hardware import memory_report, package_versions, seed_everything
    from xsae_cli.data.activations import resolve_module_name

    t_start = time.perf_counter()
    st = spec.settings
    st = st.replace(mappers=list(dict.fromkeys(canonical(m, warn) for m in st.mappers)), intervene_mapper=canonical(st.intervene_mapper, warn))  # old names (hypernet) -> registered ones
    spec = dataclasses.replace(spec, settings=st)
    if st.intervene_latents and not mapper_entry(st.intervene_mapper).linear:
        raise XsaeError(f"--intervene-mapper must be a linear mapper ({' or '.join(linear_mappers())}), got '{st.intervene_mapper}'", "a direction maps through the linear part of a map")
    if st.intervene_latents and st.intervene_mapper not in st.mappers:
        raise XsaeError(f"the intervention mapper '{st.intervene_mapper}' is not among --mappers ({', '.join(st.mappers)})", f"add {st.intervene_mapper} to --mappers")
    out = Path(spec.out)
    prepare_out(out, spec.force)
    seed_everything(spec.seed)
    timings: dict[str, float] = {}

    names = (spec.a, spec.b)
    layer_pairs = parse_layers(spec.settings.layers, names, *(blocks_of(n) for n in names))  # before loading any weights
    A, B, device = load_pair(spec)
    for m in (A, B):
        _check_context(m, spec.settings.context_size)
    hooks_a = {la: resolve_module_name(A.model, str(la)) for la, _ in layer_pairs}
    hooks_b = {lb: resolve_module_name(B.model, str(lb)) for _, lb in layer_pairs}

    t0 = time.perf_counter()
    corpus = pair_corpus(_texts(spec), A.tokenizer, B.tokenizer, names=names, context_size=spec.settings.context_size, val_fraction=spec.settings.val_fraction, test_fraction=spec.settings.test_fraction, seed=spec.seed)
    timings["pairing"] = time.perf_counter() - t0
    stats = corpus.stats()

    from xsae_cli.data.activations import ActivationStore

    widths = {
        A.name: ActivationStore(A.model, A.tokenizer, [hooks_a[layer_pairs[0][0]]], corpus.splits["train"].a, shuffle=False).d_in[hooks_a[layer_pairs[0][0]]],
        B.name: ActivationStore(B.model, B.tokenizer, [hooks_b[layer_pairs[0][1]]], corpus.splits["train"].b, shuffle=False).d_in[hooks_b[layer_pairs[0][1]]],
    }
    _check_counts(corpus, widths, names)
    given: dict[str, dict[str, Any]] = {}  # SAEs from disk are checked against the widths before any harvest
    for side, m, hooks, path in (("a", A, hooks_a, spec.sae_a), ("b", B, hooks_b, spec.sae_b)):
        if path:
            hook_list = list(dict.fromkeys(hooks.values()))
            layers = [next(la for la, hk in hooks.items() if hk == h) for h in hook_list]
            given[side] = load_given_saes(path, hook_list, layers, m.name, {h: widths[m.name] for h in hook_list}, device)
    # Said only once the input is known to be usable, so that a mistake stays a one-line error.
    for la, lb in layer_pairs:
        info(f"pairing {A.name} layer {la} ({hooks_a[la]}, {la + 1}/{A.blocks} blocks) with {B.name} layer {lb} ({hooks_b[lb]}, {lb + 1}/{B.blocks} blocks)")
    info(f"paired {stats['pairs']:,} positions: {stats['kept_a']:.1%} of {A.name}'s {stats['tokens_a']:,} tokens, {stats['kept_b']:.1%} of {B.name}'s {stats['tokens_b']:,}")

    # ---- harvest
    caps = {"train": spec.settings.max_train_pairs, "val": max(1, spec.settings.max_test_pairs // 2), "test": spec.settings.max_test_pairs}
    chosen = {s: _subsample(corpus.splits[s].pairs, caps[s], spec.seed + i) for i, s in enumerate(("train", "val", "test"))}
    acts: dict[str, dict[str, dict[str, torch.Tensor]]] = {"a": {}, "b": {}}
    content: dict[str, dict[str, torch.Tensor]] = {}
    harvest_info: dict[str, Any] = {}
    t0 = time.perf_counter()
    with progress() as bar:
        for side, m, hooks in (("a", A, hooks_a), ("b", B, hooks_b)):
            total = sum(len(getattr(corpus.splits[s], side)) for s in chosen)
            task = bar.add_task(f"harvesting {m.name}", total=total, unit="ctx")
            tokens, seconds = 0, 0.0
            hook_list = list(dict.fromkeys(hooks.values()))
            for split in ("train", "val", "test"):
                ctx = getattr(corpus.splits[split], side)
                pos = chosen[split][:, [0, 1 if side == "a" else 2]]
                h = harvest_paired(m.model, m.tokenizer, hook_list, ctx, pos, keep_content=split == "train", batch_contexts=spec.settings.batch_contexts, model_name=m.name, on_batch=lambda k, t=task: bar.advance(t, k))
                acts[side][split] = h.paired
                if h.content is not None:
                    content[side] = h.content
                tokens += h.tokens
                seconds += h.seconds
            harvest_info[m.name] = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_second": round(tokens / max(seconds, 1e-9), 1)}
    timings["harvest"] = time.perf_counter() - t0

    # ---- SAEs
    t0 = time.perf_counter()
    saes: dict[str, dict[int, dict[str, Any]]] = {"a": {}, "b": {}}
    sae_train_info: dict[str, Any] = {}
    fingerprint = {"corpus": spec.settings.corpus, "limit": spec.settings.limit, "context_size": spec.settings.context_size, "val_fraction": spec.settings.val_fraction, "test_fraction": spec.settings.test_fraction, "seed": spec.seed}
    for side, m, hooks in (("a", A, hooks_a), ("b", B, hooks_b)):
        hook_list = list(dict.fromkeys(hooks.values()))
        rows = {h: content[side][h] for h in hook_list}
        for which, seed in ((1, spec.seed), (2, spec.seed + 1000)):
            if which == 1 and side in given:
                saes[side][which] = given[side]
                sae_train_info[f"{m.name}/seed{which}"] = {"loaded_from": str(spec.sae_a if side == "a" else spec.sae_b)}
                continue
            got, stats_ = train_side_saes(m.name, rows, out / "saes" / side / f"seed{which}", spec, seed, device, {**fingerprint, "model": m.name, "rows": int(next(iter(rows.values())).shape[0])})
            saes[side][which] = {h: s.float().eval() for h, s in got.items()}
            sae_train_info[f"{m.name}/seed{which}"] = _round(stats_) if stats_ else {"reused": True}
    del content
    timings["saes"] = time.perf_counter() - t0

    # ---- mapping, similarity, interventions
    n_fits = len(layer_pairs) * len(DIRECTIONS) * len(SPACES) * len(spec.settings.mappers) * 3
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    test_ctx_a, test_ctx_b = corpus.splits["test"].a, corpus.splits["test"].b
    longest = torch.argsort(test_ctx_a.attention_mask.sum(1) + test_ctx_b.attention_mask.sum(1), descending=True)[: spec.settings.intervene_contexts]
    readouts: dict[str, Any] = {}
    t_map = t_int = 0.0
    with progress() as bar:
        task = bar.add_task("fitting mappers", total=n_fits, unit="fit")
        itask = bar.add_task("interventions", total=len(layer_pairs) * 2 * spec.settings.intervene_latents, unit="latent") if spec.settings.intervene_latents else None
        for la, lb in layer_pairs:
            ha, hb = hooks_a[la], hooks_b[lb]
            tm = time.perf_counter()
            va = _views({s: acts["a"][s][ha] for s in chosen}, saes["a"][1][ha], saes["a"][2][ha])
            vb = _views({s: acts["b"][s][hb] for s in chosen}, saes["b"][1][hb], saes["b"][2][hb])
            entry: dict[str, Any] = {
                "layer_a": la, "layer_b": lb, "hook_a": ha, "hook_b": hb,
                "saes": {A.name: {"seed1": _round(sae_health(va.sae1, va.acts["test"], va.codes1["test"])), "seed2": _round(sae_health(saes["a"][2][ha], va.acts["test"], va.codes2["test"]))},
                         B.name: {"seed1": _round(sae_health(vb.sae1, vb.acts["test"], vb.codes1["test"])), "seed2": _round(sae_health(saes["b"][2][hb], vb.acts["test"], vb.codes2["test"]))}},
                "directions": {},
            }
            maps: dict[str, dict[str, Any]] = {}
            for direction, (src, tgt) in zip(DIRECTIONS, ((va, vb), (vb, va))):
                maps[direction] = {}
                entry["directions"][direction] = score_direction(src, tgt, spec, lambda: bar.advance(task), maps[direction])
            entry["similarity"] = similarity(va, vb, spec.seed)
            entry["latent_matching"] = latent_matching(va, vb, spec.settings.match_threshold, spec.seed)
            t_map += time.perf_counter() - tm
            if spec.settings.intervene_latents:
                ti = time.perf_counter()
                entry["interventions"] = {}
                for direction, (src_m, tgt_m, src_v, tgt_v, src_h, tgt_h, src_ctx, tgt_ctx) in zip(
                    DIRECTIONS,
                    ((A, B, va, vb, ha, hb, test_ctx_a, test_ctx_b), (B, A, vb, va, hb, ha, test_ctx_b, test_ctx_a)),
                ):
                    for m_, ctx in ((src_m, src_ctx), (tgt_m, tgt_ctx)):
                        if m_.name not in readouts:
                            readouts[m_.name] = Readout(m_.model, m_.tokenizer, ctx.select(longest), batch_contexts=4)
                    codes = src_v.codes1["test"]
                    latents = pick_latents(codes, spec.settings.intervene_latents)
                    freqs = (codes > 0).float().mean(0)
                    dirs = src_v.sae1.W_dec.detach().float().cpu()[latents]
                    mapped = torch.stack([maps[direction][spec.settings.intervene_mapper].direction(d) for d in dirs]) if latents else torch.zeros((0, tgt_v.acts["test"].shape[1]))
                    entry["interventions"][direction] = _round(transfer_latents(
                        readouts[src_m.name], readouts[tgt_m.name], src_h, tgt_h, dirs, mapped, latents, [float(freqs[i]) for i in latents],
                        strength=spec.settings.strength, norm_source=median_norm(src_v.acts["test"]), norm_target=median_norm(tgt_v.acts["test"]),
                        top=spec.settings.top_tokens, seed=spec.seed, on_step=(lambda: bar.advance(itask)) if itask is not None else None,
                    ))
                    entry["interventions"][direction]["mapper"] = spec.settings.intervene_mapper
                t_int += time.perf_counter() - ti
            results.append(entry)
            del va, vb
    timings["mapping"] = t_map
    timings["interventions"] = t_int
    timings["total"] = time.perf_counter() - t_start

    report = {
        "format": REPORT_FORMAT,
        "version": 1,
        "a": A.name,
        "b": B.name,
        "blocks": {A.name: A.blocks, B.name: B.blocks},
        "widths": widths,
        "layer_pairs": [[la, lb] for la, lb in layer_pairs],
        "layer_scheme": "bare index = block of A; B's block at the same fraction of blocks applied, round((a+1)*n_b/n_a)-1; a:b = explicit",
        "pairing": stats,
        "pairs_used": {s: int(chosen[s].shape[0]) for s in chosen},
        "harvest": harvest_info,
        "sae_training": sae_train_info,
        "results": results,
        "notes": {**NOTES, **mapper_notes()},
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "memory": memory_report(device),
        "config": json_safe(asdict(spec)),
        "versions": {**package_versions(), **_extra_versions()},
    }
    atomic_write_json(out / REPORT, report)
    return report


NOTES = {
    "r2": "1 - SSE/SST over all dims; SST about the training mean of the target, so the mean predictor scores ~0",
    "cosine": "per-token cosine of prediction and target, both centred on the training mean (uncentred cosine is high for any two residual vectors)",
    "null": "the same mapper fit on train/val rows whose pairing was shuffled, scored on the real test pairs",
    "ceiling": "the same mapper fit from the target model to itself through its second-seed SAE (SAE-2 codes -> SAE-1 codes; SAE-2 reconstruction -> activations)",
    "acts_codes": "activation mappers' latent scores encode the mapped activations with the target's SAE 1; code mappers' active set is the top-k of the prediction",
    "matched": "one-to-one latent pairs by Hungarian assignment on test correlations, counted above the threshold; rank 1 = the partner is that latent's best predictor",
    "top_pairs": "latent_matching.top_pairs: the best one-to-one pairs of SAE A and SAE B latents (Hungarian on test correlations) and their test correlation block, rows A's latents and columns B's in the same order (what xsae viz align draws)",
    "svcca": "fit on train rows (SVD to 99% variance, then CCA), scored on test rows. CCA-type indices need many more rows than dimensions: the in-sample value is inflated, so the held-out one is reported next to it",
    "cka": "linear CKA on test rows; biased upwards when rows are not many times the widths (see the shuffled null)",
    "interventions": "decoder direction of a source latent mapped by the linear part of the intervention mapper, added at every content position of held-out windows at strength x the median token norm; a random direction of the same norm is the control. Without an LM head (MiniLM) there is no KL; promoted tokens come from an embedding lens",
}


def _extra_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("scipy", "scikit-learn", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def load_report(path: str | Path) -> dict[str, Any]:
    """A saved report (the folder or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / REPORT
    data = read_json(p, "alignment report")
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        raise XsaeError(f"{p} is not an xsae alignment report", "point at the --out folder of `xsae align transfer`")
    return data


def warn_small(report: dict[str, Any]) -> None:
    """Say when the similarity indices rest on too few rows per dimension."""
    for r in report.get("results", []):
        sv = r.get("similarity", {}).get("svcca_acts", {})
        if sv.get("train_rows_per_dim") is not None and sv["train_rows_per_dim"] < 10:
            warn(f"SVCCA at layers {r['layer_a']}:{r['layer_b']} fit on {sv['train_rows_per_dim']:.1f} rows per dimension; CCA-type indices need many more")
