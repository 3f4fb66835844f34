"""The stages of the alignment protocol, each a function with a typed result.

``pair`` (one corpus through both tokenizers, paired positions, split by document) ->
``harvest`` (activations at the paired layers on the chosen pairs; every train position for the
SAEs) -> ``train_saes`` (two SAEs per model and layer, different seeds, through the SAE pipeline, or
the first loaded from disk) -> ``score_layers`` (every mapper both ways against its references,
similarity, latent matching, interventions). :func:`xsae_cli.align.transfer.run_transfer` runs them
in order and writes the report; each can be run and tested on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from xsae_cli.align.scoring import DIRECTIONS, SPACES, _round, _views, latent_matching, sae_health, score_direction, similarity
from xsae_cli.align.sides import Side
from xsae_cli.core.console import info, progress
from xsae_cli.core.errors import XsaeError

if TYPE_CHECKING:
    from xsae_cli.align.transfer import TransferSpec

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------- pairing


@dataclass
class Pairing:
    """The paired corpus, its statistics and the pairs each split uses (subsampled to the caps)."""

    corpus: Any
    stats: dict[str, Any]
    chosen: dict[str, torch.Tensor]  # split -> [n, 3] (window, position in A, position in B)
    seconds: float = 0.0

    @property
    def used(self) -> dict[str, int]:
        return {s: int(t.shape[0]) for s, t in self.chosen.items()}


def _subsample(pairs: torch.Tensor, cap: int, seed: int) -> torch.Tensor:
    if cap <= 0 or pairs.shape[0] <= cap:
        return pairs
    idx = torch.randperm(pairs.shape[0], generator=torch.Generator().manual_seed(seed))[:cap]
    return pairs[idx.sort().values]


def texts(spec: TransferSpec) -> list[Any]:
    from xsae_cli.data.corpus import load_texts

    s = spec.settings
    return load_texts(s.corpus, text_field=s.text_field, limit=s.limit)


def pair(spec: TransferSpec, tok_a: Any, tok_b: Any) -> Pairing:
    """Pair the two tokenizers' positions on the corpus and choose each split's pairs."""
    from xsae_cli.align.pairing import pair_corpus

    s = spec.settings
    t0 = time.perf_counter()
    corpus = pair_corpus(texts(spec), tok_a, tok_b, names=(spec.a, spec.b), context_size=s.context_size, val_fraction=s.val_fraction, test_fraction=s.test_fraction, seed=spec.seed)
    caps = {"train": s.max_train_pairs, "val": max(1, s.max_test_pairs // 2), "test": s.max_test_pairs}
    chosen = {sp: _subsample(corpus.splits[sp].pairs, caps[sp], spec.seed + i) for i, sp in enumerate(SPLITS)}
    return Pairing(corpus, corpus.stats(), chosen, time.perf_counter() - t0)


def measure_widths(A: Side, B: Side, pairing: Pairing) -> None:
    """Each side's activation width at its first paired hook (one short forward)."""
    from xsae_cli.data.activations import ActivationStore

    for side in (A, B):
        hook = side.hook_list[0]
        side.width = ActivationStore(side.model, side.tokenizer, [hook], side.contexts(pairing.corpus.splits["train"]), shuffle=False).d_in[hook]


