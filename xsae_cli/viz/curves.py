"""`xsae viz curves`: training curves from the logs that runs leave behind, several runs overlaid.

An SAE run (`xsae sae train --out RUN`) logs one JSON object per line in ``RUN/train_log.jsonl``
(step, tokens, hook, loss, fvu, l0, dead_pct, lr, ...): one line per (run, hook) on panels of
loss, FVU, L0, dead % and learning rate against training tokens. A SANE run (`xsae sane train
--out RUN`) keeps its per-epoch history in ``RUN/checkpoint_epoch_N/config.json``: loss and its
reconstruction / contrastive parts against epochs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import read_json
from xsae_cli.viz import style
from xsae_cli.viz.common import finite

SAE_PANELS = [
    ("loss", "Training loss", "loss (MSE + aux, activation units²)"),
    ("fvu", "Fraction of variance unexplained", "FVU (0 = perfect, 1 = mean only)"),
    ("l0", "Sparsity (L0)", "active latents per token"),
    ("dead_pct", "Dead latents", "dead latents (%)"),
    ("lr", "Learning rate", "learning rate"),
]
SANE_PANELS = [
    ("loss", "SANE training loss", "loss (recon + contrastive)"),
    ("recon", "SANE reconstruction", "reconstruction MSE (weight units²)"),
    ("contrast", "SANE contrastive loss", "NT-Xent loss (nats)"),
]
LOOKED_FOR = "train_log.jsonl (xsae sae train) or checkpoint_epoch_N/config.json with a history (xsae sane train)"


@dataclass
class Series:
    run: str
    label: str
    kind: str  # "sae" or "sane"
    x: list[float] = field(default_factory=list)
    values: dict[str, list[float | None]] = field(default_factory=dict)


def _label(path: Path) -> str:
    return path.name or str(path)


def read_sae_log(path: Path, run_label: str) -> list[Series]:
    """One series per hook from a ``train_log.jsonl``; a half-written last line (a crash) is skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    by_hook: dict[str, Series] = {}
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if no == len(lines):
                continue  # the run died mid-write; the lines before are good
            raise XsaeError(f"{path} line {no} is not valid JSON ({exc.msg})", "fix or delete that line") from exc
        if not isinstance(row, dict):
            raise XsaeError(f"{path} line {no}: expected a JSON object, got {type(row).__name__}", "is this an xsae train_log.jsonl?")
        x = finite(row.get("tokens"))
        if x is None:
            x = finite(row.get("step"))
        if x is None:
            raise XsaeError(f"{path} line {no}: missing field 'tokens' (and 'step')", "is this an xsae train_log.jsonl?")
        hook = str(row.get("hook", ""))
        s = by_hook.get(hook)
        if s is None:
            s = by_hook[hook] = Series(run_label, f"{run_label} · {hook}" if hook else run_label, "sae", values={k: [] for k, _, _ in SAE_PANELS})
        s.x.append(x)
        for key, _, _ in SAE_PANELS:
            s.values[key].append(finite(row.get(key)))
    return list(by_hook.values())


def _sane_checkpoints(run: Path) -> list[tuple[int, Path]]:
    found = []
    for p in run.iterdir():
        m = re.fullmatch(r"checkpoint_epoch_(\d+)", p.name)
        if m and (p / "config.json").exists():
            found.append((int(m.group(1)), p / "config.json"))
    return sorted(found)


def read_sane_history(config_path: Path, run_label: str) -> Series | None:
    meta = read_json(config_path, "SANE checkpoint config")
    history = meta.get("history") if isinstance(meta, dict) else None
    if not history:
        return None
    if not isinstance(history, list):
        raise XsaeError(f"{config_path}: field 'history' must be a list of per-epoch rows", "re-create it with `xsae sane train`")
    s = Series(run_label, run_label, "sane", values={k: [] for k, _, _ in SANE_PANELS})
    for i, row in enumerate(history):
        if not isinstance(row, dict):
            raise XsaeError(f"{config_path}: history[{i}] must be an object", "re-create it with `xsae sane train`")
        s.x.append(finite(row.get("epoch")) or float(i + 1))
        for key, _, _ in SANE_PANELS:
            s.values[key].append(finite(row.get(key)))
    return s


