"""`xsae viz curves`: training curves from the logs that runs leave behind, several runs overlaid.

An SAE run (`xsae sae train --out RUN`) logs one JSON object per line in ``RUN/train_log.jsonl``
(step, tokens, hook, loss, fvu, l0, dead_pct, lr, ...): one line per (run, hook) on panels of
loss, FVU, L0, dead % and learning rate against training tokens. A SANE run (`xsae sane train
--out RUN`) keeps its per-epoch history in ``RUN/checkpoint_epoch_N/config.json``: loss and its
reconstruction / contrastive parts against epochs. Any other JSON-lines log whose rows hold a
step (or tokens, or epoch) and numbers (a restoration run's loss and masked accuracy, logs of
groups viz does not know yet) is plotted column by column against that step.
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
# Columns of logs viz has no reader for: title and y label (with the unit where the name says it).
LOG_LABELS: dict[str, tuple[str, str]] = {
    "loss": ("Training loss", "loss (as logged)"),
    "val_loss": ("Validation loss", "loss (as logged)"),
    "masked_acc": ("Masked-character accuracy", "accuracy (fraction of masked characters)"),
    "accuracy": ("Accuracy", "accuracy (fraction)"),
    "acc": ("Accuracy", "accuracy (fraction)"),
    "lr": ("Learning rate", "learning rate"),
    "fvu": ("Fraction of variance unexplained", "FVU (0 = perfect, 1 = mean only)"),
    "l0": ("Sparsity (L0)", "active latents per token"),
    "dead_pct": ("Dead latents", "dead latents (%)"),
    "mse": ("Mean squared error", "MSE (activation units²)"),
    "r2": ("Explained variance", "R² (1 = perfect)"),
    "grad_norm": ("Gradient norm", "gradient L2 norm"),
    "chars_per_s": ("Throughput", "characters per second"),
    "tokens_per_s": ("Throughput", "tokens per second"),
}
# Where the x axis comes from, in order of preference, and what it is called.
X_KEYS = {"tokens": "training tokens", "step": "training step", "epoch": "epoch", "iteration": "iteration", "iter": "iteration"}
# Not curves: bookkeeping columns.
SKIP_COLUMNS = {"time", "timestamp", "seconds", "elapsed", "wall_time", "rank", "world_size", "process", "seed"}
GROUP_KEYS = ("split", "phase", "mode")
MAX_LOG_PANELS = 8
LOOKED_FOR = "train_log.jsonl (xsae sae train) or checkpoint_epoch_N/config.json with a history (xsae sane train)"


@dataclass
class Series:
    run: str
    label: str
    kind: str  # "sae", "sane" or "log" (any other JSON-lines log)
    x: list[float] = field(default_factory=list)
    values: dict[str, list[float | None]] = field(default_factory=dict)
    xlabel: str = ""  # "log" series: what the x axis counts

    @property
    def columns(self) -> list[str]:
        """The plottable columns, in the log's order (for "log" series)."""
        return [k for k, v in self.values.items() if any(x is not None for x in v)]


def _label(path: Path) -> str:
    return path.name or str(path)


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of a JSON-lines log; a half-written last line (a crash) is skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
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
            raise XsaeError(f"{path} line {no}: expected a JSON object, got {type(row).__name__}", "is this an xsae training log?")
        rows.append((no, row))
    return rows


def is_sae_log(rows: list[tuple[int, dict[str, Any]]]) -> bool:
    """An SAE trainer's log: rows name their hook, or carry the SAE's own metrics."""
    return any("hook" in r or ("fvu" in r and "l0" in r) for _, r in rows)


def read_log(path: Path, run_label: str, rows: list[tuple[int, dict[str, Any]]] | None = None) -> list[Series]:
    """The series of any JSON-lines training log: per hook for an SAE log, else per column."""
    rows = read_jsonl(path) if rows is None else rows
    return _sae_series(path, rows, run_label) if is_sae_log(rows) else _log_series(path, rows, run_label)


def _sae_series(path: Path, rows: list[tuple[int, dict[str, Any]]], run_label: str) -> list[Series]:
    by_hook: dict[str, Series] = {}
    for no, row in rows:
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