def check_counts(pairing: Pairing, A: Side, B: Side) -> None:
    """Enough paired rows for mappers of these widths to be fit and scored at all."""
    d = max(A.width, B.width)
    n = {s: pairing.corpus.splits[s].n_pairs for s in SPLITS}
    need = {"train": 2 * d, "val": max(16, d // 8), "test": d // 2}
    if any(n[s] < need[s] for s in n):
        raise XsaeError(
            f"too few paired tokens: train {n['train']:,}, val {n['val']:,}, test {n['test']:,} for widths {A.width} ({A.name}) and {B.width} ({B.name}); "
            f"need at least {need['train']:,} train, {need['val']:,} val and {need['test']:,} test pairs",
            "use more documents (--limit, or a larger --corpus)",
        )


# --------------------------------------------------------------------------------------- harvest


@dataclass
class Harvest:
    """Activations at the paired positions, per side, split and hook; every train position for the SAEs."""

    paired: dict[str, dict[str, dict[str, torch.Tensor]]]  # side -> split -> hook -> [pairs, d]
    content: dict[str, dict[str, torch.Tensor]]  # side -> hook -> [train tokens, d]
    info: dict[str, Any]  # model name -> tokens, seconds, tokens/s
    seconds: float = 0.0

    def views(self, side: Side, hook: str, saes: SaeSet) -> Any:
        return _views({s: self.paired[side.key][s][hook] for s in SPLITS}, saes.of(side, 1)[hook], saes.of(side, 2)[hook])


def harvest(spec: TransferSpec, sides: tuple[Side, Side], pairing: Pairing) -> Harvest:
    """One pass per model and split over the windows holding the chosen pairs."""
    from xsae_cli.align.pairing import harvest_paired

    paired: dict[str, dict[str, dict[str, torch.Tensor]]] = {"a": {}, "b": {}}
    content: dict[str, dict[str, torch.Tensor]] = {}
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    with progress() as bar:
        for side in sides:
            splits = pairing.corpus.splits
            task = bar.add_task(f"harvesting {side.name}", total=sum(len(side.contexts(splits[s])) for s in SPLITS), unit="ctx")
            tokens, seconds = 0, 0.0
            for split in SPLITS:
                pos = pairing.chosen[split][:, [0, 1 if side.key == "a" else 2]]
                h = harvest_paired(
                    side.model,
                    side.tokenizer,
                    side.hook_list,
                    side.contexts(splits[split]),
                    pos,
                    keep_content=split == "train",
                    batch_contexts=spec.settings.batch_contexts,
                    model_name=side.name,
                    on_batch=lambda k, t=task: bar.advance(t, k),
                )
                paired[side.key][split] = h.paired
                if h.content is not None:
                    content[side.key] = h.content
                tokens += h.tokens
                seconds += h.seconds
            stats[side.name] = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_second": round(tokens / max(seconds, 1e-9), 1)}
    return Harvest(paired, content, stats, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------- SAEs


@dataclass
class SaeSet:
    """Two SAEs per side and hook: seed 1 (the one mapped) and seed 2 (the second-SAE reference)."""

    saes: dict[str, dict[int, dict[str, Any]]] = field(default_factory=lambda: {"a": {}, "b": {}})
    info: dict[str, Any] = field(default_factory=dict)  # "<model>/seed<n>" -> training figures, "reused" or "loaded_from"
    seconds: float = 0.0

    def of(self, side: Side, which: int) -> dict[str, Any]:
        return self.saes[side.key][which]


def load_given_saes(path: str, side: Side, device: Any) -> dict[str, Any]:
    """SAEs for a side's hooks from a folder (SAELens or sparsify layout, one SAE or a run folder of them)."""
    from xsae_cli.sae.formats import load_sae_dir

    found = load_sae_dir(path, device=device)
    hooks = side.hook_list
    out = {}
    for hook in hooks:
        layer = side.layer_of(hook)
        sae = found.get(hook)
        if sae is None:
            hits = [s for name, s in found.items() if (s.cfg.metadata or {}).get("hook_name") == hook or name.endswith(f".{layer}")]
            sae = hits[0] if len(hits) == 1 else (next(iter(found.values())) if len(found) == 1 and len(hooks) == 1 else None)
        if sae is None:
            raise XsaeError(f"{path} holds no SAE for {hook} of {side.name} (it holds: {', '.join(found)})", f"point at a folder with an SAE per paired layer, named {hook}")
        if sae.cfg.d_in != side.width:
            raise XsaeError(f"SAE in {path} has d_in={sae.cfg.d_in} but {hook} of {side.name} has width {side.width}", "use an SAE trained on that model and layer")
        out[hook] = sae.float().eval()
    return out


def train_side_saes(spec: TransferSpec, side: Side, rows: dict[str, torch.Tensor], folder: Path, seed: int, device: Any, fingerprint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One SAE per hook on ``rows`` through the SAE pipeline: (SAEs, training figures; None if reused).

    ``folder/train.json`` records what they were trained on; an interrupted training resumes from
    its checkpoints, and a folder trained on something else is started over.
    """
    import shutil
    from dataclasses import asdict

    from xsae_cli.core.io import atomic_write_json, read_json
    from xsae_cli.sae.formats import load_sae
    from xsae_cli.sae.pipeline import InMemoryActivations, hook_dirname, train_saes

    hooks = list(rows)
    sae = spec.sae
    settings = sae.replace(
        checkpoint_every=max(50, sae.tokens // sae.batch_size // 4),
        keep_checkpoints=1,
        dead_tokens_threshold=min(1_000_000, max(2 * sae.batch_size, sae.tokens // 4)),
    )
    want = _json({"settings": {**asdict(settings), "seed": seed}, "data": fingerprint, "hooks": hooks})
    marker = folder / "train.json"
    if marker.exists():
        if read_json(marker, "SAE training record") == want and all((folder / hook_dirname(h) / "cfg.json").exists() for h in hooks):
            info(f"reusing the SAEs of {side.name} (seed {seed}) in {folder}")
            return {h: load_sae(folder / hook_dirname(h), device=device) for h in hooks}, None
        if read_json(marker, "SAE training record") != want:
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, want)
    info(f"training SAEs on {side.name} (seed {seed}): {', '.join(hooks)}; {settings.tokens:,} tokens over {int(next(iter(rows.values())).shape[0]):,} train rows")
    s = spec.settings
    metadata = {h: {"model_name": side.name, "hook_name": h, "context_size": s.context_size, "dataset_path": s.corpus, "hook_site": "output", "prepend_bos": True} for h in hooks}
    trained = train_saes(InMemoryActivations(rows, settings.batch_size, seed), settings, folder, seed=seed, metadata=metadata, device=device)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    return trained.saes, {"tokens_per_second": trained.tokens_per_second, "seconds": trained.seconds, "tokens": trained.tokens}


def sae_seed(base: int, side: str, which: int) -> int:
    """The training seed of SAE ``which`` (1 or 2) of side ``side`` ("a" or "b"): four different seeds."""
    return base + (0 if which == 1 else 1000) + (0 if side == "a" else 1)


def train_all_saes(spec: TransferSpec, sides: tuple[Side, Side], data: Harvest, given: dict[str, dict[str, Any]], out: Path, device: Any) -> SaeSet:
    """Seeds 1 and 2 for every side (seed 1 from ``given`` where the user brought SAEs).

    Every SAE gets its own seed (:func:`sae_seed`), so a model paired with itself gets two
    different SAEs and the code-space rows measure something (with one seed they were one SAE, and
    every code row read exactly 1.000)."""
    s = spec.settings
    fingerprint = {"corpus": s.corpus, "limit": s.limit, "context_size": s.context_size, "val_fraction": s.val_fraction, "test_fraction": s.test_fraction, "seed": spec.seed}
    result = SaeSet()
    t0 = time.perf_counter()
    for side in sides:
        rows = {h: data.content[side.key][h] for h in side.hook_list}
        for which in (1, 2):
            seed = sae_seed(spec.seed, side.key, which)
            label = f"{side.name}/seed{which}"
            if which == 1 and side.key in given:
                result.saes[side.key][which] = given[side.key]
                result.info[label] = {"loaded_from": str(spec.sae_a if side.key == "a" else spec.sae_b)}
                continue
            got, figures = train_side_saes(
                spec, side, rows, out / "saes" / side.key / f"seed{which}", seed, device, {**fingerprint, "model": side.name, "rows": int(next(iter(rows.values())).shape[0])}
            )
            result.saes[side.key][which] = {h: m.float().eval() for h, m in got.items()}
            result.info[label] = _round(figures) if figures else {"reused": True}
    data.content.clear()  # the SAEs are trained: the train rows are no longer needed
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------------------- scoring


@dataclass
class Scores:
    """One entry per layer pair (mappings, similarity, latent matching, interventions) and the time spent."""

    results: list[dict[str, Any]]
    mapping_seconds: float = 0.0
    intervention_seconds: float = 0.0


def score_layers(spec: TransferSpec, A: Side, B: Side, layer_pairs: list[tuple[int, int]], pairing: Pairing, data: Harvest, saes: SaeSet) -> Scores:
    """Every layer pair: both directions x both spaces x every mapper (with references), similarity,
    latent matching, and interventions through the intervention mapper."""
    from xsae_cli.align.interventions import Readout, median_norm, pick_latents, transfer_latents

    s = spec.settings
    n_fits = len(layer_pairs) * len(DIRECTIONS) * len(SPACES) * len(s.mappers) * 3
    test = pairing.corpus.splits["test"]
    longest = torch.argsort(test.a.attention_mask.sum(1) + test.b.attention_mask.sum(1), descending=True)[: s.intervene_contexts]
    readouts: dict[str, Any] = {}
    out = Scores([])
    with progress() as bar:
        task = bar.add_task("fitting mappers", total=n_fits, unit="fit")
        itask = bar.add_task("interventions", total=len(layer_pairs) * 2 * s.intervene_latents, unit="latent") if s.intervene_latents else None
        for la, lb in layer_pairs:
            ha, hb = A.hooks[la], B.hooks[lb]
            tm = time.perf_counter()
            views = {A.key: data.views(A, ha, saes), B.key: data.views(B, hb, saes)}
            entry: dict[str, Any] = {
                "layer_a": la,
                "layer_b": lb,
                "hook_a": ha,
                "hook_b": hb,
                "saes": {
                    side.name: {f"seed{w}": _round(sae_health(saes.of(side, w)[h], views[side.key].acts["test"], getattr(views[side.key], f"codes{w}")["test"])) for w in (1, 2)}
                    for side, h in ((A, ha), (B, hb))
                },
                "directions": {},
            }
            maps: dict[str, dict[str, Any]] = {}
            for direction, (src, tgt) in zip(DIRECTIONS, ((A, B), (B, A))):
                maps[direction] = {}
                entry["directions"][direction] = score_direction(views[src.key], views[tgt.key], spec, lambda: bar.advance(task), maps[direction])
            entry["similarity"] = similarity(views["a"], views["b"], spec.seed)
            entry["latent_matching"] = latent_matching(views["a"], views["b"], s.match_threshold, spec.seed)
            out.mapping_seconds += time.perf_counter() - tm
            if s.intervene_latents:
                ti = time.perf_counter()
                entry["interventions"] = {}
                hooks = {A.key: ha, B.key: hb}
                for direction, (src, tgt) in zip(DIRECTIONS, ((A, B), (B, A))):
                    for side in (src, tgt):
                        if side.name not in readouts:
                            readouts[side.name] = Readout(side.model, side.tokenizer, side.contexts(test).select(longest), batch_contexts=4)
                    sv, tv = views[src.key], views[tgt.key]
                    codes = sv.codes1["test"]
                    latents = pick_latents(codes, s.intervene_latents)
                    freqs = (codes > 0).float().mean(0)
                    dirs = sv.sae1.W_dec.detach().float().cpu()[latents]
                    mapped = torch.stack([maps[direction][s.intervene_mapper].direction(d) for d in dirs]) if latents else torch.zeros((0, tv.acts["test"].shape[1]))
                    entry["interventions"][direction] = _round(
                        transfer_latents(
                            readouts[src.name],
                            readouts[tgt.name],
                            hooks[src.key],
                            hooks[tgt.key],
                            dirs,
                            mapped,
                            latents,
                            [float(freqs[i]) for i in latents],
                            strength=s.strength,
                            norm_source=median_norm(sv.acts["test"]),
                            norm_target=median_norm(tv.acts["test"]),
                            top=s.top_tokens,
                            seed=spec.seed,
                            on_step=(lambda: bar.advance(itask)) if itask is not None else None,
                        )
                    )
                    entry["interventions"][direction]["mapper"] = s.intervene_mapper
                out.intervention_seconds += time.perf_counter() - ti
            out.results.append(entry)
            del views
    return out


def _json(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=str))
