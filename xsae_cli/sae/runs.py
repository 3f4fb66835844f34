"""An SAE training run on a real model, end to end: load, harvest, train, evaluate, save.

What ``xsae sae train`` calls. Activations are harvested once into safetensors shards under
XSAE_CACHE (keyed by model weights, hooks, corpus and sizes), so further SAEs on the same layer
(another architecture, another k) train from disk without running the model again, and a resumed
run replays exactly the batches it would have seen. Under a launcher (or with ``--no-cache``) every rank
instead streams its own shard of the documents through its own copy of the model
(:mod:`xsae_cli.sae.streaming`) and no activation file is written.

Run folder::

    run.json                     what was asked (model, hooks, settings, versions)
    <hook>/cfg.json              SAELens layout, one folder per hook
    <hook>/sae_weights.safetensors
    checkpoints/step_N/          resume points (safetensors + JSON)
    train_log.jsonl              loss, FVU, L0, dead %, lr, tokens/s every few steps
    metrics.json                 held-out reconstruction and downstream metrics
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from xsae_cli.core.config import xsae_cache
from xsae_cli.core.console import info
from xsae_cli.core.errors import XsaeError
from xsae_cli.core.hardware import memory_report, package_versions, resolve_device, resolve_dtype, seed_everything
from xsae_cli.core.io import atomic_write_json, read_json
from xsae_cli.sae.pipeline import ActivationSource, CachedActivations, hook_dirname, train_saes
from xsae_cli.sae.settings import SaeRunSettings, parse_tokens

__all__ = ["RunSpec", "evaluate_run", "features_run", "hook_dirname", "parse_tokens", "settings_from_run", "train_run"]


@dataclass
class RunSpec:
    """One ``xsae sae train`` run: what is hooked where, how (``settings``: the [sae] section) and on what hardware."""

    model: str
    hooks: list[str]
    out: Path
    settings: SaeRunSettings = field(default_factory=SaeRunSettings)
    device: str = "auto"
    model_dtype: str = "float32"
    seed: int = 0
    deepspeed_config: str | None = None
    trust_remote_code: bool = False
    force: bool = False


def settings_from_run(desc: dict[str, Any]) -> SaeRunSettings:
    """The settings a run was trained with, from its run.json (older files: spec and settings split)."""
    known = {f.name for f in fields(SaeRunSettings)}
    merged = {**desc.get("spec", {}), **desc.get("settings", {})}
    values: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) and k == "betas" else v) for k, v in merged.items() if k in known}
    if values.get("lr") == 0.0:  # older runs wrote 0 for "the optimizer's default"
        values["lr"] = None
    return SaeRunSettings(**values)


def _init_distributed(spec: RunSpec) -> tuple[int, int]:
    """Join the process group a launcher set up (gloo on CPU, nccl on CUDA); (0, 1) when alone."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from datetime import timedelta

    from accelerate import PartialState

    # Rank 0 harvests while the others wait at a barrier: allow hours, not the default 30 minutes.
    state = PartialState(cpu=resolve_device(spec.device).type == "cpu", timeout=timedelta(hours=12))
    return state.process_index, state.num_processes


def _identity(spec: RunSpec, resolved: Any = None) -> str:
    """What names the model's weights in the harvest cache key, without loading them."""
    from xsae_cli.zoo.registry import Registry, resolve_entry

    entry = Registry().find(spec.model.lower())
    if entry and entry.sha256:
        return entry.sha256
    return str((resolved or resolve_entry(spec.model)).path)


def _load(spec: RunSpec) -> tuple[Any, Any, Any, str]:
    from xsae_cli.zoo.registry import resolve_entry
    from xsae_cli.zoo.sources import load_model

    resolved = resolve_entry(spec.model)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.model_dtype, device)
    model, tokenizer = load_model(resolved, device=device, dtype=dtype, trust_remote_code=spec.trust_remote_code, device_map=spec.settings.device_map)
    return model, tokenizer, device, _identity(spec, resolved)


def _cache_dtype(spec: RunSpec, model: Any) -> torch.dtype:
    """The dtype a cached harvest is stored in (--cache-dtype; 'auto': the model's)."""
    from xsae_cli.sae.budget import cache_dtype_for

    if model is not None:
        dtype = next(model.parameters()).dtype
    else:  # ranks that read rank 0's cache: the same resolution, without the model
        dtype = resolve_dtype(spec.model_dtype, resolve_device(spec.device))
    return cache_dtype_for(spec.settings.cache_dtype, dtype)


