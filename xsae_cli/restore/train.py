"""Train the restoration model on simulated damage, with checkpoints that resume exactly.

Each step draws ``batch_size`` windows and masks spans of 1-10 legible characters with a NumPy
generator seeded by (seed, step, process), so a run resumed from a checkpoint repeats the
uninterrupted one on CPU. Accelerate prepares the model and optimizer (one process or several
under ``--launcher``; mixed precision where asked). Checkpoints are io.Checkpoints (safetensors +
JSON): model, optimizer and the vocabulary, so a resume never rebuilds a different vocabulary.

Run folder::

    config.json  model.safetensors  vocab.json    the trained model (what predict/convert/sae load)
    checkpoints/step_N/                           resume points
    train_log.jsonl                               loss and masked accuracy every few steps
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xsae_cli.core.console import info, progress, warn
from xsae_cli.core.errors import Interrupted, XsaeError
from xsae_cli.core.io import Checkpoints, atomic_dir
from xsae_cli.core.settings import refuse_changed_resume, resume_changes
from xsae_cli.restore.data import (
    IGNORE,
    Encoded,
    Vocab,
    load_docs,
    mask_spans,
    sample_windows,
    warn_unknown,
)
from xsae_cli.restore.model import (
    CONFIG_FILE,
    RestorationModel,
    preset_config,
    save_model,
)
from xsae_cli.restore.settings import MIXED, RestoreTrainSettings

__all__ = ["MIXED", "RestoreTrainSettings", "train"]


def lr_at(step: int, s: RestoreTrainSettings) -> float:
    """Linear warm-up (at most a tenth of the run), then cosine decay to a tenth of the peak."""
    warm = max(1, min(s.warmup_steps, s.steps // 10))
    if step < warm:
        return s.lr * (step + 1) / warm
    t = (step - warm) / max(1, s.steps - warm)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def split(docs: list[Any], s: RestoreTrainSettings) -> tuple[list[Any], list[Any]]:
    from xsae_cli.data.corpus import split_documents

    if len(docs) < 2:
        return docs, []
    return split_documents(docs, s.held_out_fraction, seed=s.seed)


def batch(enc: Encoded, s: RestoreTrainSettings, seq_len: int, vocab: Vocab, step: int, rank: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng([s.seed, step, rank])
    ids, attn, dmg = sample_windows(enc, s.batch_size, seq_len, rng, vocab.pad_id)
    inputs, labels = mask_spans(ids, attn, dmg, rng, vocab.mask_id, s.mask_ratio, s.span)
    return {"input_ids": torch.from_numpy(inputs), "attention_mask": torch.from_numpy(attn), "labels": torch.from_numpy(labels)}


def train(settings: RestoreTrainSettings, out: Path, *, force: bool = False, on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train (or resume) in ``out``; library chatter goes to stderr so ``--json`` stays parseable."""
    from xsae_cli.core.runlock import owned

    with contextlib.redirect_stdout(sys.stderr), owned(out):
        return _train(settings, Path(out), force=force, on_log=on_log)