def _log_series(path: Path, rows: list[tuple[int, dict[str, Any]]], run_label: str) -> list[Series]:
    """A log viz has no reader for: x from tokens / step / epoch, one column per numeric field."""
    if not rows:
        return []
    xkey = next((k for k in X_KEYS if any(finite(r.get(k)) is not None for _, r in rows)), None)
    if xkey is None:
        no = rows[0][0]
        raise XsaeError(f"{path} line {no}: missing field 'tokens' (and 'step')", "a training log needs a step, tokens or epoch field in every line")
    columns: dict[str, None] = {}
    for _, r in rows:
        for k, v in r.items():
            if k in X_KEYS or k in SKIP_COLUMNS or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            columns.setdefault(k)
    groups: dict[str, Series] = {}
    stem = path.stem if path.stem not in ("train_log", "log", "metrics") else ""
    for no, r in rows:
        x = finite(r.get(xkey))
        if x is None:
            raise XsaeError(f"{path} line {no}: missing field '{xkey}'", "every line of a training log needs the same step field")
        tag = " ".join(str(r[g]) for g in GROUP_KEYS if isinstance(r.get(g), str))
        s = groups.get(tag)
        if s is None:
            label = " · ".join(p for p in (run_label, stem, tag) if p)
            s = groups[tag] = Series(run_label, label, "log", values={k: [] for k in columns}, xlabel=X_KEYS[xkey])
        s.x.append(x)
        for k in columns:
            s.values[k].append(finite(r.get(k)))
    return list(groups.values())


def log_labels(key: str) -> tuple[str, str]:
    """Title and y label of a log column; an unknown one says its unit is whatever was logged."""
    if key in LOG_LABELS:
        return LOG_LABELS[key]
    return key.replace("_", " ").capitalize(), f"{key} (as logged)"


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
            return read_log(path, _label(path.parent))
        if path.name == "config.json":
            s = read_sane_history(path, _label(path.parent.parent if path.parent.name.startswith("checkpoint_epoch_") else path.parent))
            if s is None:
                raise XsaeError(f"{path}: missing field 'history'", "point at a checkpoint_epoch_N/config.json written by `xsae sane train`")
            return [s]
        raise XsaeError(f"{path} is not a training log", f"give a run folder; viz curves reads {LOOKED_FOR}")
    series: list[Series] = []
    label = _label(path)
    if (path / "train_log.jsonl").exists():
        series += read_log(path / "train_log.jsonl", label)
    ckpts = _sane_checkpoints(path)
    if not ckpts and path.name.startswith("checkpoint_epoch_") and (path / "config.json").exists():
        ckpts = [(0, path / "config.json")]
        label = _label(path.parent)
    if ckpts:
        s = read_sane_history(ckpts[-1][1], label)  # the latest checkpoint holds the whole history
        if s is not None:
            series.append(s)
    if not series:
        raise XsaeError(
            f"no training log in {path}: looked for {path / 'train_log.jsonl'} and {path}/checkpoint_epoch_N/config.json (with a history)",
            "point at the --out folder of `xsae sae train` or `xsae sane train`",
        )
    if all(not s.x for s in series):
        raise XsaeError(f"the training log in {path} is empty", "let the run log at least one step")
    return series


