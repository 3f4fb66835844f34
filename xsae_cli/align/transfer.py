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
   val rows whose pairing was shuffled, scored on real test pairs), the *upper bound* (the same
   mapper fit on the test pairs themselves: nothing of its class fit elsewhere scores higher on
   them), and the *second-SAE reference* ``sae_ref`` (the same mapper from the target model to
   itself seen through its second-seed SAE: codes of SAE 2 -> codes of SAE 1, or SAE 2's
   reconstruction -> activations; called "ceiling" in earlier reports, though exact maps beat it).
   Plus CKA and SVCCA per layer pair.
5. **Intervene** (:mod:`interventions`): source latents' decoder directions mapped into the
   target's residual stream, with a random direction of the same norm as control.

Where each part lives: :mod:`sides` (the two models, one :class:`~xsae_cli.align.sides.Side` each,
and layer pairing: a bare index names a block of A, B's block is at the same relative depth),
:mod:`stages` (pair, harvest, SAEs, score: one function and one typed result each),
:mod:`scoring` (the per-layer scores, pure functions of the rows). This module runs the stages in
order and writes ``report.json``. Activations are block outputs (the residual stream after block a).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xsae_cli.align.mappers import canonical, linear_mappers, mapper_entry, mapper_notes
from xsae_cli.align.settings import AlignSettings, MlpMapperSettings
from xsae_cli.align.sides import _tokenizer, blocks_of, load_sides, parse_layers
from xsae_cli.align.stages import check_counts, harvest, load_given_saes, measure_widths, pair, score_layers, texts, train_all_saes
from xsae_cli.core.console import info, warn
from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import atomic_write_json, read_json
from xsae_cli.sae.settings import SaeTrainSettings

REPORT = "report.json"
REPORT_FORMAT = "xsae-align-report"


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


def pair_stats(spec: TransferSpec) -> dict[str, Any]:
    """Pairing statistics of two models' tokenizers on a corpus (what ``xsae align pair`` shows)."""
    from xsae_cli.align.pairing import pair_corpus
    from xsae_cli.zoo.registry import resolve_entry

    toks = [_tokenizer(resolve_entry(name), name, spec.trust_remote_code) for name in (spec.a, spec.b)]
    s = spec.settings
    corpus = pair_corpus(texts(spec), toks[0], toks[1], names=(spec.a, spec.b), context_size=s.context_size, val_fraction=s.val_fraction, test_fraction=s.test_fraction, seed=spec.seed)
    return corpus.stats()


def json_safe(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=str))


def prepare_out(out: Path, force: bool) -> None:
    if (out / REPORT).exists() and not force:
        raise XsaeError(f"{out} already holds an alignment report", "pass --force to run it again, or choose another --out")
    if force and out.exists():
        shutil.rmtree(out / "saes", ignore_errors=True)
        (out / REPORT).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _checked(spec: TransferSpec) -> TransferSpec:
    """Old mapper names resolved, the intervention mapper checked: before anything loads."""
    st = spec.settings
    st = st.replace(mappers=list(dict.fromkeys(canonical(m, warn) for m in st.mappers)), intervene_mapper=canonical(st.intervene_mapper, warn))  # old names (hypernet) -> registered ones
    if st.intervene_latents and not mapper_entry(st.intervene_mapper).linear:
        raise XsaeError(f"--intervene-mapper must be a linear mapper ({' or '.join(linear_mappers())}), got '{st.intervene_mapper}'", "a direction maps through the linear part of a map")
    if st.intervene_latents and st.intervene_mapper not in st.mappers:
        raise XsaeError(f"the intervention mapper '{st.intervene_mapper}' is not among --mappers ({', '.join(st.mappers)})", f"add {st.intervene_mapper} to --mappers")
    return dataclasses.replace(spec, settings=st)


def run_transfer(spec: TransferSpec) -> dict[str, Any]:
    """Run the whole protocol and write ``report.json`` under ``spec.out``; return the report.

    The run folder is held for the whole run (:func:`xsae_cli.core.runlock.owned`)."""
    from xsae_cli.core.runlock import owned

    with owned(spec.out):
        return _run_transfer(spec)


def _run_transfer(spec: TransferSpec) -> dict[str, Any]:
    from xsae_cli.core.hardware import memory_report, package_versions, seed_everything

    t_start = time.perf_counter()
    spec = _checked(spec)
    out = Path(spec.out)
    prepare_out(out, spec.force)
    seed_everything(spec.seed)

    layer_pairs = parse_layers(spec.settings.layers, (spec.a, spec.b), blocks_of(spec.a), blocks_of(spec.b))  # before loading any weights
    A, B, device = load_sides(spec, layer_pairs)
    pairing = pair(spec, A.tokenizer, B.tokenizer)
    measure_widths(A, B, pairing)
    check_counts(pairing, A, B)
    # SAEs from disk are checked against the widths before any harvest
    given = {side.key: load_given_saes(path, side, device) for side, path in ((A, spec.sae_a), (B, spec.sae_b)) if path}
    # Said only once the input is known to be usable, so that a mistake stays a one-line error.
    for la, lb in layer_pairs:
        info(f"pairing {A.name} layer {la} ({A.hooks[la]}, {la + 1}/{A.blocks} blocks) with {B.name} layer {lb} ({B.hooks[lb]}, {lb + 1}/{B.blocks} blocks)")
    st = pairing.stats
    info(f"paired {st['pairs']:,} positions: {st['kept_a']:.1%} of {A.name}'s {st['tokens_a']:,} tokens, {st['kept_b']:.1%} of {B.name}'s {st['tokens_b']:,}")

    data = harvest(spec, (A, B), pairing)
    saes = train_all_saes(spec, (A, B), data, given, out, device)
    scores = score_layers(spec, A, B, layer_pairs, pairing, data, saes)
    timings = {
        "pairing": pairing.seconds,
        "harvest": data.seconds,
        "saes": saes.seconds,
        "mapping": scores.mapping_seconds,
        "interventions": scores.intervention_seconds,
        "total": time.perf_counter() - t_start,
    }
    report = {
        "format": REPORT_FORMAT,
        "version": 1,
        "a": A.name,
        "b": B.name,
        "blocks": {A.name: A.blocks, B.name: B.blocks},
        "widths": {A.name: A.width, B.name: B.width},
        "layer_pairs": [[la, lb] for la, lb in layer_pairs],
        "layer_scheme": "bare index = block of A; B's block at the same fraction of blocks applied, round((a+1)*n_b/n_a)-1; a:b = explicit",
        "pairing": pairing.stats,
        "pairs_used": pairing.used,
        "harvest": data.info,
        "sae_training": saes.info,
        "results": scores.results,
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
    "upper": "upper bound: the same mapper fit on the test pairs and scored on them (in-sample optimum of its class on those rows; for the MLP up to its optimiser)",
    "sae_ref": "second-SAE reference, not a bound: the same mapper fit from the target model to itself through its second-seed SAE (SAE-2 codes -> SAE-1 codes; SAE-2 reconstruction -> activations); 'ceiling' in earlier reports",
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
