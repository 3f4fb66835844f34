"""`xsae restore`: Character-level restoration transformer for damaged texts, and SAEs on it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, List, Optional

import typer

from xsae_cli.core import console as out

app = typer.Typer(help="Character-level restoration transformer for damaged texts, and SAEs on it.", no_args_is_help=True)


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


@app.command("train")
def train(
    ctx: typer.Context,
    out_dir: Path = typer.Option(..., "--out", help="Run folder: the model (config.json, model.safetensors, vocab.json) and checkpoints."),
    corpus: Optional[List[str]] = typer.Option(None, "--corpus", help="builtin, .atf, .txt, .jsonl or .parquet file, or a folder (repeat, or separate with commas)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="tiny (tests, demo) or seed (the original 37M-parameter model)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per step."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Characters per window (default: the preset's max_position)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (AdamW, warm-up then cosine)."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", help="Steps between checkpoints."),
    mixed_precision: str = typer.Option("no", "--mixed-precision", help="no, fp16 (CUDA) or bf16, through accelerate."),
    force: bool = typer.Option(False, "--force", help="Start over even if the folder holds a trained model."),
) -> None:
    """Train on simulated damage (masked spans of 1-10 characters); rerun the same command to resume."""
    from xsae_cli.restore.train import RestoreTrainSettings
    from xsae_cli.restore.train import train as run

    cfg = ctx.obj.config
    r = cfg.restore
    settings = RestoreTrainSettings(
        preset=preset or r.preset,
        corpus=[c for item in corpus for c in item.split(",") if c] if corpus else list(r.corpus),
        steps=steps if steps is not None else r.steps,
        batch_size=batch_size if batch_size is not None else r.batch_size,
        seq_len=seq_len if seq_len is not None else r.seq_len,
        lr=lr if lr is not None else r.lr,
        checkpoint_every=checkpoint_every,
        mixed_precision=mixed_precision,
        seed=cfg.hardware.seed,
        device=cfg.hardware.device,
    )
    summary = run(settings, out_dir, force=force)

    def render(d: dict[str, Any]) -> None:
        last = d.get("last") or {}
        out.console.print(
            f"trained [bold]{d['preset']}[/bold] ({d['params']:,} parameters, {d['vocab_size']} characters) for {d['steps']} steps "
            f"in {d['seconds']:.1f}s ({d['chars_per_second']:,.0f} chars/s); last loss {last.get('loss', float('nan')):.3f}, masked accuracy {_pct(last.get('masked_acc', float('nan')))}"
        )
        out.console.print(f"model written to [bold]{d['out']}[/bold]")

    out.emit(summary, render)


@app.command("predict")
def predict(
    ctx: typer.Context,
    text: str = typer.Argument(..., help='A damaged line, e.g. "a-na be-li2-ia [...] qi2-bi2-ma"; [...] is a gap of unknown length, [x] one lost sign.'),
    model: Path = typer.Option(..., "--model", "-m", help="A model folder from `xsae restore train`, or an original .pt checkpoint."),
    vocab: Optional[Path] = typer.Option(None, "--vocab", help="vocab.json for a .pt checkpoint (default: Unicode code points, as the original code)."),
    beam: Optional[int] = typer.Option(None, "--beam", help="Beams kept per gap length."),
    top: Optional[int] = typer.Option(None, "--top", help="Restorations shown per gap."),
    min_len: int = typer.Option(1, "--min-len", help="Shortest restoration tried for [...]."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Longest restoration tried for [...]."),
) -> None:
    """Ranked restorations of each gap, with probabilities (beam search over the gap's characters)."""
    from xsae_cli.core.hardware import resolve_device
    from xsae_cli.restore.model import load_restoration
    from xsae_cli.restore.predict import restore_text

    cfg = ctx.obj.config
    r = cfg.restore
    device = resolve_device(cfg.hardware.device)
    loaded = load_restoration(model, vocab=vocab, device=device)
    result = restore_text(loaded.model, loaded.vocab, text, beam=beam or r.beam, top=top or r.top, min_len=min_len, max_len=max_len or r.max_gap, device=device, warn=out.warn)

    def render(d: dict[str, Any]) -> None:
        from rich.markup import escape

        for g in d["gaps"]:
            rows = [[i + 1, escape(repr(c["text"])), c["length"], f"{c['p_char']:.3f}", f"{c['p']:.2e}"] for i, c in enumerate(g["candidates"])]
            title = escape(f"gap {g['gap'] + 1}: {g['source']} at character {g['offset']} (lengths {g['lengths'][0]}-{g['lengths'][1]})")
            out.console.print(out.table(title, ["rank", "restoration", "chars", "p per char", "p(string | length)"], rows))
        out.console.print(f"best: [bold]{escape(d['restored'])}[/bold]", highlight=False)
        out.console.print("[dim]ranked by per-character probability (geometric mean), comparable across lengths[/dim]")

    out.emit(result, render)


@app.command("evaluate")
def evaluate(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="A model folder from `xsae restore train`."),
    corpus: Optional[List[str]] = typer.Option(None, "--corpus", help="Corpus to split (default: the one the model was trained on)."),
    windows: int = typer.Option(200, "--windows", help="Held-out windows to mask and score."),
    order: int = typer.Option(6, "--order", help="Order of the character n-gram baseline."),
) -> None:
    """Top-1/top-5 character accuracy on held-out masked spans, next to a character n-gram baseline."""
    from xsae_cli.core.hardware import resolve_device
    from xsae_cli.restore.evaluate import evaluate_model

    cfg = ctx.obj.config
    result = evaluate_model(model, corpus=list(corpus) if corpus else None, windows=windows, order=order, device=resolve_device(cfg.hardware.device))

    def render(d: dict[str, Any]) -> None:
        m, b = d["restoration_model"], d["ngram_baseline"]
        rows = [["restoration model", _pct(m["top1"]), _pct(m["top5"])], [f"{b['order']}-gram baseline (both directions)", _pct(b["top1"]), _pct(b["top5"])]]
        out.console.print(out.table(f"{d['masked_chars']:,} masked characters in {d['windows']} held-out windows", ["", "top-1", "top-5"], rows))

    out.emit(result, render)