def _train_documents(spec: RunSpec) -> int:
    """How many training documents the corpus gives (after the held-out split), without a model."""
    from xsae_cli.data.corpus import load_texts, split_documents

    s = spec.settings
    train, _ = split_documents(load_texts(s.corpus, text_field=s.text_field), s.held_out_fraction, spec.seed)
    return len(train)


def _contexts(spec: RunSpec, tokenizer: Any, seed: int, shard: tuple[int, int] | None = None) -> tuple[Any, Any]:
    """(train, held-out) contexts; with ``shard``, the train contexts of those training documents only."""
    from xsae_cli.data.corpus import load_contexts, load_texts, render_texts, split_documents, tokenize_contexts

    s = spec.settings
    if shard is not None:
        texts = render_texts(load_texts(s.corpus, text_field=s.text_field), tokenizer)
        train_docs, held_docs = split_documents(texts, s.held_out_fraction, seed)
        train = tokenize_contexts(train_docs[shard[0] : shard[1]], tokenizer, s.context_size, pack=s.pack)
        held = tokenize_contexts(held_docs, tokenizer, s.context_size, pack=s.pack) if held_docs else None
        for c in (train, held):
            if c is not None:
                c.meta["corpus"] = s.corpus
        return train, held
    train, held = load_contexts(
        s.corpus,
        tokenizer,
        s.context_size,
        text_field=s.text_field,
        pack=s.pack,
        held_out_fraction=s.held_out_fraction,
        seed=seed,
    )
    return train, held


def _harvest_key(spec: RunSpec, identity: str, tokens: int, seed: int, cache_dtype: str = "float32") -> str:
    s = spec.settings
    parts = [
        identity,
        ",".join(spec.hooks),
        s.site,
        s.corpus,
        s.text_field,
        str(s.context_size),
        str(s.pack),
        str(s.held_out_fraction),
        str(tokens),
        str(seed),
        str(s.drop_special),
        str(s.outlier_factor),
        spec.model_dtype,
    ]
    if cache_dtype not in ("float32", "torch.float32"):  # float32 caches keep the keys they always had
        parts.append(str(cache_dtype).replace("torch.", ""))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def train_run(spec: RunSpec) -> dict[str, Any]:
    """Train one SAE per hook on ``spec.model`` and write the run folder; return its metrics.

    The folder is held (:func:`xsae_cli.core.runlock.owned`) for the whole run: a second writer is refused."""
    from xsae_cli.core.runlock import owned

    with owned(spec.out):
        return _train_run(spec)