def _si(v: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


@dataclass
class Panel:
    key: str  # the column; named in summaries as key (SAE), sane_key or log_key
    title: str
    ylabel: str
    xlabel: str
    group: list[Series]

    @property
    def name(self) -> str:
        kind = self.group[0].kind
        return self.key if kind == "sae" else f"{kind}_{self.key}"


def panels_for(series: list[Series]) -> tuple[list[Panel], list[str]]:
    """The panels to draw (SAE, then SANE, then other logs' columns) and the log columns left out."""
    sae = [s for s in series if s.kind == "sae"]
    sane = [s for s in series if s.kind == "sane"]
    logs = [s for s in series if s.kind == "log"]
    panels: list[Panel] = []
    for key, title, ylabel in SAE_PANELS:
        if sae and any(v is not None for s in sae for v in s.values[key]):
            panels.append(Panel(key, title, ylabel, "training tokens", sae))
    for key, title, ylabel in SANE_PANELS:
        if sane and any(v is not None for s in sane for v in s.values[key]):
            panels.append(Panel(key, title, ylabel, "epoch", sane))
    # Other logs: one panel per (column, x axis), runs with the same column overlaid; loss first.
    order: dict[tuple[str, str], list[Series]] = {}
    for s in logs:
        for key in s.columns:
            order.setdefault((key, s.xlabel), []).append(s)
    keys = sorted(order, key=lambda kx: (kx[0] not in LOG_LABELS, list(LOG_LABELS).index(kx[0]) if kx[0] in LOG_LABELS else 0))
    left_out = [k for k, _ in keys[MAX_LOG_PANELS:]]
    for key, xlabel in keys[:MAX_LOG_PANELS]:
        title, ylabel = log_labels(key)
        panels.append(Panel(key, title, ylabel, xlabel, order[(key, xlabel)]))
    return panels, left_out


def draw(series: list[Series], title: str) -> tuple[Any, list[Panel], list[str]]:
    """The curves figure of ``series`` (call inside :func:`style.styled`)."""
    panels, left_out = panels_for(series)
    if not panels:
        raise XsaeError("the logs hold no plottable metric (loss, fvu, l0, dead_pct, lr; SANE loss, recon, contrast; numbers against a step)", "check that the runs logged at least one step")
    ncols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + ncols - 1) // ncols
    colours = {lab: style.color(i) for i, lab in enumerate(dict.fromkeys(s.label for s in series))}
    fig, axes = style.figure(nrows, ncols, figsize=(11.0 if ncols == 2 else 8.0, 3.4 * nrows + 0.6))
    flat = list(axes.flat) if hasattr(axes, "flat") else [axes]
    for ax, panel in zip(flat, panels):
        key, ylabel, xlabel = panel.key, panel.ylabel, panel.xlabel
        positive = True
        for s in panel.group:
            pts = [(x, v) for x, v in zip(s.x, s.values[key]) if v is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            positive = positive and min(ys) > 0
            ax.plot(xs, ys, color=colours[s.label], label=s.label, marker="o" if len(xs) <= 12 else None, markersize=3.5)
        ys_all = [v for s in panel.group for v in s.values[key] if v is not None]
        if ("loss" in key or key in ("fvu", "recon", "mse")) and positive and ys_all and max(ys_all) / min(ys_all) > 20:
            ax.set_yscale("log")
            ylabel += ", log scale"
        ax.set_title(panel.title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if xlabel in ("epoch", "training step", "iteration"):
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if xlabel != "epoch":
            from matplotlib.ticker import FuncFormatter

            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _si(v)))
        ax.yaxis.get_major_formatter().set_useOffset(False) if hasattr(ax.yaxis.get_major_formatter(), "set_useOffset") else None
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    handles, labels = {}, []
    for ax in flat[: len(panels)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend([handles[lab] for lab in labels], labels, loc="outside lower center", ncols=min(4, len(labels)))
    fig.suptitle(title)
    return fig, panels, left_out


def curves_image(series: list[Series], title: str, fmt: str = "png", dpi: int = style.DPI) -> tuple[bytes, list[Panel]]:
    """The curves of ``series`` as PNG or SVG bytes (what the report embeds)."""
    with style.styled():
        fig, panels, _ = draw(series, title)
        return style.to_bytes(fig, fmt, dpi), panels


def plot_curves(run_dirs: list[str | Path], output: str | Path, fmt: str = "png", dpi: int = style.DPI) -> dict[str, Any]:
    if not run_dirs:
        raise XsaeError("no run folders given", "e.g. xsae viz curves runs/sae runs/sane --output curves.png")
    series: list[Series] = []
    for d in run_dirs:
        series += load_run(d)
    title = "Training curves" + (f" ({len(run_dirs)} runs)" if len(run_dirs) > 1 else f" ({_label(Path(run_dirs[0]))})")
    with style.styled():
        fig, panels, left_out = draw(series, title)
        style.save(fig, Path(output), fmt, dpi)
    summary: dict[str, Any] = {
        "written": str(output),
        "format": fmt,
        "runs": len(run_dirs),
        "series": len(series),
        "panels": [p.name for p in panels],
    }
    if left_out:
        summary["columns_left_out"] = left_out
    return summary
