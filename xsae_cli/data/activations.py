"""Token activations from any module of any model: hook, filter, shuffle, cache to disk.

:class:`ActivationStore` runs :class:`~xsae_cli.data.corpus.TokenContexts` through a model with
forward hooks on one or more module paths (``model.layers.15``, ``transformer.h.5``,
``encoder.layer.3``, ...), all captured in one forward pass that is *stopped* right after the last
hooked module ran: a layer-6 harvest on a 30-layer model does not pay for the other 24 layers or
the LM head. Positions that are padding, BOS/EOS or any other special token are dropped (their
activations are attention-sink outliers with norms far above the median, and would dominate
reconstruction metrics), optionally with remaining norm outliers; the rest is shuffled in a seeded
buffer and yielded as ``{hook: Tensor[N, d_in]}`` batches whose rows are the same tokens for every
hook.

:meth:`ActivationStore.save_shards` caches a harvest as safetensors shards plus ``meta.json``;
:class:`ShardedActivations` reads them back in shuffled batches one shard at a time, so many SAEs
train on one harvest without re-running the model or holding it all in memory. Both expose the
same ``hooks`` / ``d_in`` / ``batches(batch_tokens, max_tokens)`` interface.
"""

from __future__ import annotations

import difflib
import inspect
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xsae_cli.core.errors import XsaeError
from xsae_cli.data.corpus import TokenContexts
from xsae_cli.data.hooks import SITES, HiddenCapture
from xsae_cli.zoo.anatomy import module_blocks

META_FILE = "meta.json"
SHARD_FORMAT = "xsae-activations"


# --------------------------------------------------------------------------------------- modules


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or type(model).__name__


