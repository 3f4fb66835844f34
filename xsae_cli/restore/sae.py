"""SAEs on the restoration model's residual stream, memory-lean, through the sae engine.

The default route hooks the output of block ``layer`` (``layers.N``, i.e. TransformerLens's
``blocks.N.hook_resid_post``) directly on the original model with a forward hook that stops the
forward pass there: later blocks never run and nothing but that one tensor is kept. Samples are
streamed through the model and into :class:`xsae_cli.sae.train.SaeTrainer` a few at a time, epoch
after epoch, so memory holds one batch of activations and a small shuffle buffer, never a cache.

``via="transformer-lens"`` does the same through ``HookedTransformer.run_with_cache`` on the
converted model, the usual TransformerLens route: it caches every hook point of every layer
(attention patterns included) for each batch. It is here for comparison
(benchmarks/restore_memory.py measures both).

Run folder::

    run.json                               what was asked, with versions
    blocks.N.hook_resid_post/cfg.json      SAELens layout
    blocks.N.hook_resid_post/sae_weights.safetensors
    blocks.N.hook_resid_post/features.json top characters and contexts per latent
    checkpoints/  train_log.jsonl          resume points, training log
    metrics.json                           reconstruction on the samples, memory, timings
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xsae_cli.core.console import info, progress, warn
from xsae_cli.core.errors import XsaeError

VIAS = ("direct", "transformer-lens")


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


@dataclass
class RestoreSaeSpec:
    model: str
    layer: int
    out: Path
    corpus: list[str] | None = None  # None: the corpus the model was trained on, else builtin
    max_samples: int = 200
    epochs: int = 50
    seq_len: int | None = None  # None: the model's training windows (else max_position)
    batch_samples: int = 4  # samples per forward pass
    via: str = "direct"
    device: str = "auto"
    vocab: str | None = None
    force: bool = False
    top_n: int = 8
    summary_samples: int = 64
    extra: dict[str, Any] = field(default_factory=dict)


class _Stop(Exception):
    """Raised by the capture hook: the forward pass has produced everything needed."""


class DirectCapture:
    """Output of ``model.layers[layer]`` via a forward hook that stops the forward right there."""

    def __init__(self, model: Any, layer: int) -> None:
        self.model = model
        self.layer = layer

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        store: list[torch.Tensor] = []

        def hook(module: Any, args: Any, output: torch.Tensor) -> None:
            store.append(output)
            raise _Stop

        handle = self.model.layers[self.layer].register_forward_hook(hook)
        try:
            self.model(ids, attn)
        except _Stop:
            pass
        finally:
            handle.remove()
        return store[0]


class TransformerLensCapture:
    """``run_with_cache`` on the converted HookedTransformer (caches every hook point)."""

    def __init__(self, model: Any, layer: int, device: Any) -> None:
        from xsae_cli.restore.convert import to_hooked_transformer

        self.tl = to_hooked_transformer(model, device)
        self.layer = layer

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        from xsae_cli.restore.convert import padding_hooks

        with self.tl.hooks(fwd_hooks=padding_hooks(attn, self.tl.cfg.n_layers)):
            _, cache = self.tl.run_with_cache(ids)
        return cache[hook_name(self.layer)]


def make_capture(model: Any, layer: int, via: str, device: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if via not in VIAS:
        raise XsaeError(f"unknown --via '{via}'", f"use one of {', '.join(VIAS)}")
    n = model.config.n_layers
    if not 0 <= layer < n:
        raise XsaeError(f"--layer {layer} does not exist: the model has {n} blocks", f"use 0..{n - 1}")
    return DirectCapture(model, layer) if via == "direct" else TransformerLensCapture(model, layer, device)


def samples(loaded: Any, spec: RestoreSaeSpec, seed: int) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """Up to ``max_samples`` windows of the corpus (a seeded choice): ids, attention mask, corpus, seq_len."""
    from xsae_cli.restore.data import Encoded, load_docs, tile_windows, warn_unknown

    if spec.max_samples < 1 or spec.epochs < 1 or spec.batch_samples < 1:
        raise XsaeError("--max-samples, --epochs and --batch-samples must be at least 1", "fix the flag")
    trained = loaded.meta.get("settings", {})
    corpus = spec.corpus or trained.get("corpus") or ["builtin"]
    cfg = loaded.model.config
    seq_len = spec.seq_len or trained.get("seq_len") or cfg.max_position
    if seq_len > cfg.max_position:
        raise XsaeError(f"--seq-len {seq_len} exceeds the model's max_position {cfg.max_position}", f"use at most {cfg.max_position}")
    docs = load_docs(corpus)
    enc, unknown = Encoded.from_docs(docs, loaded.vocab)
    warn_unknown(unknown, warn, "the corpus")
    ids, attn, _ = tile_windows(enc, seq_len, loaded.vocab.pad_id)
    pick = np.random.default_rng(seed).permutation(len(ids))[: spec.max_samples]
    pick.sort()
    return ids[pick], attn[pick], list(corpus), seq_len


def activation_stream(
    capture: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ids: np.ndarray,
    attn: np.ndarray,
    *,
    epochs: int,
    batch_samples: int,
    batch_tokens: int,
    seed: int,
    device: Any,
    hook: str,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``batch_tokens`` activation rows, streamed sample batch by sample batch.

    Rows pass through a shuffle buffer of about two batches, so a batch mixes several samples;
    everything is seeded, so the stream repeats exactly (a resumed run skips what it has seen).
    """
    g = torch.Generator().manual_seed(seed)
    buf: list[torch.Tensor] = []
    held = 0
    n = ids.shape[0]
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1000 + epoch)).numpy()
        for i in range(0, n, batch_samples):
            idx = np.sort(order[i:i + batch_samples])
            x = torch.from_numpy(ids[idx]).to(device)
            a = torch.from_numpy(attn[idx]).to(device)
            acts = capture(x, a)
            rows = acts[a.bool()].float().cpu()
            del acts
            buf.append(rows)
            held += rows.shape[0]
            while held >= 2 * batch_tokens:
                pool = torch.cat(buf)
                pool = pool[torch.randperm(pool.shape[0], generator=g)]
                yield {hook: pool[:batch_tokens]}
                buf, held = [pool[batch_tokens:]], pool.shape[0] - batch_tokens
    if held:
        pool = torch.cat(buf)
        pool = pool[torch.randperm(pool.shape[0], generator=g)]
        for s in range(0, pool.shape[0], batch_tokens):
            yield {hook: pool[s:s + batch_tokens]}


