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

import dataclasses
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xsae_cli.core.console import info, warn
from xsae_cli.core.errors import XsaeError
from xsae_cli.restore.settings import VIAS, RestoreSaeSettings


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


@dataclass
class RestoreSaeSpec:
    """One SAE run on a restoration model: which model, where it goes, and the [restore.sae] settings."""

    model: str
    out: Path
    settings: RestoreSaeSettings = field(default_factory=RestoreSaeSettings)
    device: str = "auto"
    vocab: str | None = None
    seed: int = 0
    force: bool = False


class DirectCapture:
    """Output of ``model.layers[layer]`` via a forward hook that stops the forward right there."""

    def __init__(self, model: Any, layer: int) -> None:
        self.model = model
        self.layer = layer

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        from xsae_cli.data.hooks import HiddenCapture

        with HiddenCapture(self.model, {hook_name(self.layer): self.model.layers[self.layer]}) as cap:
            self.model(ids, attn)
        return cap.values[hook_name(self.layer)]


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

    if spec.settings.max_samples < 1 or spec.settings.epochs < 1 or spec.settings.batch_samples < 1:
        raise XsaeError("--max-samples, --epochs and --batch-samples must be at least 1", "fix the flag")
    trained = loaded.meta.get("settings", {})
    corpus = spec.settings.corpus or trained.get("corpus") or ["builtin"]
    cfg = loaded.model.config
    seq_len = spec.settings.seq_len or trained.get("seq_len") or cfg.max_position
    if seq_len > cfg.max_position:
        raise XsaeError(f"--seq-len {seq_len} exceeds the model's max_position {cfg.max_position}", f"use at most {cfg.max_position}")
    docs = load_docs(corpus)
    enc, unknown = Encoded.from_docs(docs, loaded.vocab)
    warn_unknown(unknown, warn, "the corpus")
    ids, attn, _ = tile_windows(enc, seq_len, loaded.vocab.pad_id)
    pick = np.random.default_rng(seed).permutation(len(ids))[: spec.settings.max_samples]
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
            idx = np.sort(order[i : i + batch_samples])
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
            yield {hook: pool[s : s + batch_tokens]}


def train_restore_sae(spec: RestoreSaeSpec) -> dict[str, Any]:
    """Train an SAE on ``blocks.<layer>.hook_resid_post``; write SAELens files, features and metrics.

    The run folder is held for the whole run (:func:`xsae_cli.core.runlock.owned`)."""
    from xsae_cli.core.runlock import owned

    with owned(spec.out):
        return _train_restore_sae(spec)


