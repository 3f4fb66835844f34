"""`xsae restore`: Character-level restoration transformer for damaged texts, and SAEs on it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer

from xsae_cli.commands.options import options, renamed, split_list
from xsae_cli.core import console as out
from xsae_cli.restore.settings import EvaluateSettings, PredictSettings, RestoreSaeSettings, RestoreTrainSettings

app = typer.Typer(help="Character-level restoration transformer for damaged texts, and SAEs on it.", no_args_is_help=True)


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


@app.command("train")
@options("restore", into="settings")
def train(
    ctx: typer.Context,
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run folder: the model (config.json, model.safetensors, vocab.json) and checkpoints."),
    force: bool = typer.Option(False, "--force", help="Start over even if the folder holds a trained model."),
    settings: RestoreTrainSettings = None,  # type: ignore[assignment]
) -> None:
    """Train on simulated damage (masked spans of 1-10 characters); rerun the same command to resume."""
    from xsae_cli.restore.train import train as run

    hw = ctx.obj.config.hardware
    settings = settings.replace(seed=hw.seed, device=hw.device)
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
@options("restore.predict", into="settings")
def predict(
    ctx: typer.Context,
    text: str = typer.Argument(..., help='A damaged line, e.g. "a-na be-li2-ia [...] qi2-bi2-ma"; [...] is a gap of unknown length, [x] one lost sign.'),
    model: Path = typer.Option(..., "--model", "-m", help="A model folder from `xsae restore train`, or an original .pt checkpoint."),
    vocab: Path | None = typer.Option(None, "--vocab", help="vocab.json for a .pt checkpoint (default: Unicode code points, as the original code)."),
    settings: PredictSettings = None,  # type: ignore[assignment]
) -> None:
    """Ranked restorations of each gap, with probabilities (beam search over the gap's characters)."""
    from xsae_cli.core.hardware import resolve_device
    from xsae_cli.restore.model import load_restoration
    from xsae_cli.restore.predict import check_text, restore_text

    s = settings
    check_text(text, s.min_len, s.max_len)  # before the model loads
    device = resolve_device(ctx.obj.config.hardware.device)
    loaded = load_restoration(model, vocab=vocab, device=device)
    result = restore_text(loaded.model, loaded.vocab, text, beam=s.beam, top=s.top, min_len=s.min_len, max_len=s.max_len, device=device, warn=out.warn)

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
@options("restore.evaluate", into="settings")
def evaluate(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="A model folder from `xsae restore train`."),
    corpus: list[str] | None = typer.Option(None, "--corpus", help="Corpus to split (default: the one the model was trained on)."),
    settings: EvaluateSettings = None,  # type: ignore[assignment]
) -> None:
    """Top-1/top-5 character accuracy on held-out masked spans, next to a character n-gram baseline."""
    from xsae_cli.core.hardware import resolve_device
    from xsae_cli.restore.evaluate import evaluate_model

    device = resolve_device(ctx.obj.config.hardware.device)
    result = evaluate_model(model, corpus=split_list(corpus), windows=settings.windows, order=settings.order, device=device)

    def render(d: dict[str, Any]) -> None:
        m, b = d["restoration_model"], d["ngram_baseline"]
        rows = [["restoration model", _pct(m["top1"]), _pct(m["top5"])], [f"{b['order']}-gram baseline (both directions)", _pct(b["top1"]), _pct(b["top5"])]]
        out.console.print(out.table(f"{d['masked_chars']:,} masked characters in {d['windows']} held-out windows", ["", "top-1", "top-5"], rows))

    out.emit(result, render)


@app.command("convert")
@renamed("out_dir", "--output")
def convert(
    checkpoint: Path = typer.Argument(..., help="A model folder from `xsae restore train`, or an original .pt checkpoint."),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Where to write (default: <model>/transformer_lens, or <ckpt>-transformer-lens)."),
    vocab: Path | None = typer.Option(None, "--vocab", help="vocab.json to copy beside a .pt checkpoint's conversion."),
    force: bool = typer.Option(False, "--force", help="Replace an existing conversion."),
) -> None:
    """Convert to a TransformerLens HookedTransformer (config + safetensors) and report the logit difference."""
    from xsae_cli.restore.convert import convert as run

    report = run(checkpoint, out_dir, force=force, vocab=vocab)
    out.emit(
        report,
        lambda d: out.console.print(
            f"wrote HookedTransformer to [bold]{d['out']}[/bold]; max |logit difference| on random inputs: {d['max_abs_logit_diff']:.2e} (float32, tolerance {d['tolerance']:g})"
        ),
    )


@app.command("sae")
@options("restore.sae", into="settings")
def sae(
    ctx: typer.Context,
    model: Path = typer.Option(..., "--model", "-m", help="A model folder from `xsae restore train`, or an original .pt checkpoint."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run folder for the SAE."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (default: the global --device)."),
    vocab: Path | None = typer.Option(None, "--vocab", help="vocab.json for a .pt checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start over even if the folder holds a finished run."),
    settings: RestoreSaeSettings = None,  # type: ignore[assignment]
) -> None:
    """Train an SAE on the residual stream after one block; SAELens files plus a feature summary."""
    from xsae_cli.core.hardware import resolve_device
    from xsae_cli.restore.sae import RestoreSaeSpec, train_restore_sae

    hw = ctx.obj.config.with_flags({"hardware": {"device": device}}).hardware if device else ctx.obj.config.hardware
    resolve_device(hw.device)  # an absent device fails here, naming the ones that exist
    spec = RestoreSaeSpec(model=str(model), out=out_dir, settings=settings, device=hw.device, vocab=str(vocab) if vocab else None, seed=hw.seed, force=force)
    metrics = train_restore_sae(spec)

    def render(d: dict[str, Any]) -> None:
        rec = d["reconstruction"]
        t = d["training"]
        out.console.print(
            out.table(
                f"SAE on {d['hook']} ({d['via']})",
                ["FVU", "L0", "dead", "tokens", "seconds", "peak RSS"],
                [
                    [
                        f"{rec.get('fvu', float('nan')):.3f}",
                        f"{rec.get('l0', float('nan')):.1f}",
                        _pct(rec.get("dead_fraction", float("nan"))),
                        f"{t['tokens']:,}",
                        f"{t['seconds']:.1f}",
                        f"{d['memory']['peak_rss_bytes'] / 2**20:,.0f} MiB",
                    ]
                ],
            )
        )
        out.console.print(f"SAELens files and features.json in [bold]{d['sae']}[/bold]")

    out.emit(metrics, render)
