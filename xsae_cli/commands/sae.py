"""`xsae sae`: sparse autoencoders on any module of any model: train, evaluate, export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from xsae_cli.commands.options import options, renamed, split_list
from xsae_cli.core import console as out
from xsae_cli.sae.settings import FeatureSettings, SaeRunSettings

app = typer.Typer(help="Sparse autoencoders on any module of any model: train, evaluate, export.", no_args_is_help=True)


def _metrics_table(metrics: dict) -> None:
    rows = []
    for hook, r in metrics.get("hooks", {}).items():
        down = r.get("downstream") or {}
        rows.append(
            [
                hook,
                f"{r['fvu']:.3f}",
                f"{r['l0']:.1f}",
                f"{100 * r['dead_fraction']:.1f}%",
                f"{down['ce_loss_recovered']:.3f}" if down else "-",
                f"{down['kl']:.3f}" if down else "-",
                f"{down['ce_clean']:.3f} / {down['ce_spliced']:.3f} / {down['ce_zero']:.3f}" if down else "-",
            ]
        )
    out.console.print(out.table("held-out metrics", ["hook", "FVU", "L0", "dead", "CE recovered", "KL", "CE clean/spliced/zero"], rows))
    t = metrics.get("training")
    if t:
        out.console.print(f"{t['tokens']:,} tokens in {t['seconds']:.1f}s ({t['tokens_per_second']:,.0f} tokens/s training; harvest {t['harvest_seconds']:.1f}s)")


@app.command("train")
@options("zoo", into="_zoo", only=("trust_remote_code",))
@options("sae", into="settings")
def train(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", "-m", help="Zoo name or model path."),
    hook: list[str] = typer.Option(..., "--hook", help="Module path to hook, e.g. model.layers.15, or a block number (repeat, or separate with commas, for several SAEs in one run)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run folder."),
    force: bool = typer.Option(False, "--force", help="Start over even if the run folder holds a finished run."),
    settings: SaeRunSettings = None,  # type: ignore[assignment]
    _zoo: Any = None,
) -> None:
    """Harvest activations, train one SAE per hook, evaluate on held-out text, save SAELens files."""
    from xsae_cli.sae.runs import RunSpec, train_run

    cfg = ctx.obj.config
    hw = cfg.hardware
    spec = RunSpec(
        model=model,
        hooks=split_list(hook) or [],
        out=out_dir,
        settings=settings,
        device=hw.device,
        model_dtype=hw.dtype,
        seed=hw.seed,
        deepspeed_config=hw.deepspeed_config or None,
        trust_remote_code=cfg.zoo.trust_remote_code,
        force=force,
    )
    metrics = train_run(spec)
    if metrics and "rank" not in metrics:  # the other ranks of a launch report nothing
        out.emit(metrics, _metrics_table)


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    run_dir: Path = typer.Argument(..., help="A run folder written by `xsae sae train`."),
    eval_tokens: str | None = typer.Option(None, "--tokens", help="Held-out tokens for reconstruction metrics (default: the run's eval_tokens)."),
) -> None:
    """FVU, L0, dead latents and CE loss recovered / KL on the run's held-out text."""
    from xsae_cli.sae.runs import evaluate_run
    from xsae_cli.sae.settings import parse_tokens

    metrics = evaluate_run(run_dir, device=ctx.obj.config.hardware.device, eval_tokens=parse_tokens(eval_tokens) if eval_tokens else None)
    out.emit(metrics, _metrics_table)


@app.command("export")
@renamed("dst", "--output")
def export(
    src: Path = typer.Argument(..., help="An SAE folder, a run folder or a PEFT adapter folder (SAELens, sparsify or peft)."),
    dst: Path = typer.Argument(..., help="Where to write."),
    fmt: str = typer.Option("saelens", "--format", help="saelens, sparsify, or peft (an adapter folder for PeftSaeModel.from_pretrained)."),
    hook: str | None = typer.Option(None, "--hook", help="Hook name for the sparsify layout, or the target module for peft (default: from the SAE's metadata)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing destination."),
) -> None:
    """Convert SAEs between the SAELens and sparsify layouts and PEFT adapter folders."""
    from xsae_cli.sae.formats import export_sae

    path = export_sae(src, dst, fmt, force, hook=hook)
    out.emit({"written": str(path), "format": fmt}, lambda d: out.console.print(f"wrote {d['format']} SAE to [bold]{d['written']}[/bold]"))


@app.command("features")
@renamed("output", "--output")
@options("sae.features", into="settings")
def features(
    ctx: typer.Context,
    run_dir: Path = typer.Argument(..., help="A run folder written by `xsae sae train`."),
    hook: str | None = typer.Option(None, "--hook", help="Which hook's SAE (needed when the run has several)."),
    output: Path | None = typer.Option(None, "--out", "-o", help="Where to write the JSON (default: <run>/<hook>/features.json)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
    settings: FeatureSettings = None,  # type: ignore[assignment]
) -> None:
    """Top-activating contexts, activation histograms and logit lens per latent, as JSON for `xsae viz features`."""
    from xsae_cli.sae.runs import features_run

    path, summary = features_run(run_dir, hook=hook, output=output, n_contexts=settings.contexts, top_n=settings.top, device=ctx.obj.config.hardware.device, force=force)
    live = sum(1 for lat in summary["latents"] if lat["frequency"] > 0)
    brief = {"written": str(path), "latents": len(summary["latents"]), "alive": live, "tokens": summary["n_tokens"]}
    out.emit(brief, lambda d: out.console.print(f"wrote [bold]{d['written']}[/bold]: {d['latents']} latents ({d['alive']} fired) over {d['tokens']:,} tokens"))


@app.command("archs")
def archs() -> None:
    """The registered SAE architectures: whether they use k, their SAELens / sparsify names, extras."""
    from xsae_cli.sae.registry import describe

    rows = describe()
    out.emit(
        rows,
        lambda rs: out.console.print(
            out.table(
                "SAE architectures",
                ["arch", "uses k", "SAELens", "sparsify", "extra tensors", "loss coefficients", "options"],
                [
                    [
                        r["arch"],
                        "yes" if r["uses_k"] else "-",
                        r["saelens"],
                        r["sparsify"] or "-",
                        ", ".join(f"{n} ({k})" for n, k in r["tensors"].items()) or "-",
                        ", ".join(r["coefficients"]) or "-",
                        ", ".join(f"{n}={v}" for n, v in r["options"].items()) or "-",
                    ]
                    for r in rs
                ],
            )
        ),
    )