def _base_name(model: nn.Module) -> str:
    """Name of the base model inside ``model`` ("model" for Llama, "transformer" for GPT-2, "" if bare)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return ""
    for name, module in model.named_children():
        if module is base:
            return name
    return ""


def resolve_module_name(model: nn.Module, path: str) -> str:
    """The full ``named_modules()`` name that ``path`` denotes in ``model``.

    Accepts the full name (``model.layers.15``), the name relative to the base model
    (``layers.15``, ``h.5``), a name with an extra or missing leading ``model.`` / base prefix,
    and a bare block number (``"6"``: the 7th block of the model's main stack). An unknown path is
    an :class:`XsaeError` listing the nearest module names.
    """
    names = dict(model.named_modules())
    p = path.strip()
    base = _base_name(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [p]
    if p.startswith("model."):
        candidates.append(p[len("model.") :])
    for head in dict.fromkeys(h for h in (base, prefix, "model") if h):
        for c in list(candidates):
            candidates.append(f"{head}.{c}")
            if c.startswith(head + "."):
                candidates.append(c[len(head) + 1 :])
    for c in candidates:
        if c and c in names:
            return c
    if p.isdigit():
        blocks = module_blocks(model)
        if blocks is not None and int(p) < len(blocks[1]):
            return f"{blocks[0]}.{int(p)}"
        count = len(blocks[1]) if blocks else 0
        raise XsaeError(f"layer {p} is out of range for {_model_name(model)} ({count} blocks)", f"pick a layer in 0..{max(count - 1, 0)}")
    pool = [n for n in names if n]
    close: list[str] = []
    for c in candidates:
        for m in difflib.get_close_matches(c, pool, n=5, cutoff=0.5):
            if m not in close:
                close.append(m)
    if not close:
        blocks = module_blocks(model)
        close = [f"{blocks[0]}.0", f"{blocks[0]}.{len(blocks[1]) - 1}"] if blocks else pool[:5]
    raise XsaeError(
        f"no module '{path}' in {_model_name(model)}",
        f"nearest module names: {', '.join(close[:5])}",
    )


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule of ``model`` that ``path`` denotes (see :func:`resolve_module_name`)."""
    return model.get_submodule(resolve_module_name(model, path))


# --------------------------------------------------------------------------------------- store


@dataclass
class HarvestStats:
    """What the last harvest did: counts of token positions and forward passes, and time spent."""

    tokens_seen: int = 0  # non-pad positions run through the model
    tokens_kept: int = 0  # positions kept after dropping special tokens and outliers
    dropped_special: int = 0  # BOS / EOS / separators / chat markers (padding is never counted)
    dropped_outliers: int = 0  # norm > outlier_factor x median, in any hook
    forwards: int = 0
    seconds: float = 0.0  # model forwards + filtering + shuffling, not the consumer's time

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        from xsae_cli.core.console import rate_text

        return (
            f"{self.tokens_kept:,} token activations from {self.forwards} forward passes "
            f"({rate_text(self.tokens_seen, self.seconds, 'tok')}); dropped {self.dropped_special:,} "
            f"special-token positions and {self.dropped_outliers:,} norm outliers"
        )


class _Rows:
    """A FIFO of aligned ``{hook: Tensor[k, d]}`` chunks, cut into pieces of any size."""

    def __init__(self, hooks: Sequence[str]) -> None:
        self.hooks = list(hooks)
        self.parts: list[dict[str, torch.Tensor]] = []
        self.count = 0

    def push(self, rows: dict[str, torch.Tensor]) -> None:
        k = int(next(iter(rows.values())).shape[0])
        if k:
            self.parts.append(rows)
            self.count += k

    def pop(self, k: int) -> dict[str, torch.Tensor]:
        """The first ``k`` rows (``k <= count``)."""
        taken: list[dict[str, torch.Tensor]] = []
        need = k
        while need > 0:
            head = self.parts[0]
            size = int(next(iter(head.values())).shape[0])
            if size <= need:
                taken.append(self.parts.pop(0))
                need -= size
            else:
                taken.append({h: t[:need] for h, t in head.items()})
                self.parts[0] = {h: t[need:] for h, t in head.items()}
                need = 0
        self.count -= k
        if len(taken) == 1:
            return taken[0]
        return {h: torch.cat([p[h] for p in taken]) for h in self.hooks}


class ActivationStore:
    """Activations of ``hooks`` in ``model`` over ``contexts``, as shuffled token batches.

    ``hooks`` are module paths (see :func:`resolve_module_name`); ``site`` picks each module's
    input or output (the hidden-states tensor when it is a tuple). All hooks fire in one forward
    pass, which stops after the last of them ran (``stop_early``), under ``torch.inference_mode``
    with the model in eval mode. Pad positions are always dropped; with ``drop_special`` so are
    BOS/EOS/separator/chat-marker positions; with ``outlier_factor`` so is any token whose
    activation norm, in any hook, exceeds ``outlier_factor`` x the median norm of its forward
    batch. Rows of every hook's tensor are the same tokens. Batches come in ``dtype`` on
    ``device`` (default: the model's device), shuffled (contexts in seeded order, then a buffer of
    ``shuffle_buffer_tokens`` rows per hook) unless ``shuffle=False``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        hooks: Sequence[str],
        contexts: TokenContexts,
        *,
        site: str = "output",
        batch_contexts: int = 8,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        drop_special: bool = True,
        outlier_factor: float | None = None,
        shuffle: bool = True,
        shuffle_buffer_tokens: int = 65536,
        seed: int = 0,
        stop_early: bool = True,
        model_name: str | None = None,
    ) -> None:
        if isinstance(hooks, str):
            hooks = [hooks]
        hooks = list(hooks)
        if not hooks:
            raise XsaeError("no hook given", "pass at least one module path, e.g. --hook model.layers.6")
        if len(set(hooks)) != len(hooks):
            raise XsaeError(f"hooks repeat: {', '.join(hooks)}", "pass each module path once")
        if site not in SITES:
            raise XsaeError(f"unknown hook site '{site}'", "use 'output' or 'input'")
        if batch_contexts < 1:
            raise XsaeError(f"batch_contexts must be positive, got {batch_contexts}", "pass e.g. 8")
        if outlier_factor is not None and outlier_factor <= 1:
            raise XsaeError(f"outlier factor must be above 1, got {outlier_factor}", "pass e.g. 10, or none to keep all tokens")
        if len(contexts) == 0:
            raise XsaeError("no token contexts to harvest from", "use a larger corpus")
        self.model = model
        self.tokenizer = tokenizer
        self.hooks = hooks
        self.modules = {h: resolve_module_name(model, h) for h in hooks}
        if len(set(self.modules.values())) != len(hooks):
            raise XsaeError(f"hooks {', '.join(hooks)} name the same module twice", "pass each module once")
        self.contexts = contexts
        self.site = site
        self.batch_contexts = batch_contexts
        self.model_device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.device = torch.device(device) if device is not None else self.model_device
        self.dtype = dtype
        self.drop_special = drop_special
        self.outlier_factor = outlier_factor
        self.shuffle = shuffle
        self.shuffle_buffer_tokens = max(0, int(shuffle_buffer_tokens)) if shuffle else 0
        self.seed = seed
        self.stop_early = stop_early
        self.model_name = model_name or _model_name(model)
        self.stats = HarvestStats()
        self._d_in: dict[str, int] | None = None
        # Run the base model (no LM head) when every hook lies inside it: a full-depth hook then
        # does not pay for vocabulary logits.
        base = _base_name(model)
        self._target = model.get_submodule(base) if base and all(m.startswith(base + ".") for m in self.modules.values()) else model
        params = inspect.signature(self._target.forward).parameters
        self._forward_kwargs = {"use_cache": False} if "use_cache" in params else {}

    # ---------------------------------------------------------------- one forward pass

    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Hooked activations ``{hook: [batch, tokens, d_in]}`` of one forward pass (all positions)."""
        training = [m for m in self.model.modules() if m.training]  # dropout off, restored after
        for m in training:
            m.training = False
        input_ids = input_ids.to(self.model_device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        try:
            with HiddenCapture(self.model, self.modules, site=self.site, stop=self.stop_early) as cap, torch.inference_mode():
                self._target(input_ids=input_ids, attention_mask=attention_mask.to(self.model_device), **self._forward_kwargs)
        finally:
            for m in training:
                m.training = True
        acts = cap.values
        missing = [h for h in self.hooks if h not in acts]
        if missing:
            raise XsaeError(
                f"hook {missing[0]} ({self.modules[missing[0]]}) did not run in the forward pass of {self.model_name}",
                "hook a module that the model's forward uses",
            )
        batch, tokens = input_ids.shape
        for hook, t in acts.items():
            if t.shape[:2] != (batch, tokens):
                if t.shape[0] == batch * tokens:  # modules that flatten tokens (some MoE blocks)
                    t = t.reshape(batch, tokens, -1)
                else:
                    raise XsaeError(
                        f"hook {hook} gives shape {tuple(t.shape)}, not [batch={batch}, tokens={tokens}, d]",
                        "hook a module whose output is per token (blocks, MLPs, attention outputs)",
                    )
            acts[hook] = t.reshape(batch, tokens, -1)
        return acts

    @property
    def d_in(self) -> dict[str, int]:
        """Activation width of every hook (one short forward on first use)."""
        if self._d_in is None:
            c = self.contexts
            acts = self.capture(c.input_ids[:1], c.attention_mask[:1])
            self._d_in = {h: int(t.shape[-1]) for h, t in acts.items()}
        return self._d_in

    def _token_activations(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Kept token activations ``{hook: [k, d_in]}`` of the contexts at ``index``; updates stats."""
        c = self.contexts
        ids, att, special = c.input_ids[index], c.attention_mask[index], c.special_mask[index]
        acts = self.capture(ids, att)
        self.stats.forwards += 1
        real = att.bool().reshape(-1)
        keep = (~special if self.drop_special else att.bool()).reshape(-1)
        self.stats.tokens_seen += int(real.sum())
        self.stats.dropped_special += int((real & ~keep).sum())
        keep_dev = keep.to(self.model_device)
        rows = {h: t.reshape(-1, t.shape[-1])[keep_dev] for h, t in acts.items()}
        if self.outlier_factor is not None and int(keep.sum()) > 0:
            outlier = torch.zeros(int(keep.sum()), dtype=torch.bool, device=self.model_device)
            for t in rows.values():
                norms = t.float().norm(dim=-1)
                outlier |= norms > self.outlier_factor * norms.median()
            n_out = int(outlier.sum())
            if n_out:
                self.stats.dropped_outliers += n_out
                rows = {h: t[~outlier] for h, t in rows.items()}
        out = {h: t.to(device=self.device, dtype=self.dtype) for h, t in rows.items()}
        self.stats.tokens_kept += int(next(iter(out.values())).shape[0])
        return out

    # ---------------------------------------------------------------- batches

    def batches(self, batch_tokens: int, max_tokens: int | None = None, *, show_progress: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``{hook: Tensor[batch_tokens, d_in]}`` until the corpus (or ``max_tokens``) is spent.

        Every batch but the last holds exactly ``batch_tokens`` rows; in all, ``max_tokens`` rows
        (fewer if the corpus runs out). The order of rows depends on the seed and the buffer size,
        never on ``batch_tokens``, so a cached harvest replays an in-memory one exactly. Resets and
        fills :attr:`stats`.

        Shuffling: contexts are visited in a seeded order; kept rows collect in a buffer and, each
        time it holds ``shuffle_buffer_tokens``, it is permuted and all but half of it is released.
        """
        from xsae_cli.core.console import progress

        if batch_tokens < 1:
            raise XsaeError(f"batch size must be positive, got {batch_tokens}", "pass e.g. 4096 tokens")
        if max_tokens is not None and max_tokens < 1:
            raise XsaeError(f"token count must be positive, got {max_tokens}", "pass a positive number of tokens")
        self.stats = HarvestStats()
        gen = torch.Generator().manual_seed(self.seed)
        n = len(self.contexts)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        expected = self.contexts.n_content_tokens if self.drop_special else self.contexts.n_tokens
        total = min(max_tokens, expected) if max_tokens is not None else expected
        limit = max_tokens if max_tokens is not None else math.inf
        buffer = _Rows(self.hooks)  # rows waiting to be mixed
        ready = _Rows(self.hooks)  # mixed rows waiting to be cut into batches
        yielded: float = 0

        def release(count: int, mix: bool) -> None:
            rows = buffer.pop(buffer.count)
            if mix:
                perm = torch.randperm(len(next(iter(rows.values()))), generator=gen).to(self.device)
                rows = {h: t[perm] for h, t in rows.items()}
            ready.push({h: t[:count] for h, t in rows.items()})
            buffer.push({h: t[count:] for h, t in rows.items()})

        # Only a visible bar opens a rich live display: a trainer iterating these batches under its
        # own progress bar would otherwise collide with it (rich < 15 allows one live display).
        with progress(transient=False) if show_progress else nullcontext() as bar:
            task = bar.add_task(f"harvesting {', '.join(self.hooks)}", total=total, unit="tok") if bar is not None else None
            start = 0
            while start < n and yielded + ready.count + buffer.count < limit:
                t0 = time.perf_counter()
                buffer.push(self._token_activations(order[start : start + self.batch_contexts]))
                start += self.batch_contexts
                if self.shuffle_buffer_tokens == 0:
                    release(buffer.count, mix=False)
                elif buffer.count >= self.shuffle_buffer_tokens:
                    release(buffer.count - self.shuffle_buffer_tokens // 2, mix=True)
                batches = [ready.pop(batch_tokens) for _ in range(ready.count // batch_tokens)]
                self.stats.seconds += time.perf_counter() - t0
                if bar is not None and task is not None:
                    bar.update(task, completed=min(self.stats.tokens_kept, total))
                for batch in batches:
                    count = min(batch_tokens, limit - yielded)
                    if count <= 0:
                        return
                    yield batch if count == batch_tokens else {h: t[:count] for h, t in batch.items()}
                    yielded += count
            if buffer.count:
                release(buffer.count, mix=self.shuffle_buffer_tokens > 0)
            while ready.count and yielded < limit:
                batch = ready.pop(int(min(batch_tokens, ready.count, limit - yielded)))
                yield batch
                yielded += len(next(iter(batch.values())))
            if bar is not None and task is not None:
                bar.update(task, completed=total)

    def harvest(self, n_tokens: int | None = None, *, batch_tokens: int = 65536) -> dict[str, torch.Tensor]:
        """All (or ``n_tokens``) kept token activations in memory: ``{hook: Tensor[N, d_in]}``."""
        from xsae_cli.core.console import info, warn

        parts: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        for batch in self.batches(batch_tokens, n_tokens, show_progress=True):
            for h, t in batch.items():
                parts[h].append(t)
        if not parts[self.hooks[0]]:
            raise XsaeError("the corpus gave no token activations (all positions special or dropped)", "use a larger corpus or drop fewer tokens")
        out = {h: torch.cat(ts) for h, ts in parts.items()}
        got = int(out[self.hooks[0]].shape[0])
        if n_tokens is not None and got < n_tokens:
            warn(f"the corpus gave {got:,} token activations, fewer than the {n_tokens:,} asked for")
        info(self.stats.summary())
        return out

    def save_shards(
        self,
        out_dir: str | Path,
        n_tokens: int | None = None,
        shard_tokens: int = 65536,
        *,
        force: bool = False,
        corpus: str | None = None,
    ) -> Path:
        """Write a harvest as ``shard_00000.safetensors``... (one tensor per hook) plus ``meta.json``.

        The folder appears only when complete (built under a temporary name), so an interrupted
        harvest never leaves shards that look whole. Returns the folder.
        """
        from xsae_cli.core.console import info, warn
        from xsae_cli.core.io import atomic_dir, atomic_write_json, save_safetensors

        if shard_tokens < 1:
            raise XsaeError(f"shard size must be positive, got {shard_tokens}", "pass e.g. 65536 tokens")
        out_dir = Path(out_dir)
        shards: list[dict[str, Any]] = []
        d_in: dict[str, int] = {}
        with atomic_dir(out_dir, force=force) as tmp:
            for i, batch in enumerate(self.batches(shard_tokens, n_tokens, show_progress=True)):
                name = f"shard_{i:05d}.safetensors"
                save_safetensors(batch, tmp / name, metadata={"format": SHARD_FORMAT})
                shards.append({"file": name, "n_tokens": int(next(iter(batch.values())).shape[0])})
                d_in = {h: int(t.shape[-1]) for h, t in batch.items()}
            if not shards:
                raise XsaeError("the corpus gave no token activations (all positions special or dropped)", "use a larger corpus or drop fewer tokens")
            total = sum(s["n_tokens"] for s in shards)
            c = self.contexts
            atomic_write_json(
                tmp / META_FILE,
                {
                    "format": SHARD_FORMAT,
                    "version": 1,
                    "model": self.model_name,
                    "hooks": self.hooks,
                    "modules": self.modules,
                    "site": self.site,
                    "d_in": d_in,
                    "dtype": str(self.dtype).replace("torch.", ""),
                    "n_tokens": total,
                    "shard_tokens": shard_tokens,
                    "shards": shards,
                    "context_size": c.context_size,
                    "n_contexts": len(c),
                    "packed": c.packed,
                    "corpus": corpus if corpus is not None else c.meta.get("corpus", ""),
                    "tokenizer": c.meta.get("tokenizer", ""),
                    "drop_special": self.drop_special,
                    "outlier_factor": self.outlier_factor,
                    "seed": self.seed,
                    "stats": asdict(self.stats),
                },
            )
        if n_tokens is not None and total < n_tokens:
            warn(f"the corpus gave {total:,} token activations, fewer than the {n_tokens:,} asked for")
        info(self.stats.summary())
        info(f"wrote {len(shards)} shard(s) of activations to {out_dir}")
        return out_dir


# --------------------------------------------------------------------------------------- shards


class ShardedActivations:
    """A harvest cached by :meth:`ActivationStore.save_shards`, read back one shard at a time.

    :meth:`batches` visits shards in a seeded order and shuffles rows within the current shard
    (plus the previous shard's remainder), so memory stays at about one shard per hook however
    large the harvest is. Shards were already buffer-shuffled when written.
    """

    def __init__(self, path: str | Path) -> None:
        from xsae_cli.core.io import check_safetensors, read_json

        self.path = Path(path)
        if not self.path.is_dir():
            raise XsaeError(f"activation cache not found: {self.path}", "point at a folder written by ActivationStore.save_shards")
        self.meta: dict[str, Any] = read_json(self.path / META_FILE, "activation cache metadata")
        if self.meta.get("format") != SHARD_FORMAT:
            raise XsaeError(f"{self.path / META_FILE} is not an xsae activation cache", "point at a folder written by save_shards")
        self.hooks: list[str] = list(self.meta["hooks"])
        self.d_in: dict[str, int] = {h: int(v) for h, v in self.meta["d_in"].items()}
        self.shards: list[dict[str, Any]] = list(self.meta["shards"])
        for shard in self.shards:
            header = check_safetensors(self.path / shard["file"])
            missing = [h for h in self.hooks if h not in header]
            if missing:
                raise XsaeError(f"{self.path / shard['file']} lacks hook {missing[0]}", "re-harvest the cache")

    def __len__(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def n_tokens(self) -> int:
        return len(self)

    def _load(self, shard: dict[str, Any], hooks: Sequence[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.path / shard["file"]), framework="pt") as fh:
            return {h: fh.get_tensor(h) for h in hooks}

    def _hooks(self, hooks: Sequence[str] | None) -> list[str]:
        chosen = list(hooks) if hooks is not None else self.hooks
        unknown = [h for h in chosen if h not in self.hooks]
        if unknown:
            raise XsaeError(f"hook {unknown[0]} is not in the activation cache {self.path}", f"it holds: {', '.join(self.hooks)}")
        return chosen

    def batches(
        self,
        batch_tokens: int,
        max_tokens: int | None = None,
        *,
        hooks: Sequence[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``{hook: Tensor[batch_tokens, d_in]}`` (the last batch may be short).

        ``shuffle=False`` returns rows exactly in the order they were harvested.
        """
        if batch_tokens < 1:
            raise XsaeError(f"batch size must be positive, got {batch_tokens}", "pass e.g. 4096 tokens")
        chosen = self._hooks(hooks)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.shards), generator=gen).tolist() if shuffle else list(range(len(self.shards)))
        limit = max_tokens if max_tokens is not None else len(self)
        carry: dict[str, torch.Tensor] | None = None
        yielded = 0

        def convert(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)

        for i in order:
            if yielded >= limit:
                return
            data = self._load(self.shards[i], chosen)
            if carry is not None:
                data = {h: torch.cat([carry[h], data[h]]) for h in chosen}
            n = int(data[chosen[0]].shape[0])
            if shuffle:
                perm = torch.randperm(n, generator=gen)
                data = {h: t[perm] for h, t in data.items()}
            full = n - n % batch_tokens
            for s in range(0, full, batch_tokens):
                count = min(batch_tokens, limit - yielded)
                if count <= 0:
                    return
                yield {h: convert(t[s : s + count]) for h, t in data.items()}
                yielded += count
            carry = {h: t[full:] for h, t in data.items()} if full < n else None
        if carry is not None and yielded < limit:
            count = min(int(carry[chosen[0]].shape[0]), limit - yielded)
            yield {h: convert(t[:count]) for h, t in carry.items()}

    def load(self, hooks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The whole cache in memory, in harvest order (for small caches and tests)."""
        chosen = self._hooks(hooks)
        parts = [self._load(s, chosen) for s in self.shards]
        return {h: torch.cat([p[h] for p in parts]) for h in chosen}