@app.command("convert")
def convert(
    checkpoint: Path = typer.Argument(..., help="A model folder from `xsae restore train`, or an original .pt checkpoint."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where to write (default: <model>/transformer_lens, or <ckpt>-transformer-lens)."),
    vocab: Optional[Path] = typer.Option(None, "--vocab", help="vocab.json to copy beside a .pt checkpoint's conversion."),
    force: bool = typer.Option(False, "--force", help="Replace an existing conversion."),
) -> None:
    """Convert to a TransformerLens HookedTransformer (config + safetensors) and report the logit difference."""
    from xsae_cli.restore.convert import convert as run

    report = run(checkpoint, out_dir, force=force, vocab=vocab)
    out.emit(report, lambda d: out.console.print(
        f"wrote HookedTransformer to [bold]{d['out']}[/bold]; max |logit difference| on random inputs: {d['max_abs_logit_diff']:.2e} (float32, tolerance {d['tolerance']:g})"
    ))


@app.command("sae")
def sae(
    ctx: typer.Context,
    model: Path = typer.Option(..., "--model", "-m", help="A model folder from `xsae restore train`, or an original .pt checkpoint."),
    out_dir: Path = typer.Option(..., "--out", help="Run folder for the SAE."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Block whose output (residual stream) is hooked, 0-based (default: the middle one)."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Corpus windows streamed through the model."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the samples."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (default: the global --device)."),
    via: str = typer.Option("direct", "--via", help="direct (hook the original model, stop after the block) or transformer-lens (run_with_cache, for comparison)."),
    corpus: Optional[List[str]] = typer.Option(None, "--corpus", help="Text to sample (default: the model's training corpus, else builtin)."),
    vocab: Optional[Path] = typer.Option(None, "--vocab", help="vocab.json for a .pt checkpoint."),
    arch: Optional[str] = typer.Option(None, "--arch", help="relu, topk, batchtopk or jumprelu."),
    k: Optional[int] = typer.Option(None, "--k", help="Active latents per character (topk, batchtopk)."),
    expansion: Optional[int] = typer.Option(None, "--expansion", help="d_sae = expansion x d_model."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Activation rows per SAE step."),
    batch_samples: int = typer.Option(4, "--batch-samples", help="Samples per forward pass of the model."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Characters per sample (default: the model's training windows)."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", help="Steps between checkpoints."),
    force: bool = typer.Option(False, "--force", help="Start over even if the folder holds a finished run."),
) -> None:
    """Train an SAE on the residual stream after one block; SAELens files plus a feature summary."""
    from xsae_cli.core.hardware import resolve_device
    from xsae_cli.restore.sae import RestoreSaeSpec, train_restore_sae
    from xsae_cli.sae.train import TrainSettings

    cfg = ctx.obj.config
    r = cfg.restore
    dev = device or cfg.hardware.device
    resolve_device(dev)  # an absent device fails here, naming the ones that exist
    chosen = layer if layer is not None else r.layer
    if chosen < 0:
        from xsae_cli.restore.model import load_restoration

        chosen = load_restoration(model, vocab=vocab).model.config.n_layers // 2
    settings = TrainSettings(
        arch=arch or r.arch,
        k=k if k is not None else r.k,
        expansion=expansion if expansion is not None else r.expansion,
        batch_size=batch_size if batch_size is not None else r.sae_batch_size,
        checkpoint_every=checkpoint_every,
        dead_tokens_threshold=100_000,
        seed=cfg.hardware.seed,
    )
    spec = RestoreSaeSpec(
        model=str(model), layer=chosen, out=out_dir, corpus=list(corpus) if corpus else None,
        max_samples=max_samples if max_samples is not None else r.max_samples,
        epochs=epochs if epochs is not None else r.epochs,
        seq_len=seq_len, batch_samples=batch_samples, via=via, device=dev, vocab=str(vocab) if vocab else None, force=force,
    )
    metrics = train_restore_sae(spec, settings)

    def render(d: dict[str, Any]) -> None:
        rec = d["reconstruction"]
        t = d["training"]
        out.console.print(out.table(f"SAE on {d['hook']} ({d['via']})", ["FVU", "L0", "dead", "tokens", "seconds", "peak RSS"], [[
            f"{rec.get('fvu', float('nan')):.3f}", f"{rec.get('l0', float('nan')):.1f}", _pct(rec.get("dead_fraction", float("nan"))),
            f"{t['tokens']:,}", f"{t['seconds']:.1f}", f"{d['memory']['peak_rss_bytes'] / 2**20:,.0f} MiB",
        ]]))
        out.console.print(f"SAELens files and features.json in [bold]{d['sae']}[/bold]")

    out.emit(metrics, render)
