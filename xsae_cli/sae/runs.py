"""An SAE training run on a real model, end to end: load, harvest, train, evaluate, save.

What ``xsae sae train`` calls. Activations are harvested once into safetensors shards under
XSAE_CACHE (keyed by model weights, hooks, corpus and sizes), so further SAEs on the same layer
(another architecture, another k) train from disk without running the model again, and a resumed
run replays exactly the batches it would have seen.

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
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from xsae_cli.core.config import xsae_cache
from xsae_cli.core.console import info
from xsae_cli.core.errors import XsaeError
from xsae_cli.core.hardware import memory_report, package_versions, resolve_device, resolve_dtype, seed_everything
from xsae_cli.core.io import atomic_write_json, read_json

TOKEN_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*$")


def parse_tokens(text: str | int) -> int:
    """'2M' -> 2_000_000, '500k' -> 500_000, '1.5B' -> 1_500_000_000."""
    if isinstance(text, int):
        return text
    m = TOKEN_RE.match(str(text))
    if not m:
        raise XsaeError(f"bad token count '{text}'", "write e.g. 500k, 2M or 2000000")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def hook_dirname(hook: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", hook)


@dataclass
class RunSpec:
    """Where activations come from and where results go."""

    model: str
    hooks: list[str]
    out: Path
    corpus: str = "builtin"
    text_field: str = "text"
    context_size: int = 128
    pack: bool = True
    held_out_fraction: float = 0.05
    site: str = "output"
    drop_special: bool = True
    outlier_factor: float | None = None
    device: str = "auto"
    model_dtype: str = "float32"
    batch_contexts: int = 8
    eval_tokens: int = 32768
    eval_contexts: int = 16
    cache: bool = True
    force: bool = False
    trust_remote_code: bool = False
    device_map: str | None = None  # e.g. "auto": spread a model too large for one GPU over all visible GPUs
    extra: dict[str, Any] = field(default_factory=dict)


def _init_distributed(spec: RunSpec) -> tuple[int, int]:
    """Join the process group a launcher set up (gloo on CPU, nccl on CUDA); (0, 1) when alone."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from accelerate import PartialState

    from datetime import timedelta

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
    model, tokenizer = load_model(resolved, device=device, dtype=dtype, trust_remote_code=spec.trust_remote_code, device_map=spec.device_map)
    return model, tokenizer, device, _identity(spec, resolved)


def _contexts(spec: RunSpec, tokenizer: Any, seed: int) -> tuple[Any, Any]:
    from xsae_cli.data.corpus import load_contexts

    train, held = load_contexts(
        spec.corpus,
        tokenizer,
        spec.context_size,
        text_field=spec.text_field,
        pack=spec.pack,
        held_out_fraction=spec.held_out_fraction,
        seed=seed,
    )
    return train, held


