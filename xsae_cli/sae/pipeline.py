"""One SAE pipeline for every group: activations in, trained SAEs in SAELens files out.

``xsae sae train`` (a cached harvest of a real model), ``xsae align transfer`` (paired rows held in
memory) and ``xsae restore sae`` (activations captured live from the restoration model) all train
their SAEs through :func:`train_saes`: the settings become SAE configs, :class:`SaeTrainer` fits
them (resuming from the run folder's checkpoints), the schedule-free average is taken, input
normalisation folded into the weights and every hook's SAE written in SAELens's layout. Each group
keeps only its domain logic: where activations come from (an :class:`ActivationSource`) and what
it measures afterwards.

A source is resumable by construction: ``batches(skip_tokens)`` replays the same deterministic
stream and drops what a resumed run has already seen, so a resumed run sees exactly the batches an
uninterrupted one would have.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.sae.settings import SaeTrainSettings

Batch = dict[str, torch.Tensor]


def hook_dirname(hook: str) -> str:
    """The folder a hook's SAE is written to (a module path with anything unsafe replaced)."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", hook)


class ActivationSource(Protocol):
    """Where an SAE run's activations come from: the hooks, their widths, a resumable stream."""

    @property
    def hooks(self) -> list[str]: ...

    @property
    def d_in(self) -> dict[str, int]: ...

    def batches(self, skip_tokens: int) -> Iterator[Batch]:
        """``{hook: [rows, d_in]}`` batches (rows are the same tokens for every hook), after
        dropping the first ``skip_tokens`` rows of the stream."""
        ...


def skip_rows(it: Iterator[Batch], tokens: int) -> Iterator[Batch]:
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


def rank_share(it: Iterator[Batch], rank: int, world: int) -> Iterator[Batch]:
    """Rank r takes batches r, r+world, ... of the global stream, in whole groups only.

    Every rank must run the same number of steps (each step all-reduces), so a trailing group
    smaller than ``world`` is dropped.
    """
    if world == 1:
        yield from it
        return
    group: list[Batch] = []
    for batch in it:
        group.append(batch)
        if len(group) == world:
            yield group[rank]
            group = []


@dataclass
class CachedActivations:
    """A harvest on disk (:class:`~xsae_cli.data.activations.ShardedActivations`), pass after pass,
    reshuffled each pass; in a launch every rank takes its share of the global stream."""

    shards: Any
    batch_tokens: int
    seed: int = 0
    rank: int = 0
    world: int = 1

    @property
    def hooks(self) -> list[str]:
        return list(self.shards.hooks)

    @property
    def d_in(self) -> dict[str, int]:
        return {h: int(self.shards.d_in[h]) for h in self.hooks}

    def _passes(self) -> Iterator[Batch]:
        epoch = 0
        while True:
            yield from self.shards.batches(self.batch_tokens, None, seed=self.seed + epoch)
            epoch += 1

    def batches(self, skip_tokens: int) -> Iterator[Batch]:
        return rank_share(skip_rows(self._passes(), skip_tokens), self.rank, self.world)


@dataclass
class InMemoryActivations:
    """Rows held in memory (align's paired train rows), pass after pass, reshuffled each pass.

    Resuming jumps straight to the right pass and position instead of replaying the past.
    """

    rows: dict[str, torch.Tensor]
    batch_tokens: int
    seed: int = 0

    @property
    def hooks(self) -> list[str]:
        return list(self.rows)

    @property
    def d_in(self) -> dict[str, int]:
        return {h: int(t.shape[1]) for h, t in self.rows.items()}

    def batches(self, skip_tokens: int) -> Iterator[Batch]:
        n = int(next(iter(self.rows.values())).shape[0])
        if n == 0:
            raise XsaeError("no activation rows to train an SAE on", "use a larger corpus")
        epoch, pos = divmod(skip_tokens, n)
        while True:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
            for s in range(pos, n, self.batch_tokens):
                idx = perm[s : s + self.batch_tokens]
                yield {h: t[idx] for h, t in self.rows.items()}
            epoch, pos = epoch + 1, 0


@dataclass
class LiveActivations:
    """Activations captured while a model runs (restore's samples, an uncached harvest): ``stream()``
    starts the same deterministic stream from the beginning each time it is called."""

    hooks: list[str]
    widths: dict[str, int]
    stream: Callable[[], Iterator[Batch]]

    @property
    def d_in(self) -> dict[str, int]:
        return dict(self.widths)

    def batches(self, skip_tokens: int) -> Iterator[Batch]:
        return skip_rows(self.stream(), skip_tokens)


@dataclass
class TrainedSaes:
    """What :func:`train_saes` gives back: the SAEs (folded, on the training device) and the run's figures."""

    saes: dict[str, Any]
    folders: dict[str, Path] = field(default_factory=dict)
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    rank: int = 0
    world: int = 1
    zero_stage: int | None = None

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": self.tokens, "steps": self.steps, "seconds": round(self.seconds, 2), "tokens_per_second": round(self.tokens_per_second, 1)}
        if self.zero_stage is not None:
            out["zero_stage"] = self.zero_stage
        return out


def train_saes(
    source: ActivationSource,
    settings: SaeTrainSettings,
    out: Path,
    *,
    seed: int = 0,
    metadata: dict[str, dict[str, Any]] | None = None,
    device: torch.device | str = "cpu",
    deepspeed_config: str | None = None,
    save: bool = True,
) -> TrainedSaes:
    """Train one SAE per hook of ``source`` in the run folder ``out`` and write them there.

    Resumes from ``out``'s checkpoints. ``metadata[hook]`` goes into that SAE's ``cfg.json``
    (SAELens fields: model_name, hook_name, context_size, ...). In a launch only rank 0 writes
    files; every rank gets the same SAEs back.
    """
    from xsae_cli.sae.formats import save_sae
    from xsae_cli.sae.train import SaeTrainer

    out = Path(out)
    trainer = SaeTrainer(settings, source.d_in, out, seed=seed, deepspeed_config=deepspeed_config, metadata=metadata, device=device)
    if hasattr(source, "report"):  # a streaming source: its place in this rank's shard is checkpointed
        trainer.stream_position = lambda: {"rank": trainer.rank, **source.position}  # type: ignore[attr-defined]
    trainer.fit(source.batches)
    saes = trainer.finalize()
    result = TrainedSaes(
        saes=saes,
        tokens=trainer.tokens,
        steps=trainer.step,
        seconds=trainer.seconds,
        tokens_per_second=trainer.tokens_per_second,
        rank=trainer.rank,
        world=trainer.world,
    )
    if trainer.zero_config is not None:
        from xsae_cli.sae.zero import zero_stage

        result.zero_stage = zero_stage(trainer.zero_config)
    for hook, sae in saes.items():
        sae.fold_normalization()
        if save and trainer.rank == 0:
            folder = out / hook_dirname(hook)
            save_sae(sae, folder, format="saelens", force=True)
            result.folders[hook] = folder
    return result