def _train(s: RestoreTrainSettings, out: Path, *, force: bool, on_log: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    from accelerate import Accelerator

    from xsae_cli.core.hardware import (
        memory_report,
        package_versions,
        resolve_device,
        seed_everything,
    )

    if (out / CONFIG_FILE).exists() and not force:
        raise XsaeError(f"{out} already holds a trained model", "pass --force to train again, or choose another --out")
    if force and out.exists():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "train_log.jsonl").unlink(missing_ok=True)
    device = resolve_device(s.device)
    mp = s.mixed_precision
    if mp == "fp16" and device.type != "cuda":
        warn(f"fp16 mixed precision needs a CUDA GPU; training in float32 on {device.type}")
        mp = "no"
    accel = Accelerator(mixed_precision=mp, cpu=device.type == "cpu")
    seed_everything(s.seed)

    docs = load_docs(s.corpus)
    train_docs, held_docs = split(docs, s)
    ckpts = Checkpoints(out, keep=s.keep_checkpoints)
    latest = ckpts.latest()
    if latest is not None:
        step0, state, meta = latest
        vocab = Vocab.from_dict(meta["vocab"], f"checkpoint in {ckpts.root}")
        if meta.get("preset") != s.preset or meta.get("corpus") != list(s.corpus):
            raise XsaeError(
                f"checkpoints in {ckpts.root} are for preset {meta.get('preset')} on {meta.get('corpus')}, not {s.preset} on {list(s.corpus)}",
                "use another --out, or pass --force to start over",
            )
        # seed and device come from [hardware]: the seed changes the result, the device does not
        refused, grown = resume_changes(meta.get("settings") or {}, s)
        refuse_changed_resume(ckpts.root.parent, refused, ["--steps"])
        if grown:
            info("resuming with a larger budget: " + ", ".join(f"{k} {a:,} -> {b:,}" for k, (a, b) in grown.items()))
    else:
        step0, state, meta = 0, None, {}
        vocab = Vocab.build(train_docs)
    cfg = preset_config(s.preset, len(vocab))
    seq_len = s.seq_len or cfg.max_position
    if seq_len > cfg.max_position:
        warn(f"--seq-len {seq_len} is longer than the preset's max_position {cfg.max_position}; RoPE extends, but predict windows stay at {cfg.max_position}")
    enc, unknown = Encoded.from_docs(train_docs, vocab)
    warn_unknown(unknown, warn, "the training text")
    if enc.n_chars() == 0:
        raise XsaeError("the training split holds no characters", "use a larger corpus")

    torch.manual_seed(s.seed)
    model = RestorationModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.98))
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        info(f"resuming from step {step0} in {ckpts.root}")
    model, opt = accel.prepare(model, opt)
    raw = accel.unwrap_model(model)
    rank = accel.process_index

    log_path = out / "train_log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    log_fh = open(log_path, "a", encoding="utf-8") if accel.is_main_process else None
    crash_at = int(os.environ.get("XSAE_CRASH_AT_STEP", "0") or 0)
    common_meta = {"vocab": vocab.to_dict(), "preset": s.preset, "corpus": list(s.corpus), "settings": _jsonable(asdict(s))}

    def checkpoint(step: int) -> None:
        if accel.is_main_process:
            ckpts.save(step, {"model": raw.state_dict(), "optimizer": opt.state_dict()}, common_meta)

    t0 = time.perf_counter()
    last: dict[str, Any] = {}
    step = step0
    chars = 0
    model.train()
    try:
        with progress(disable=not accel.is_main_process) as bar:
            task = bar.add_task(f"training restoration model ({s.preset})", total=s.steps, completed=step0, unit="steps")
            while step < s.steps:
                b = {k: v.to(accel.device) for k, v in batch(enc, s, seq_len, vocab, step, rank).items()}
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, s)
                with accel.autocast():
                    logits = model(b["input_ids"], b["attention_mask"])
                loss = F.cross_entropy(logits.float().view(-1, cfg.vocab_size), b["labels"].view(-1), ignore_index=IGNORE)
                if not torch.isfinite(loss):
                    raise XsaeError(f"the loss became non-finite at step {step}", f"the last good checkpoint in {ckpts.root} is kept; lower --lr")
                opt.zero_grad(set_to_none=True)
                accel.backward(loss)
                accel.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                chars += int(b["attention_mask"].sum())
                bar.update(task, completed=step)
                if step % s.log_every == 0 or step == s.steps:
                    with torch.no_grad():
                        sel = b["labels"] != IGNORE
                        acc = float((logits.argmax(-1)[sel] == b["labels"][sel]).float().mean()) if sel.any() else 0.0
                    last = {"step": step, "loss": float(loss.detach()), "masked_acc": acc, "lr": lr_at(step - 1, s), "chars_per_s": chars / max(1e-9, time.perf_counter() - t0)}
                    if log_fh:
                        log_fh.write(json.dumps(last) + "\n")
                        log_fh.flush()
                    if on_log:
                        on_log(last)
                if step % s.checkpoint_every == 0:
                    checkpoint(step)
                if step == crash_at:  # fault injection for the crash-recovery test
                    os.kill(os.getpid(), signal.SIGKILL)
    except KeyboardInterrupt:
        checkpoint(step)
        raise Interrupted(f"at step {step}; checkpoint saved in {ckpts.root}", "run the same command again to resume") from None
    finally:
        if log_fh:
            log_fh.close()
    seconds = time.perf_counter() - t0
    accel.wait_for_everyone()
    summary = {
        "preset": s.preset,
        "params": raw.n_params(),
        "vocab_size": len(vocab),
        "steps": step,
        "resumed_from": step0 or None,
        "seq_len": seq_len,
        "train_docs": len(train_docs),
        "held_out_docs": len(held_docs),
        "train_chars": enc.n_chars(),
        "seconds": round(seconds, 2),
        "chars_per_second": round(chars / max(seconds, 1e-9), 1),
        "last": last,
        "memory": memory_report(device),
    }
    if accel.is_main_process:
        checkpoint(step)
        raw.eval()
        extra = {"training": summary, "settings": _jsonable(asdict(s)), "corpus": list(s.corpus)}
        # The model files land in `out` beside checkpoints/: written in a temporary folder, then moved.
        with atomic_dir(out / ".model", force=True) as tmp:
            save_model(raw.float().cpu(), vocab, tmp, extra)
        for name in sorted(os.listdir(out / ".model"), key=lambda n: n == CONFIG_FILE):  # config.json last: it marks completion
            os.replace(out / ".model" / name, out / name)
        shutil.rmtree(out / ".model", ignore_errors=True)
    summary["out"] = str(out)
    summary["versions"] = package_versions()
    return summary


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