def _harvest_key(spec: RunSpec, identity: str, tokens: int, seed: int) -> str:
    parts = [identity, ",".join(spec.hooks), spec.site, spec.corpus, spec.text_field, str(spec.context_size), str(spec.pack), str(spec.held_out_fraction), str(tokens), str(seed), str(spec.drop_special), str(spec.outlier_factor), spec.model_dtype]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def train_run(spec: RunSpec, settings: Any) -> dict[str, Any]:
    """Train one SAE per hook on ``spec.model`` and write the run folder; return its metrics."""
    from xsae_cli.data.activations import ActivationStore, ShardedActivations
    from xsae_cli.sae.formats import save_sae
    from xsae_cli.sae.train import SaeTrainer

    out = Path(spec.out)
    if (out / "metrics.json").exists() and not spec.force:
        raise XsaeError(f"{out} already holds a finished run", "pass --force to train it again, or choose another --out")
    if getattr(settings, "deepspeed_config", None):  # before any harvest: a bad config should cost nothing
        from xsae_cli.sae.zero import zero_config_for

        zero_config_for(settings.deepspeed_config, settings.optimizer)
    seed_everything(settings.seed)
    t0 = time.perf_counter()
    rank, world = _init_distributed(spec)
    if world > 1 and not spec.cache:
        raise XsaeError("multi-process training reads a cached harvest", "drop --no-cache when using --launcher")
    # In a launch only rank 0 runs the model (harvest, then evaluation); the other ranks read its
    # harvest, so a model that needs every GPU (--device-map auto) is loaded once, not once per rank.
    model = tokenizer = held_ctx = store = None
    d_in: dict[str, int] | None = None
    if rank == 0:
        model, tokenizer, device, identity = _load(spec)
        train_ctx, held_ctx = _contexts(spec, tokenizer, settings.seed)
        store = ActivationStore(
            model, tokenizer, spec.hooks, train_ctx, site=spec.site, batch_contexts=spec.batch_contexts,
            device="cpu", drop_special=spec.drop_special, outlier_factor=spec.outlier_factor, seed=settings.seed, model_name=spec.model,
        )
        d_in = store.d_in
        atomic_write_json(out / "run.json", {"spec": _jsonable(asdict(spec)), "settings": _jsonable(asdict(settings)), "versions": package_versions(), "d_in": d_in})
    else:
        device, identity = resolve_device(spec.device), _identity(spec)
    # Only now that the model has loaded (a bad model file is refused above): an old run is cleared
    # and the folder made, so a refused model leaves no folder behind and a --force run its old one.
    if out.exists() and spec.force:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "train_log.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {
        h: {"model_name": spec.model, "hook_name": h, "context_size": spec.context_size, "prepend_bos": True, "dataset_path": spec.corpus, "hook_site": spec.site}
        for h in spec.hooks
    }

    harvest_seconds = 0.0
    harvest_stats: dict[str, Any] = {}
    if spec.cache:
        cache_dir = xsae_cache() / "activations" / _harvest_key(spec, identity, settings.tokens, settings.seed)
        if not (cache_dir / "meta.json").exists() and rank == 0:
            h0 = time.perf_counter()
            store.save_shards(cache_dir, settings.tokens, force=True, corpus=spec.corpus)
            harvest_seconds = time.perf_counter() - h0
            harvest_stats = asdict(store.stats) if hasattr(store.stats, "__dataclass_fields__") else {}
        elif rank == 0:
            info(f"reusing the activation cache {cache_dir}")
        if world > 1:
            torch.distributed.barrier()  # rank 0 harvested; the others read the same shards
        shards = ShardedActivations(cache_dir)
        d_in = d_in or {h: shards.d_in[h] for h in spec.hooks}

        if len(shards) < settings.tokens and rank == 0:
            info(f"the corpus gave {len(shards):,} token activations: training makes {settings.tokens / len(shards):.1f} passes over them (reshuffled each pass)")

        def batches(skip_tokens: int) -> Iterator[dict[str, torch.Tensor]]:
            return _shard(_skip(_epochs(shards, settings.batch_size, settings.seed), skip_tokens), rank, world)
    else:
        def batches(skip_tokens: int) -> Iterator[dict[str, torch.Tensor]]:
            return _skip(store.batches(settings.batch_size, settings.tokens), skip_tokens)

    trainer = SaeTrainer(settings, d_in, out, metadata=metadata, device=device)
    trainer.fit(batches)
    saes = trainer.finalize()
    rank_memory = [memory_report(device)]
    if world > 1:  # every rank's peak: what ZeRO saves shows on the ranks that hold no model
        rank_memory = [None] * world
        torch.distributed.all_gather_object(rank_memory, memory_report(device))
        torch.distributed.barrier()
    if trainer.rank != 0:
        return {"rank": rank, "world_size": world, "steps": trainer.step, "tokens": trainer.tokens}
    for hook, sae in saes.items():
        sae.fold_normalization()
        save_sae(sae, out / hook_dirname(hook), format="saelens", force=True)

    metrics = evaluate_saes(model, tokenizer, spec, saes, held_ctx, device)
    metrics["training"] = {
        "tokens": trainer.tokens,
        "steps": trainer.step,
        "seconds": round(trainer.seconds, 2),
        "tokens_per_second": round(trainer.tokens_per_second, 1),
        "harvest_seconds": round(harvest_seconds, 2),
        "harvest": _jsonable(harvest_stats),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "memory": memory_report(device),
        "memory_per_rank": rank_memory,
    }
    metrics["training"]["world_size"] = world
    if trainer.zero_config is not None:
        from xsae_cli.sae.zero import zero_stage

        metrics["training"]["zero_stage"] = zero_stage(trainer.zero_config)
    metrics["model"] = spec.model
    metrics["settings"] = _jsonable(asdict(settings))
    metrics["versions"] = package_versions()
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _epochs(shards: Any, batch_tokens: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """The cached harvest over and over, reshuffled each pass; the trainer stops at its token budget."""
    epoch = 0
    while True:
        yield from shards.batches(batch_tokens, None, seed=seed + epoch)
        epoch += 1


def _shard(it: Iterator[dict[str, torch.Tensor]], rank: int, world: int) -> Iterator[dict[str, torch.Tensor]]:
    """Rank r takes batches r, r+world, ... of the global stream, in whole groups only.

    Every rank must run the same number of steps (each step all-reduces), so a trailing group
    smaller than ``world`` is dropped.
    """
    if world == 1:
        yield from it
        return
    group: list[dict[str, torch.Tensor]] = []
    for batch in it:
        group.append(batch)
        if len(group) == world:
            yield group[rank]
            group = []


def _skip(it: Iterator[dict[str, torch.Tensor]], tokens: int) -> Iterator[dict[str, torch.Tensor]]:
    """Drop the first ``tokens`` rows of a deterministic stream (a resumed run's past)."""
    skipped = 0
    for batch in it:
        n = int(next(iter(batch.values())).shape[0])
        if skipped + n <= tokens:
            skipped += n
            continue
        if skipped < tokens:
            cut = tokens - skipped
            batch = {h: t[cut:] for h, t in batch.items()}
            skipped = tokens
        yield batch


@torch.no_grad()
def evaluate_saes(model: Any, tokenizer: Any, spec: RunSpec, saes: dict[str, Any], held_ctx: Any, device: Any) -> dict[str, Any]:
    """Held-out reconstruction metrics per hook and, for LMs, CE loss recovered and KL."""
    from xsae_cli.data.activations import ActivationStore
    from xsae_cli.sae.evaluate import downstream_metrics
    from xsae_cli.sae.metrics import RunningStats

    if held_ctx is None or len(held_ctx) == 0:
        raise XsaeError("no held-out text to evaluate on", "use a larger corpus or a larger held-out fraction")
    store = ActivationStore(model, tokenizer, list(saes), held_ctx, site=spec.site, batch_contexts=spec.batch_contexts, device="cpu", drop_special=spec.drop_special, outlier_factor=spec.outlier_factor, shuffle=False, model_name=spec.model)
    stats = {h: RunningStats(sae.cfg.d_in, sae.cfg.d_sae) for h, sae in saes.items()}
    # Dense codes are [rows, d_sae]: keep a batch near 128M floats, so 262k-latent SAEs evaluate in ~1 GB.
    rows = max(64, min(4096, 2**27 // max(sae.cfg.d_sae for sae in saes.values())))
    for batch in store.batches(rows, spec.eval_tokens):
        for h, x in batch.items():
            sae = saes[h]
            x = x.to(next(sae.parameters()).device, torch.float32)
            codes = sae.encode(x)
            stats[h].update(x, sae.decode(codes), codes)
    results: dict[str, Any] = {"hooks": {}}
    n = min(spec.eval_contexts, len(held_ctx))
    for h, sae in saes.items():
        r = stats[h].compute()
        r["special_tokens_dropped"] = int(getattr(store.stats, "dropped_special", 0))
        down = downstream_metrics(model, h, sae, held_ctx.input_ids[:n], held_ctx.special_mask[:n], held_ctx.attention_mask[:n] if held_ctx.attention_mask is not None else None)
        r["downstream"] = down
        results["hooks"][h] = r
    return results


def load_run(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise XsaeError(f"{run_dir} is not an xsae SAE run (no run.json)", "point at the --out folder of `xsae sae train`")
    return read_json(run_dir / "run.json", "run description")


def evaluate_run(run_dir: str | Path, *, device: str = "auto", eval_tokens: int | None = None) -> dict[str, Any]:
    """Re-evaluate a finished run's SAEs on its held-out split."""
    from xsae_cli.sae.formats import load_sae

    run_dir = Path(run_dir)
    desc = load_run(run_dir)
    fields = {k: v for k, v in desc["spec"].items() if k in RunSpec.__dataclass_fields__}
    fields["out"] = run_dir
    fields["device"] = device
    if eval_tokens:
        fields["eval_tokens"] = eval_tokens
    spec = RunSpec(**fields)
    model, tokenizer, dev, _ = _load(spec)
    saes = {}
    for h in spec.hooks:
        folder = run_dir / hook_dirname(h)
        sae = load_sae(folder, device=dev)
        width = _width(model, h, spec, tokenizer)
        if sae.cfg.d_in != width:
            raise XsaeError(f"SAE {folder} has d_in={sae.cfg.d_in} but hook {h} of {spec.model} has width {width}", "evaluate it on the model and hook it was trained on")
        saes[h] = sae
    _, held = _contexts(spec, tokenizer, desc["settings"].get("seed", 0))
    return evaluate_saes(model, tokenizer, spec, saes, held, dev)


def _width(model: Any, hook: str, spec: RunSpec, tokenizer: Any = None) -> int:
    """The hooked tensor's width, from one tiny forward pass."""
    from xsae_cli.data.activations import ActivationStore
    from xsae_cli.data.corpus import tokenize_contexts

    ctx = tokenize_contexts(["width probe"], tokenizer, 8)
    return ActivationStore(model, tokenizer, [hook], ctx, site=spec.site, drop_special=False, shuffle=False).d_in[hook]


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
    fields = {k: v for k, v in desc["spec"].items() if k in RunSpec.__dataclass_fields__}
    fields.update(out=run_dir, device=device)
    spec = RunSpec(**fields)
    model, tokenizer, dev, _ = _load(spec)
    sae = load_sae(run_dir / hook_dirname(hook), device=dev)
    _, held = _contexts(spec, tokenizer, desc["settings"].get("seed", 0))
    if held is None:
        raise XsaeError("the run has no held-out text to look at", "train with a held-out fraction above 0")
    held = held.select(slice(0, n_contexts))
    summary = feature_summary(model, tokenizer, sae, hook, held, site=spec.site, top_n=top_n)
    summary.update(model=spec.model, run=str(run_dir), corpus=spec.corpus, versions=package_versions())
    atomic_write_json(target, summary)
    return target, summary
