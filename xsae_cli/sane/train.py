"""Train the SANE autoencoder over windows of a zoo: masked reconstruction + NT-Xent.

Each step draws ``batch_size`` random windows (models drawn uniformly). Every window gives two
augmented views (row and column permutations of attention/MLP tensors, Gaussian noise, chunk
masking); the
loss is the reconstruction error of the clean (permuted) chunks from each view, padding excluded,
plus NT-Xent between the views' projected pooled latents with the other windows' views as
negatives. All randomness of a step comes from a NumPy generator seeded by (seed, epoch, process), so a
run resumed from a checkpoint repeats the uninterrupted run exactly on CPU.

Checkpoints: ``<out>/checkpoint_epoch_<N>/`` with ``model.safetensors``, ``optimizer.safetensors``
and ``config.json`` (model config, chunk size, coordinate scheme, settings, history).
"""

from __future__ import annotations

import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import (
    atomic_dir,
    atomic_write_json,
    flatten_state,
    load_safetensors,
    read_json,
    save_safetensors,
    unflatten_state,
)
from xsae_cli.sane.dataset import (
    TokenizedModel,
    WindowSampler,
    collate,
    permute_columns,
    permute_rows,
)
from xsae_cli.sane.settings import MIXED, SaneTrainSettings
from xsae_cli.sane.tokenizer import CoordScheme, view_of_scheme

CKPT_RE = re.compile(r"^checkpoint_epoch_(\d+)$")


@dataclass
class TrainResult:
    out_dir: Path
    epochs_done: int
    resumed_from: int | None
    history: list[dict[str, Any]] = field(default_factory=list)
    is_main: bool = True  # False on the other processes of a launch, which report nothing
    last_checkpoint: Path | None = None


def checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return []
    found = []
    for p in out_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / "config.json").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def read_checkpoint_config(ckpt: Path) -> dict[str, Any]:
    ckpt = Path(ckpt)
    if not (ckpt / "config.json").exists():
        raise XsaeError(f"{ckpt} is not a SANE checkpoint (no config.json)", "point at a checkpoint_epoch_N folder written by `xsae sane train`")
    return read_json(ckpt / "config.json", "SANE checkpoint config")


def check_compatible(meta: dict[str, Any], chunk_size: int, scheme: str, where: str) -> None:
    """Refuse a checkpoint made with another chunk size or coordinate scheme, naming both values."""
    if int(meta["chunk_size"]) != int(chunk_size):
        raise XsaeError(f"{where} was trained with chunk_size {meta['chunk_size']}, but this run uses chunk_size {chunk_size}", f"use --chunk-size {meta['chunk_size']} or another checkpoint")
    if meta["scheme"] != scheme:
        old_view, new_view = view_of_scheme(meta["scheme"]), view_of_scheme(scheme)
        if old_view == new_view and meta["scheme"].split("-")[1] != scheme.split("-")[1]:  # same view, another revision
            raise XsaeError(
                f"{where} was trained on revision {meta['scheme'].split('-')[1]} of the {old_view} view ({meta['scheme']}); this xsae makes {scheme}",
                "train a new model with `xsae sane train` (the view's output changed; see CHANGELOG)",
            )
        raise XsaeError(
            f"{where} was trained with coordinate scheme {meta['scheme']}, but this run uses {scheme}", f"use the checkpoint's view (--view {old_view}) and layer keywords, or train a new model"
        )


def checkpoint_scheme(meta: dict[str, Any], where: str, view: str | None = None, layer_keywords: Any = None, warn: Callable[[str], None] | None = None) -> CoordScheme:
    """The coordinate scheme a checkpoint was trained with, rebuilt from its config: from the
    scheme it stores as data, or (checkpoints written before that) from its scheme id, with the
    default settings or ``layer_keywords`` (the ones [sane] names now). The checkpoint's own
    scheme wins over the current settings (a note says so when the keywords differ); a ``view``
    that is not the checkpoint's, or a view whose output changed since, is refused."""
    sid = str(meta.get("scheme", ""))
    record = meta.get("coord_scheme")
    hint = [tuple(layer_keywords)] if layer_keywords else []
    scheme = CoordScheme.from_record(record) if isinstance(record, dict) else CoordScheme.from_id(sid, hint)
    if scheme is None:  # an id no settings we know give: name what it was made with
        check_compatible(meta, int(meta["chunk_size"]), CoordScheme(layer_keywords=hint[0] if hint else CoordScheme().layer_keywords, view=view_of_scheme(sid)).scheme_id, where)
        raise XsaeError(f"{where}: cannot rebuild its coordinate scheme {sid}", "train a new model with `xsae sane train`")
    check_compatible(meta, int(meta["chunk_size"]), scheme.scheme_id, where)  # the view's output changed since
    if view is not None and view != scheme.view:
        raise XsaeError(f"{where} was trained on the {scheme.view} view, not {view}", f"drop --view (the checkpoint's view is used) or train a model with --view {view}")
    if layer_keywords is not None and tuple(layer_keywords) != scheme.layer_keywords and warn is not None:
        warn(f"{where} was trained with layer keywords {','.join(scheme.layer_keywords)}: those are used ([sane] layer_keywords says {','.join(layer_keywords)})")
    return scheme