def _train_restore_sae(spec: RestoreSaeSpec) -> dict[str, Any]:
    from xsae_cli.core.hardware import (
        memory_report,
        package_versions,
        peak_rss_bytes,
        resolve_device,
        seed_everything,
    )
    from xsae_cli.core.io import atomic_write_json
    from xsae_cli.restore.model import load_restoration
    from xsae_cli.sae.pipeline import LiveActivations, train_saes

    out = Path(spec.out)
    if (out / "metrics.json").exists() and not spec.force:
        raise XsaeError(f"{out} already holds a finished SAE run", "pass --force to train it again, or choose another --out")
    device = resolve_device(spec.device)
    if spec.force and out.exists():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "train_log.jsonl").unlink(missing_ok=True)
    seed_everything(spec.seed)
    t0 = time.perf_counter()
    loaded = load_restoration(spec.model, vocab=spec.vocab, device=device)
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.settings.layer < 0:  # -1: the middle block
        spec = dataclasses.replace(spec, settings=spec.settings.replace(layer=model.config.n_layers // 2))
    if spec.settings.layer >= model.config.n_layers:
        raise XsaeError(f"--layer {spec.settings.layer} is out of range: the model has {model.config.n_layers} blocks", f"pick 0..{model.config.n_layers - 1}")
    capture = make_capture(model, spec.settings.layer, spec.settings.via, device)
    ids, attn, corpus, seq_len = samples(loaded, spec, spec.seed)
    n_tokens = int(attn.sum())
    hook = hook_name(spec.settings.layer)
    settings = spec.settings.replace(tokens=n_tokens * spec.settings.epochs)
    out.mkdir(parents=True, exist_ok=True)
    d_in = model.config.d_model
    metadata = {
        hook: {
            "model_name": str(spec.model),
            "hook_name": hook,
            "hook_module": f"layers.{spec.settings.layer}",
            "hook_layer": spec.settings.layer,
            "context_size": seq_len,
            "prepend_bos": False,
            "dataset_path": ",".join(corpus),
            "model_class": "RestorationModel",
        }
    }
    atomic_write_json(
        out / "run.json",
        {
            "spec": _jsonable({k: v for k, v in asdict(spec).items() if k != "settings"}),
            "settings": _jsonable(asdict(settings)),
            "samples": int(ids.shape[0]),
            "sample_tokens": n_tokens,
            "seq_len": seq_len,
            "corpus": corpus,
            "versions": package_versions(),
        },
    )
    info(f"{ids.shape[0]} samples ({n_tokens:,} characters) x {spec.settings.epochs} epochs through block {spec.settings.layer} of {model.config.n_layers} ({spec.settings.via})")

    def stream() -> Iterator[dict[str, torch.Tensor]]:
        return activation_stream(capture, ids, attn, epochs=spec.settings.epochs, batch_samples=spec.settings.batch_samples, batch_tokens=settings.batch_size, seed=spec.seed, device=device, hook=hook)

    trained = train_saes(LiveActivations([hook], {hook: d_in}, stream), settings, out, seed=spec.seed, metadata=metadata, device=device)
    sae = trained.saes[hook]
    folder = trained.folders[hook]
    summary = feature_summary(capture, sae, model, loaded.vocab, ids, attn, spec, device)
    summary.update(model=str(spec.model), layer=spec.settings.layer, hook=hook, via=spec.settings.via, corpus=corpus, versions=package_versions())
    atomic_write_json(folder / "features.json", summary)
    metrics = {
        "hook": hook,
        "layer": spec.settings.layer,
        "via": spec.settings.via,
        "sae": str(folder),
        "reconstruction": summary.pop("reconstruction"),
        "training": {**trained.figures(), "total_seconds": round(time.perf_counter() - t0, 2)},
        "samples": int(ids.shape[0]),
        "sample_tokens": n_tokens,
        "epochs": spec.settings.epochs,
        "memory": {**memory_report(device), "peak_rss_bytes": peak_rss_bytes()},
        "settings": _jsonable(asdict(settings)),
        "versions": package_versions(),
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def feature_summary(capture: Any, sae: Any, model: Any, vocab: Any, ids: np.ndarray, attn: np.ndarray, spec: RestoreSaeSpec, device: Any) -> dict[str, Any]:
    """The features summary every group writes (``xsae viz features`` reads it), over the samples:
    characters as tokens, the model's output head as the logit lens, reconstruction on the same characters."""
    from xsae_cli.sae.features import summarize_latents

    n = min(spec.settings.summary_samples, ids.shape[0])
    ids_t, attn_t = torch.from_numpy(ids[:n]).long(), torch.from_numpy(attn[:n]).long()
    summary = summarize_latents(
        lambda x, a: capture(x.to(device), None if a is None else a.to(device)),
        sae,
        ids_t,
        attn_t,
        attn_t == 0,
        lambda t: _show(vocab, [t]),
        hook=hook_name(spec.settings.layer),
        top_n=spec.settings.top_n,
        batch_contexts=spec.settings.batch_samples,
        unembed=model.head.weight.detach().float().cpu(),
        reconstruction=True,
    )
    summary["n_samples"] = n
    return summary


def _show(vocab: Any, ids: Any) -> str:
    special = set(vocab.special_ids)
    return "".join("▒" if int(i) in special else vocab.char(int(i)) for i in ids)


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=str))