def _train_run(spec: RunSpec) -> dict[str, Any]:
    from xsae_cli.data.activations import ActivationStore, ShardedActivations
    from xsae_cli.sae.train import sae_config_for

    out = Path(spec.out)
    if (out / "metrics.json").exists() and not spec.force:
        raise XsaeError(f"{out} already holds a finished run", "pass --force to train it again, or choose another --out")
    settings = spec.settings
    if not spec.force:  # a resume with other settings is refused before any model load or harvest
        from xsae_cli.core.io import Checkpoints
        from xsae_cli.core.settings import refuse_changed_resume, resume_changes

        saved = Checkpoints(out).latest_meta()
        if saved is not None:
            refused, _grown = resume_changes(saved.get("settings") or {}, settings)
            if sorted(saved.get("hooks") or []) != sorted(spec.hooks):
                refused.insert(0, f"--hook {','.join(saved.get('hooks') or [])} -> {','.join(spec.hooks)}")
            refuse_changed_resume(out, refused, ["--tokens"])
    if spec.deepspeed_config:  # before any harvest: a bad config should cost nothing
        from xsae_cli.sae.zero import zero_config_for

        zero_config_for(spec.deepspeed_config, settings.optimizer)
    seed_everything(spec.seed)
    t0 = time.perf_counter()
    rank, world = _init_distributed(spec)
    # Under a launcher every rank streams its own shard of the corpus (sae/streaming.py) unless a
    # cache is asked for; alone, the harvest is cached unless --no-cache.
    # A model spread over every GPU by --device-map is loaded once, on rank 0, so it harvests to a cache.
    streaming = settings.cache is False or (settings.cache is None and world > 1 and settings.device_map is None)
    if streaming and world > 1 and settings.device_map is not None:
        raise XsaeError("--device-map spreads one copy of the model over all GPUs, so its launch cannot stream on every rank", "drop --no-cache, or drop --device-map")
    shard: tuple[int, int] = (0, 0)
    if streaming:  # a launch some rank of which would read nothing is refused before any model loads
        from xsae_cli.sae.streaming import check_shards, shard_range

        n_docs = _train_documents(spec)
        try:
            check_shards(n_docs, world)
        except XsaeError:
            if rank == 0:
                raise
            raise SystemExit(2) from None  # said once, by rank 0
        shard = shard_range(n_docs, rank, world)
    # In a cached launch only rank 0 runs the model (harvest, then evaluation); the other ranks read
    # its harvest, so a model that needs every GPU (--device-map auto) is loaded once, not once per rank.
    model = tokenizer = held_ctx = store = None
    train_ctx = None
    d_in: dict[str, int] | None = None
    if rank == 0 or streaming:
        model, tokenizer, device, identity = _load(spec)
        train_ctx, held_ctx = _contexts(spec, tokenizer, spec.seed, shard if streaming else None)
        store = ActivationStore(
            model,
            tokenizer,
            spec.hooks,
            train_ctx,
            site=settings.site,
            batch_contexts=settings.batch_contexts,
            device=device if streaming else "cpu",
            drop_special=settings.drop_special,
            outlier_factor=settings.outlier_factor,
            seed=spec.seed,
            model_name=spec.model,
        )
        d_in = store.d_in
        for width in d_in.values():  # each hook's SAE config (k, architecture options) checked before the harvest
            sae_config_for(settings, width, {})
        if rank == 0:
            atomic_write_json(
                out / "run.json", {"spec": _jsonable({k: v for k, v in asdict(spec).items() if k != "settings"}), "settings": _jsonable(asdict(settings)), "versions": package_versions(), "d_in": d_in}
            )
    else:
        device, identity = resolve_device(spec.device), _identity(spec)
    # Only now that the model has loaded (a bad model file is refused above): an old run is cleared
    # and the folder made, so a refused model leaves no folder behind and a --force run its old one.
    if out.exists() and spec.force:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "train_log.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    # cfg.json's hook_name is the module path the hook resolved to ("15" -> "model.layers.15"), so a
    # SAELens user can hook the same place from the file.
    modules = store.modules if store is not None else {h: h for h in spec.hooks}
    metadata = {
        h: {"model_name": spec.model, "hook_name": modules[h], "context_size": settings.context_size, "prepend_bos": True, "dataset_path": settings.corpus, "hook_site": settings.site}
        for h in spec.hooks
    }

    harvest_seconds = 0.0
    harvest_stats: dict[str, Any] = {}
    source: ActivationSource
    stream_report: Any = None  # a streaming source's per-rank harvest report
    if not streaming:
        cache_dtype = _cache_dtype(spec, model)
        if world > 1:  # rank 0 holds the model: its dtype names the cache every rank reads
            name = [str(cache_dtype).replace("torch.", "")]
            torch.distributed.broadcast_object_list(name, src=0)
            cache_dtype = getattr(torch, name[0])
        cache_dir = xsae_cache() / "activations" / _harvest_key(spec, identity, settings.tokens, spec.seed, str(cache_dtype))
        if not (cache_dir / "meta.json").exists() and rank == 0:
            from xsae_cli.sae.budget import cache_bytes, check_free_space, human_bytes

            assert store is not None and train_ctx is not None, "rank 0 loaded the model above"

            rows = min(settings.tokens, train_ctx.n_content_tokens if settings.drop_special else train_ctx.n_tokens)
            needed = cache_bytes(rows, d_in or {}, cache_dtype)
            free = check_free_space(cache_dir, needed)
            item = torch.empty((), dtype=cache_dtype).element_size()
            info(f"the harvest cache needs {human_bytes(needed)} ({rows:,} tokens x {sum((d_in or {}).values())} x {item} bytes, {str(cache_dtype).replace('torch.', '')}); {human_bytes(free)} free")
            store.dtype = cache_dtype
            h0 = time.perf_counter()
            store.save_shards(cache_dir, settings.tokens, force=True, corpus=settings.corpus)
            harvest_seconds = time.perf_counter() - h0
            harvest_stats = asdict(store.stats) if hasattr(store.stats, "__dataclass_fields__") else {}
        elif rank == 0:
            info(f"reusing the activation cache {cache_dir}")
        if world > 1:
            torch.distributed.barrier()  # rank 0 harvested; the others read the same shards
        shards = ShardedActivations(cache_dir)
        if len(shards) < settings.tokens and rank == 0:
            info(f"the corpus gave {len(shards):,} token activations: training makes {settings.tokens / len(shards):.1f} passes over them (reshuffled each pass)")
        source = CachedActivations(shards, settings.batch_size, seed=spec.seed, rank=rank, world=world)
    else:
        from xsae_cli.sae.streaming import StreamingActivations

        assert model is not None and train_ctx is not None, "every streaming rank loaded the model above"

        def store_for(seed: int, ctx: Any = train_ctx) -> Any:
            return ActivationStore(
                model,
                tokenizer,
                spec.hooks,
                ctx,
                site=settings.site,
                batch_contexts=settings.batch_contexts,
                device=device,
                drop_special=settings.drop_special,
                outlier_factor=settings.outlier_factor,
                seed=seed,
                model_name=spec.model,
                shuffle_buffer_tokens=buffer,
            )

        # Per-rank shuffle buffer, on the training device: 65,536 rows, or this rank's budget if smaller.
        buffer = min(65536, max(settings.batch_size, -(-settings.tokens // world)))
        streaming_source = StreamingActivations(list(spec.hooks), dict(d_in or {}), store_for, settings.batch_size, seed=spec.seed, rank=rank, world=world, documents=shard, contexts=len(train_ctx))
        source, stream_report = streaming_source, streaming_source.report

    trained = train_saes(source, settings, out, seed=spec.seed, metadata=metadata, device=device, deepspeed_config=spec.deepspeed_config)
    saes = trained.saes
    rank_memory: list[dict[str, Any] | None] = [memory_report(device)]
    if world > 1:  # every rank's peak: what ZeRO saves shows on the ranks that hold no model
        rank_memory = [None] * world
        torch.distributed.all_gather_object(rank_memory, memory_report(device))
        torch.distributed.barrier()
    per_rank = None
    if streaming:
        from xsae_cli.sae.streaming import gather

        per_rank = gather(stream_report(), world)
        harvest_seconds = max(r["seconds"] for r in per_rank)
    if trained.rank != 0:
        return {"rank": rank, "world_size": world, "steps": trained.steps, "tokens": trained.tokens}

    metrics = evaluate_saes(model, tokenizer, spec, saes, held_ctx, device)
    metrics["training"] = {
        **trained.figures(),
        "harvest_seconds": round(harvest_seconds, 2),
        "harvest": _jsonable(harvest_stats),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "memory": memory_report(device),
        "memory_per_rank": rank_memory,
    }
    metrics["training"]["world_size"] = world
    metrics["training"]["harvest_mode"] = "streaming" if streaming else "cached"
    if not streaming:
        from xsae_cli.sae.budget import cache_bytes

        metrics["training"]["cache"] = {
            "dtype": str(cache_dtype).replace("torch.", ""),
            "tokens": len(shards),
            "bytes_formula": cache_bytes(len(shards), shards.d_in, cache_dtype),
            "bytes_on_disk": sum(f.stat().st_size for f in cache_dir.glob("shard_*.safetensors")),
        }
    if per_rank is not None:
        metrics["harvest_per_rank"] = per_rank
    metrics["model"] = spec.model
    metrics["settings"] = _jsonable(asdict(settings))
    metrics["versions"] = package_versions()
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


@torch.no_grad()
def evaluate_saes(model: Any, tokenizer: Any, spec: RunSpec, saes: dict[str, Any], held_ctx: Any, device: Any) -> dict[str, Any]:
    """Held-out reconstruction metrics per hook and, for LMs, CE loss recovered and KL."""
    from xsae_cli.core.console import status
    from xsae_cli.data.activations import ActivationStore
    from xsae_cli.sae.evaluate import downstream_metrics
    from xsae_cli.sae.metrics import RunningStats

    if held_ctx is None or len(held_ctx) == 0:
        raise XsaeError("no held-out text to evaluate on", "use a larger corpus or a larger held-out fraction")
    s = spec.settings
    store = ActivationStore(
        model,
        tokenizer,
        list(saes),
        held_ctx,
        site=s.site,
        batch_contexts=s.batch_contexts,
        device="cpu",
        drop_special=s.drop_special,
        outlier_factor=s.outlier_factor,
        shuffle=False,
        model_name=spec.model,
    )
    stats = {h: RunningStats(sae.cfg.d_in, sae.cfg.d_sae) for h, sae in saes.items()}
    # Dense codes are [rows, d_sae]: keep a batch near 128M floats, so 262k-latent SAEs evaluate in ~1 GB.
    rows = max(64, min(4096, 2**27 // max(sae.cfg.d_sae for sae in saes.values())))
    for batch in store.batches(rows, s.eval_tokens, show_progress=True):
        for h, x in batch.items():
            sae = saes[h]
            x = x.to(next(sae.parameters()).device, torch.float32)
            codes = sae.encode(x)
            stats[h].update(x, sae.decode(codes), codes)
    results: dict[str, Any] = {"hooks": {}}
    n = min(s.eval_contexts, len(held_ctx))
    for h, sae in saes.items():
        r = stats[h].compute()
        r["special_tokens_dropped"] = int(getattr(store.stats, "dropped_special", 0))
        with status(f"CE loss recovered and KL for {h} on {n} held-out contexts"):
            down = downstream_metrics(model, h, sae, held_ctx.input_ids[:n], held_ctx.special_mask[:n], held_ctx.attention_mask[:n] if held_ctx.attention_mask is not None else None, site=s.site)
        r["downstream"] = down
        results["hooks"][h] = r
    return results


def load_run(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise XsaeError(f"{run_dir} is not an xsae SAE run (no run.json)", "point at the --out folder of `xsae sae train`")
    return read_json(run_dir / "run.json", "run description")


def spec_from_run(run_dir: Path, desc: dict[str, Any], device: str, **changes: Any) -> RunSpec:
    """The RunSpec a run folder was trained with (``changes``: settings to evaluate differently)."""
    settings = settings_from_run(desc)
    if changes:
        settings = settings.replace(**changes)
    spec = desc.get("spec", {})
    seed = spec.get("seed", desc.get("settings", {}).get("seed", 0))
    return RunSpec(
        model=spec["model"],
        hooks=list(spec["hooks"]),
        out=run_dir,
        settings=settings,
        device=device,
        model_dtype=spec.get("model_dtype", "float32"),
        seed=int(seed),
        trust_remote_code=bool(spec.get("trust_remote_code", False)),
    )


def evaluate_run(run_dir: str | Path, *, device: str = "auto", eval_tokens: int | None = None) -> dict[str, Any]:
    """Re-evaluate a finished run's SAEs on its held-out split."""
    from xsae_cli.sae.formats import load_sae

    run_dir = Path(run_dir)
    desc = load_run(run_dir)
    spec = spec_from_run(run_dir, desc, device, **({"eval_tokens": eval_tokens} if eval_tokens else {}))
    model, tokenizer, dev, _ = _load(spec)
    saes = {}
    for h in spec.hooks:
        folder = run_dir / hook_dirname(h)
        sae = load_sae(folder, device=dev)
        width = _width(model, h, spec, tokenizer)
        if sae.cfg.d_in != width:
            raise XsaeError(f"SAE {folder} has d_in={sae.cfg.d_in} but hook {h} of {spec.model} has width {width}", "evaluate it on the model and hook it was trained on")
        saes[h] = sae
    _, held = _contexts(spec, tokenizer, spec.seed)
    return evaluate_saes(model, tokenizer, spec, saes, held, dev)


def _width(model: Any, hook: str, spec: RunSpec, tokenizer: Any = None) -> int:
    """The hooked tensor's width, from one tiny forward pass."""
    from xsae_cli.data.activations import ActivationStore
    from xsae_cli.data.corpus import tokenize_contexts

    ctx = tokenize_contexts(["width probe"], tokenizer, 8)
    return ActivationStore(model, tokenizer, [hook], ctx, site=spec.settings.site, drop_special=False, shuffle=False).d_in[hook]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def features_run(
    run_dir: str | Path,
    *,
    hook: str | None = None,
    output: str | Path | None = None,
    n_contexts: int = 128,
    top_n: int = 8,
    device: str = "auto",
    force: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Write ``features.json`` (top contexts, histograms, logit lens per latent) for one hook of a run."""
    from xsae_cli.core.io import refuse_overwrite
    from xsae_cli.sae.features import feature_summary
    from xsae_cli.sae.formats import load_sae

    run_dir = Path(run_dir)
    desc = load_run(run_dir)
    hooks = desc["spec"]["hooks"]
    if hook is None:
        if len(hooks) > 1:
            raise XsaeError(f"{run_dir} holds SAEs for several hooks: {', '.join(hooks)}", "pick one with --hook")
        hook = hooks[0]
    if hook not in hooks:
        raise XsaeError(f"{run_dir} has no SAE for hook {hook}", f"it holds: {', '.join(hooks)}")
    target = Path(output) if output else run_dir / hook_dirname(hook) / "features.json"
    refuse_overwrite(target, force)
    spec = spec_from_run(run_dir, desc, device)
    model, tokenizer, dev, _ = _load(spec)
    sae = load_sae(run_dir / hook_dirname(hook), device=dev)
    _, held = _contexts(spec, tokenizer, spec.seed)
    if held is None:
        raise XsaeError("the run has no held-out text to look at", "train with a held-out fraction above 0")
    held = held.select(slice(0, n_contexts))
    summary = feature_summary(model, tokenizer, sae, hook, held, site=spec.settings.site, top_n=top_n)
    summary.update(model=spec.model, run=str(run_dir), corpus=spec.settings.corpus, versions=package_versions())
    atomic_write_json(target, summary)
    return target, summary