def check_resume_settings(meta: dict[str, Any], settings: SaneTrainSettings, out_dir: Path) -> None:
    """Refuse a resume whose settings change the result (``--d-model``, ``--lr``, ...: each field's
    ``resume`` policy); more ``--epochs`` may be asked for."""
    from xsae_cli.core.settings import refuse_changed_resume, resume_changes

    refused, _grown = resume_changes(meta.get("settings") or {}, settings)
    refuse_changed_resume(out_dir, refused, ["--epochs"])


def preflight(out_dir: Path, chunk_size: int, scheme: str, force: bool, settings: SaneTrainSettings | None = None) -> int | None:
    """Before any work: the epoch a run in ``out_dir`` would resume from, refusing a mismatched one."""
    found = checkpoints(Path(out_dir))
    if not found or force:
        return None
    epoch, ckpt = found[-1]
    meta = read_checkpoint_config(ckpt)
    check_compatible(meta, chunk_size, scheme, str(ckpt))
    if settings is not None:
        check_resume_settings(meta, settings, Path(out_dir))
    return epoch


def load_model(ckpt: Path) -> tuple[Any, dict[str, Any]]:
    from xsae_cli.sane.model import SaneAutoencoder, SaneModelConfig

    meta = read_checkpoint_config(ckpt)
    model = SaneAutoencoder(SaneModelConfig(**meta["model"]))
    load_weights(model, load_safetensors(Path(ckpt) / "model.safetensors"))
    model.eval()
    return model, meta


def load_weights(model: Any, state: dict[str, Any]) -> None:
    """Load a checkpoint's weights; one written before the per-kind pooling gains existed pools
    with gains of 1 (zero log-gain), which is exactly how it pooled."""
    import torch

    if "kind_gain" not in state:
        state = {**state, "kind_gain": torch.zeros_like(model.kind_gain)}
    model.load_state_dict(state)


def make_views(
    windows: list[tuple[int, dict[str, np.ndarray]]], models: list[TokenizedModel], rng: np.random.Generator, s: SaneTrainSettings, partners: list[list[int]] | None = None
) -> list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]:
    """Two augmented views per window: (view, chunk mask, clean target values).

    With ``partners`` (per model: models of the same lineage with the same tensor table), the
    second view is, with probability ``lineage_views``, the same chunk range of a partner: a known
    descendant (fine-tune, noise, pruning...) used as one more augmentation.
    """
    out = []
    for view in range(2):
        for m, win in windows:
            src_m, src = m, win
            if view == 1 and partners and partners[m] and rng.random() < s.lineage_views:
                src_m = partners[m][int(rng.integers(len(partners[m])))]
                src = models[src_m].window(int(win["index"][0]), int(win["mask"].shape[0]))
            v = permute_columns(permute_rows(src, models[src_m], rng), models[src_m], rng)
            target = v["values"]
            noisy = dict(v)
            noisy["values"] = (target + s.noise * rng.standard_normal(target.shape)).astype(np.float32) * src["mask"][:, None]
            cmask = (rng.random(src["mask"].shape[0]) < s.mask_prob) & src["mask"]
            out.append((noisy, cmask, target))
    return out


def lineage_partners(models: list[TokenizedModel], lineage: list[int]) -> list[list[int]]:
    """Per model: the other models of its lineage group whose tensor table (names, shapes) is the same."""
    if len(lineage) != len(models):
        raise ValueError(f"lineage has {len(lineage)} entries for {len(models)} models")
    layout = [tuple((t["name"], tuple(t["shape"])) for t in m.manifest["tensors"]) for m in models]
    return [[j for j in range(len(models)) if j != i and lineage[j] == lineage[i] and layout[j] == layout[i]] for i in range(len(models))]


def _to(b: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) for k, v in b.items()}