def load_run(path: str | Path) -> list[Series]:
    """Every series a run folder (or a log file) holds."""
    path = Path(path)
    if not path.exists():
        raise XsaeError(f"run folder not found: {path}", "check the path")
    if path.is_file():
        if path.name.endswith(".jsonl"):
            return read_sae_log(path, _label(path.parent))
        if path.name == "config.json":
            s = read_sane_history(path, _label(path.parent.parent if path.parent.name.startswith("checkpoint_epoch_") else path.parent))
            if s is None:
                raise XsaeError(f"{path}: missing field 'history'", "point at a checkpoint_epoch_N/config.json written by `xsae sane train`")
            return [s]
        raise XsaeError(f"{path} is not a training log", f"give a run folder; viz curves reads {LOOKED_FOR}")
    series: list[Series] = []
    label = _label(path)
    if (path / "train_log.jsonl").exists():
        series += read_sae_log(path / "train_log.jsonl", label)
    ckpts = _sane_checkpoints(path)
    if not ckpts and path.name.startswith("checkpoint_epoch_") and (path / "config.json").exists():
        ckpts = [(0, path / "config.json")]
        label = _label(path.parent)
    if ckpts:
        s = read_sane_history(ckpts[-1][1], label)  # the latest checkpoint holds the whole history
        if s is not None:
            series.append(s)
    if not series:
        raise XsaeError(f"no training log in {path}: looked for {path / 'train_log.jsonl'} and {path}/checkpoint_epoch_N/config.json (with a history)", "point at the --out folder of `xsae sae train` or `xsae sane train`")
    if all(not s.x for s in series):
        raise XsaeError(f"the training log in {path} is empty", "let the run log at least one step")
    return series


def _si(v: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


def plot_curves(run_dirs: list[str | Path], output: str | Path, fmt: str = "png", dpi: int = style.DPI) -> dict[str, Any]:
    if not run_dirs:
        raise XsaeError("no run folders given", "e.g. xsae viz curves runs/sae runs/sane --output curves.png")
    series: list[Series] = []
    for d in run_dirs:
        series += load_run(d)
    sae = [s for s in series if s.kind == "sae"]
    sane = [s for s in series if s.kind == "sane"]
    panels: list[tuple[str, str, str, str, list[Series]]] = []
    for key, title, ylabel in SAE_PANELS:
        if sae and any(v is not None for s in sae for v in s.values[key]):
            panels.append((key, title, ylabel, "training tokens", sae))
    for key, title, ylabel in SANE_PANELS:
        if sane and any(v is not None for s in sane for v in s.values[key]):
            panels.append((key, title, ylabel, "epoch", sane))
    if not panels:
        raise XsaeError("the logs hold no plottable metric (loss, fvu, l0, dead_pct, lr; SANE loss, recon, contrast)", "check that the runs logged at least one step")
    ncols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + ncols - 1) // ncols
    colours = {lab: style.color(i) for i, lab in enumerate(dict.fromkeys(s.label for s in series))}
    with style.styled():
        fig, axes = style.figure(nrows, ncols, figsize=(11.0 if ncols == 2 else 8.0, 3.4 * nrows + 0.6))
        flat = list(axes.flat) if hasattr(axes, "flat") else [axes]
        for ax, (key, title, ylabel, xlabel, group) in zip(flat, panels):
            positive = True
            for s in group:
                pts = [(x, v) for x, v in zip(s.x, s.values[key]) if v is not None]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                positive = positive and min(ys) > 0
                ax.plot(xs, ys, color=colours[s.label], label=s.label, marker="o" if len(xs) <= 12 else None, markersize=3.5)
            ys_all = [v for s in group for v in s.values[key] if v is not None]
            if key in ("loss", "fvu", "recon") and positive and ys_all and max(ys_all) / min(ys_all) > 20:
                ax.set_yscale("log")
                ylabel += ", log scale"
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if xlabel == "epoch":
                from matplotlib.ticker import MaxNLocator

                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            else:
                from matplotlib.ticker import FuncFormatter

                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _si(v)))
            ax.yaxis.get_major_formatter().set_useOffset(False) if hasattr(ax.yaxis.get_major_formatter(), "set_useOffset") else None
        for ax in flat[len(panels):]:
            ax.set_visible(False)
        handles, labels = {}, []
        for ax in flat[: len(panels)]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in handles:
                    handles[lab] = h
                    labels.append(lab)
        fig.legend([handles[lab] for lab in labels], labels, loc="outside lower center", ncols=min(4, len(labels)))
        fig.suptitle("Training curves" + (f" ({len(run_dirs)} runs)" if len(run_dirs) > 1 else f" ({_label(Path(run_dirs[0]))})"))
        style.save(fig, Path(output), fmt, dpi)
    return {
        "written": str(output),
        "format": fmt,
        "runs": len(run_dirs),
        "series": len(series),
        "panels": [p[0] if p[3] != "epoch" else f"sane_{p[0]}" for p in panels],
    }