def train_restore_sae(spec: RestoreSaeSpec, settings: Any) -> dict[str, Any]:
    """Train an SAE on ``blocks.<layer>.hook_resid_post``; write SAELens files, features and metrics."""
    from xsae_cli.core.hardware import (
        memory_report,
        package_versions,
        peak_rss_bytes,
        resolve_device,
        seed_everything,
    )
    from xsae_cli.core.io import atomic_write_json
    from xsae_cli.restore.model import load_restoration
    from xsae_cli.sae.formats import save_sae
    from xsae_cli.sae.runs import _skip, hook_dirname
    from xsae_cli.sae.train import SaeTrainer

    out = Path(spec.out)
    if (out / "metrics.json").exists() and not spec.force:
        raise XsaeError(f"{out} already holds a finished SAE run", "pass --force to train it again, or choose another --out")
    device = resolve_device(spec.device)
    if spec.force and out.exists():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "train_log.jsonl").unlink(missing_ok=True)
    seed_everything(settings.seed)
    t0 = time.perf_counter()
    loaded = load_restoration(spec.model, vocab=spec.vocab, device=device)
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    capture = make_capture(model, spec.layer, spec.via, device)
    ids, attn, corpus, seq_len = samples(loaded, spec, settings.seed)
    n_tokens = int(attn.sum())
    hook = hook_name(spec.layer)
    settings.tokens = n_tokens * spec.epochs
    out.mkdir(parents=True, exist_ok=True)
    d_in = model.config.d_model
    metadata = {hook: {"model_name": str(spec.model), "hook_name": hook, "hook_module": f"layers.{spec.layer}", "hook_layer": spec.layer, "context_size": seq_len, "prepend_bos": False, "dataset_path": ",".join(corpus), "model_class": "RestorationModel"}}
    atomic_write_json(out / "run.json", {"spec": _jsonable(asdict(spec)), "settings": _jsonable(asdict(settings)), "samples": int(ids.shape[0]), "sample_tokens": n_tokens, "seq_len": seq_len, "corpus": corpus, "versions": package_versions()})
    info(f"{ids.shape[0]} samples ({n_tokens:,} characters) x {spec.epochs} epochs through block {spec.layer} of {model.config.n_layers} ({spec.via})")

    def batches(skip_tokens: int) -> Iterator[dict[str, torch.Tensor]]:
        stream = activation_stream(capture, ids, attn, epochs=spec.epochs, batch_samples=spec.batch_samples, batch_tokens=settings.batch_size, seed=settings.seed, device=device, hook=hook)
        return _skip(stream, skip_tokens)

    trainer = SaeTrainer(settings, {hook: d_in}, out, metadata=metadata, device=device)
    trainer.fit(batches)
    sae = trainer.finalize()[hook]
    sae.fold_normalization()
    folder = out / hook_dirname(hook)
    save_sae(sae, folder, format="saelens", force=True)
    summary = feature_summary(capture, sae, loaded.vocab, ids, attn, spec, device)
    summary.update(model=str(spec.model), layer=spec.layer, hook=hook, via=spec.via, corpus=corpus, versions=package_versions())
    atomic_write_json(folder / "features.json", summary)
    metrics = {
        "hook": hook,
        "layer": spec.layer,
        "via": spec.via,
        "sae": str(folder),
        "reconstruction": summary.pop("reconstruction"),
        "training": {"tokens": trainer.tokens, "steps": trainer.step, "seconds": round(trainer.seconds, 2), "tokens_per_second": round(trainer.tokens_per_second, 1), "total_seconds": round(time.perf_counter() - t0, 2)},
        "samples": int(ids.shape[0]),
        "sample_tokens": n_tokens,
        "epochs": spec.epochs,
        "memory": {**memory_report(device), "peak_rss_bytes": peak_rss_bytes()},
        "settings": _jsonable(asdict(settings)),
        "versions": package_versions(),
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


@torch.inference_mode()
def feature_summary(capture: Any, sae: Any, vocab: Any, ids: np.ndarray, attn: np.ndarray, spec: RestoreSaeSpec, device: Any, window: int = 12) -> dict[str, Any]:
    """Per latent: firing frequency, the characters it fires on, and its top contexts in the samples."""
    from xsae_cli.sae.metrics import RunningStats

    n = min(spec.summary_samples, ids.shape[0])
    d_sae = sae.cfg.d_sae
    seq = ids.shape[1]
    chars = np.unique(ids[:n][attn[:n] > 0])
    col = {int(c): j for j, c in enumerate(chars)}
    char_act = torch.zeros(d_sae, len(chars), dtype=torch.float64)
    fires = torch.zeros(d_sae, dtype=torch.long)
    top_vals = torch.full((d_sae, spec.top_n), -math.inf)
    top_pos = torch.full((d_sae, spec.top_n), -1, dtype=torch.long)
    stats = RunningStats(sae.cfg.d_in, d_sae)
    sae_device = next(sae.parameters()).device
    with progress() as bar:
        task = bar.add_task("feature summary", total=n, unit="samples")
        for s in range(0, n, spec.batch_samples):
            x = torch.from_numpy(ids[s:s + spec.batch_samples]).to(device)
            a = torch.from_numpy(attn[s:s + spec.batch_samples]).to(device)
            acts = capture(x, a).float()
            flat = acts.reshape(-1, acts.shape[-1]).to(sae_device)
            keep = a.reshape(-1).bool().cpu()
            codes = sae.encode(flat)
            stats.update(flat[keep.to(sae_device)], sae.decode(codes)[keep.to(sae_device)], codes[keep.to(sae_device)])
            codes = codes.float().cpu()
            codes[~keep] = 0
            fires += (codes > 0).sum(0)
            cidx = torch.tensor([col.get(int(c), 0) for c in x.reshape(-1).cpu()], dtype=torch.long)
            char_act.index_add_(1, cidx[keep], codes[keep].T.double())
            positions = torch.arange(s * seq, s * seq + codes.shape[0])
            k = min(spec.top_n, codes.shape[0])
            vals, idx = codes.T.topk(k, dim=1)
            merged_v, merged_p = torch.cat([top_vals, vals], 1), torch.cat([top_pos, positions[idx]], 1)
            best = merged_v.topk(spec.top_n, dim=1)
            top_vals, top_pos = best.values, merged_p.gather(1, best.indices)
            bar.update(task, advance=x.shape[0])
    n_tokens = int(attn[:n].sum())
    latents = []
    for i in range(d_sae):
        if fires[i] == 0:
            continue
        total = float(char_act[i].sum()) or 1.0
        order = torch.argsort(char_act[i], descending=True)[:5]
        contexts = []
        for v, p in zip(top_vals[i].tolist(), top_pos[i].tolist()):
            if p < 0 or v <= 0:
                continue
            row, t = divmod(p, seq)
            lo, hi = max(0, t - window), min(int(attn[row].sum()), t + window + 1)
            contexts.append({"text": _show(vocab, ids[row, lo:hi]), "index": t - lo, "char": _show(vocab, ids[row, t:t + 1]), "act": round(v, 4), "sample": row})
        latents.append({
            "id": i,
            "frequency": int(fires[i]) / max(1, n_tokens),
            "top_chars": [[_show(vocab, [int(chars[j])]), round(float(char_act[i, j]) / total, 4)] for j in order.tolist() if char_act[i, j] > 0],
            "top_contexts": contexts,
        })
    latents.sort(key=lambda e: -e["frequency"])
    return {
        "d_in": sae.cfg.d_in,
        "d_sae": d_sae,
        "architecture": sae.cfg.arch,
        "n_samples": n,
        "n_tokens": n_tokens,
        "dead_fraction": float((fires == 0).float().mean()),
        "reconstruction": stats.compute(),
        "latents": latents,
    }


def _show(vocab: Any, ids: Any) -> str:
    special = set(vocab.special_ids)
    return "".join("▒" if int(i) in special else vocab.char(int(i)) for i in ids)


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=str))