def train(*args: Any, **kwargs: Any) -> TrainResult:
    """Train (or resume); see :func:`_train`. Library chatter (DeepSpeed's logger, imported lazily by
    accelerate, prints to stdout) goes to stderr so that ``--json`` output stays parseable."""
    import contextlib
    import inspect
    import sys

    from xsae_cli.core.runlock import owned

    out_dir = inspect.signature(_train).bind(*args, **kwargs).arguments["out_dir"]
    with contextlib.redirect_stdout(sys.stderr), owned(out_dir):
        return _train(*args, **kwargs)


def _train(
    models: list[TokenizedModel],
    out_dir: Path,
    settings: SaneTrainSettings,
    model_cfg: Any = None,
    scheme: CoordScheme | str | None = None,
    force: bool = False,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    info: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    stop_after_epoch: int | None = None,
    lineage: list[int] | None = None,
) -> TrainResult:
    """Train (or resume) in ``out_dir``. ``on_step(step, total_steps, losses)`` drives progress bars.

    ``lineage`` (one group id per model) enables lineage views (see :func:`make_views`). ``scheme``:
    the coordinate scheme the models were tokenised with (default: theirs), stored in checkpoints."""
    import torch
    from accelerate import Accelerator

    from xsae_cli.core.hardware import package_versions, resolve_device, seed_everything
    from xsae_cli.sane.model import (
        SaneAutoencoder,
        SaneModelConfig,
        float_mask,
        nt_xent,
        recon_loss,
    )

    if settings.mixed_precision not in MIXED:
        raise XsaeError(f"unknown --mixed-precision '{settings.mixed_precision}'", f"use one of {', '.join(MIXED)}")
    if settings.batch_size < 2:
        raise XsaeError(f"--batch-size {settings.batch_size} leaves no negatives for the contrastive loss", "use --batch-size 2 or more")
    if settings.epochs < 1 or settings.window_size < 1 or settings.save_every < 1:
        raise XsaeError("--epochs, --window-size and --save-every must be at least 1", "fix the flag")
    chunk_size = models[0].chunk_size
    for m in models:
        if m.chunk_size != chunk_size or m.scheme != models[0].scheme:
            raise XsaeError(f"models were tokenised differently ({m.name}: chunk {m.chunk_size}, {m.scheme})", "tokenise all models with the same settings")
    coord = scheme if isinstance(scheme, CoordScheme) else models[0].coord_scheme
    scheme = scheme.scheme_id if isinstance(scheme, CoordScheme) else (scheme or models[0].scheme)
    record = coord.record(chunk_size) if coord is not None and coord.scheme_id == scheme else None
    model_cfg = model_cfg or SaneModelConfig(chunk_size=chunk_size)
    if model_cfg.chunk_size != chunk_size:
        raise XsaeError(f"model chunk_size {model_cfg.chunk_size} does not match the tokenised chunk_size {chunk_size}", "tokenise with the model's chunk size")

    out_dir = Path(out_dir)
    existing = checkpoints(out_dir)
    if existing and force:
        for _, p in existing:
            shutil.rmtree(p, ignore_errors=True)
        existing = []
    device = resolve_device(settings.device)
    mp = settings.mixed_precision
    if mp == "fp16" and device.type != "cuda":
        if warn:
            warn(f"fp16 mixed precision needs a CUDA GPU; training in float32 on {device.type}")
        mp = "no"
    accel = Accelerator(mixed_precision=mp, cpu=device.type == "cpu")

    seed_everything(settings.seed)
    start_epoch = 0
    history: list[dict[str, Any]] = []
    resumed_from = None
    if existing:
        epoch_done, ckpt = existing[-1]
        meta = read_checkpoint_config(ckpt)
        check_compatible(meta, chunk_size, scheme, str(ckpt))
        check_resume_settings(meta, settings, out_dir)
        model_cfg = SaneModelConfig(**meta["model"])
    model = SaneAutoencoder(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    if existing:
        load_weights(model, load_safetensors(ckpt / "model.safetensors"))
        opt_meta = read_json(ckpt / "optimizer.json", "optimizer state")
        opt.load_state_dict(unflatten_state(load_safetensors(ckpt / "optimizer.safetensors"), opt_meta["skeleton"]))
        history = list(meta.get("history", []))
        start_epoch = epoch_done
        resumed_from = epoch_done
        if info and accel.is_main_process:
            info(f"resuming from {ckpt} (epoch {epoch_done})")
    model, opt = accel.prepare(model, opt)

    partners = lineage_partners(models, lineage) if lineage is not None and settings.lineage_views > 0 else None
    sampler = WindowSampler(models, settings.window_size)
    cover = sum(m.n_windows(settings.window_size) for m in models)
    steps = settings.steps_per_epoch or min(max(1, math.ceil(cover / settings.batch_size)), settings.max_steps_per_epoch)
    total_steps = steps * settings.epochs
    result = TrainResult(out_dir, start_epoch, resumed_from, history)
    last = stop_after_epoch if stop_after_epoch is not None else settings.epochs
    for epoch in range(start_epoch, min(settings.epochs, last)):
        # Each process draws its own windows (DDP averages the gradients); one process repeats exactly.
        rng = np.random.default_rng([settings.seed, epoch, accel.process_index])
        model.train()
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "recon": 0.0, "recon_masked": 0.0, "contrast": 0.0}
        for step in range(steps):
            windows = [sampler.sample(rng) for _ in range(settings.batch_size)]
            views = make_views(windows, models, rng, settings, partners)
            batch = collate([v[0] for v in views])
            cmask = torch.from_numpy(np.stack([v[1] for v in views]))
            target = torch.from_numpy(np.stack([v[2] for v in views]))
            batch = _to(batch, accel.device)
            cmask, target = cmask.to(accel.device), target.to(accel.device)
            with accel.autocast():
                outs = model(batch, cmask)
            fmask = float_mask(batch, chunk_size)
            rec = recon_loss(outs["recon"], target, fmask)
            rec_m = recon_loss(outs["recon"], target, fmask & cmask.unsqueeze(-1))
            proj = outs["proj"].float()
            b = settings.batch_size
            con = nt_xent(proj[:b], proj[b:], settings.temperature)
            loss = rec + settings.contrast_weight * con
            opt.zero_grad(set_to_none=True)
            accel.backward(loss)
            accel.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            vals = {"loss": loss.item(), "recon": rec.item(), "recon_masked": rec_m.item(), "contrast": con.item()}
            for k in sums:
                sums[k] += vals[k]
            if on_step:
                on_step(epoch * steps + step + 1, total_steps, vals)
        secs = time.perf_counter() - t0
        if accel.num_processes > 1:  # the epoch's losses over every process's windows, the same on all ranks
            keys = list(sums)
            mean = accel.reduce(torch.tensor([sums[k] for k in keys], device=accel.device), reduction="mean")
            sums = dict(zip(keys, mean.tolist()))
        row = {k: v / steps for k, v in sums.items()}
        seen = steps * settings.batch_size * accel.num_processes  # every process trains on its own windows
        row.update({"epoch": epoch + 1, "steps": steps, "seconds": secs, "world_size": accel.num_processes, "windows": seen, "windows_per_second": seen / max(secs, 1e-9)})
        history.append(row)
        if info and accel.is_main_process:
            info(
                f"epoch {epoch + 1}/{settings.epochs}: loss {row['loss']:.4f} (recon {row['recon']:.4f}, masked {row['recon_masked']:.4f}, contrast {row['contrast']:.4f}), {row['windows_per_second']:.1f} windows/s"
            )
        result.epochs_done = epoch + 1
        if ((epoch + 1) % settings.save_every == 0 or epoch + 1 == settings.epochs) and accel.is_main_process:
            meta = {
                "format": "xsae-sane-checkpoint",
                "epoch": epoch + 1,
                "chunk_size": chunk_size,
                "scheme": scheme,
                **({"coord_scheme": record} if record is not None else {}),
                "model": model_cfg.to_dict(),
                "settings": settings.to_dict(),
                "models": [{"name": m.name, "sha256": m.manifest["sha256"], "n_chunks": m.n_chunks} for m in models],
                "history": history,
                "versions": package_versions(),
            }
            result.last_checkpoint = save_checkpoint(out_dir / f"checkpoint_epoch_{epoch + 1}", getattr(model, "module", model), opt, meta)
            if settings.keep > 0:
                for _, old in checkpoints(out_dir)[: -settings.keep]:
                    shutil.rmtree(old, ignore_errors=True)
    accel.wait_for_everyone()
    result.history = history
    result.is_main = accel.is_main_process
    if result.last_checkpoint is None and checkpoints(out_dir):
        result.last_checkpoint = checkpoints(out_dir)[-1][1]
    return result


def save_checkpoint(path: Path, model: Any, opt: Any, meta: dict[str, Any]) -> Path:
    tensors, skeleton = flatten_state(opt.state_dict())
    with atomic_dir(path, force=True) as tmp:
        save_safetensors({k: v for k, v in model.state_dict().items()}, tmp / "model.safetensors", metadata={"format": "xsae-sane"})
        save_safetensors(tensors, tmp / "optimizer.safetensors")
        atomic_write_json(tmp / "optimizer.json", {"skeleton": skeleton})
        atomic_write_json(tmp / "config.json", meta)
    return path
