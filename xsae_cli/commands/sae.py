"""`xsae sae`: sparse autoencoders on any module of any model: train, evaluate, export."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from xsae_cli.core import console as out

app = typer.Typer(help="Sparse autoencoders on any module of any model: train, evaluate, export.", no_args_is_help=True)


def _metrics_table(metrics: dict) -> None:
    rows = []
    for hook, r in metrics.get("hooks", {}).items():
        down = r.get("downstream") or {}
        rows.append([
            hook,
            f"{r['fvu']:.3f}",
            f"{r['l0']:.1f}",
            f"{100 * r['dead_fraction']:.1f}%",
            f"{down['ce_loss_recovered']:.3f}" if down else "-",
            f"{down['kl']:.3f}" if down else "-",
            f"{down['ce_clean']:.3f} / {down['ce_spliced']:.3f} / {down['ce_zero']:.3f}" if down else "-",
        ])
    out.console.print(out.table("held-out metrics", ["hook", "FVU", "L0", "dead", "CE recovered", "KL", "CE clean/spliced/zero"], rows))
    t = metrics.get("training")
    if t:
        out.console.print(f"{t['tokens']:,} tokens in {t['seconds']:.1f}s ({t['tokens_per_second']:,.0f} tokens/s training; harvest {t['harvest_seconds']:.1f}s)")


@app.command("train")
def train(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", "-m", help="Zoo name or model path."),
    hook: List[str] = typer.Option(..., "--hook", help="Module path to hook (repeat for several SAEs in one run), e.g. model.layers.15."),
    out_dir: Path = typer.Option(..., "--out", help="Run folder."),
    arch: Optional[str] = typer.Option(None, "--arch", help="relu, topk, batchtopk or jumprelu."),
    k: Optional[int] = typer.Option(None, "--k", help="Active latents per token (topk, batchtopk)."),
    expansion: Optional[int] = typer.Option(None, "--expansion", help="d_sae = expansion x d_in."),
    d_sae: Optional[int] = typer.Option(None, "--d-sae", help="Number of latents (overrides --expansion)."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Training tokens, e.g. 500k or 2M."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Tokens per step."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="signum (schedule-free, sparsify's default) or adam."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default: the optimizer's own)."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="builtin, a .txt/.jsonl/.parquet file, or a datasets folder."),
    context_size: Optional[int] = typer.Option(None, "--context-size", help="Tokens per context."),
    site: str = typer.Option("output", "--site", help="Hook the module's output or input."),
    no_pack: bool = typer.Option(False, "--no-pack", help="One document per context instead of packing."),
    outlier_factor: Optional[float] = typer.Option(None, "--outlier-factor", help="Also drop tokens whose norm exceeds this x the median."),
    normalize: str = typer.Option("none", "--normalize-activations", help="none, expected_average_only_in, constant_norm_rescale or layer_norm."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", help="Steps between checkpoints."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Stream activations instead of caching a harvest on disk."),
    log_with: Optional[str] = typer.Option(None, "--log-with", help="tensorboard or wandb (through accelerate's trackers)."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="'auto': spread a model too large for one GPU over all visible GPUs (accelerate)."),
    force: bool = typer.Option(False, "--force", help="Start over even if the run folder holds a finished run."),
) -> None:
    """Harvest activations, train one SAE per hook, evaluate on held-out text, save SAELens files."""
    from xsae_cli.sae.runs import RunSpec, parse_tokens, train_run
    from xsae_cli.sae.train import TrainSettings

    cfg = ctx.obj.config
    s = cfg.sae
    settings = TrainSettings(
        arch=arch or s.arch,
        k=k if k is not None else s.k,
        expansion=expansion if expansion is not None else s.expansion,
        d_sae=d_sae,
        optimizer=optimizer or s.optimizer,
        lr=lr if lr is not None else (s.lr or None),
        batch_size=batch_size if batch_size is not None else s.batch_size,
        tokens=parse_tokens(tokens if tokens is not None else s.tokens),
        checkpoint_every=checkpoint_every,
        normalize_activations=normalize,
        seed=cfg.hardware.seed,
        log_with=log_with,
        deepspeed_config=cfg.hardware.deepspeed_config or None,
    )
    spec = RunSpec(
        model=model,
        hooks=list(hook),
        out=out_dir,
        corpus=corpus or s.corpus,
        context_size=context_size if context_size is not None else s.context_size,
        pack=not no_pack,
        site=site,
        outlier_factor=outlier_factor,
        device=cfg.hardware.device,
        model_dtype=cfg.hardware.dtype,
        cache=not no_cache,
        force=force,
        trust_remote_code=cfg.zoo.trust_remote_code,
        device_map=device_map,
    )
    metrics = train_run(spec, settings)
    if metrics and "rank" not in metrics:  # the other ranks of a launch report nothing
        out.emit(metrics, _metrics_table)


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    run_dir: Path = typer.Argument(..., help="A run folder written by `xsae sae train`."),
    eval_tokens: Optional[int] = typer.Option(None, "--tokens", help="Held-out tokens for reconstruction metrics."),
) -> None:
    """FVU, L0, dead latents and CE loss recovered / KL on the run's held-out text."""
    from xsae_cli.sae.runs import evaluate_run

    metrics = evaluate_run(run_dir, device=ctx.obj.config.hardware.device, eval_tokens=eval_tokens)
    out.emit(metrics, _metrics_table)


@app.command("export")
def export(
    src: Path = typer.Argument(..., help="An SAE folder (SAELens or sparsify layout)."),
    dst: Path = typer.Argument(..., help="Where to write."),
    fmt: str = typer.Option("saelens", "--format", help="saelens or sparsify."),
    hook: Optional[str] = typer.Option(None, "--hook", help="Hook name for the sparsify layout (default: from the SAE's metadata)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing destination."),
) -> None:
    """Convert an SAE between the SAELens and sparsify layouts."""
    from xsae_cli.sae.formats import export_sae

    path = export_sae(src, dst, fmt, force, hook=hook)
    out.emit({"written": str(path), "format": fmt}, lambda d: out.console.print(f"wrote {d['format']} SAE to [bold]{d['written']}[/bold]"))


@app.command("features")
def features(
    ctx: typer.Context,
    run_dir: Path = typer.Argument(..., help="A run folder written by `xsae sae train`."),
    hook: Optional[str] = typer.Option(None, "--hook", help="Which hook's SAE (needed when the run has several)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Where to write the JSON (default: <run>/<hook>/features.json)."),
    contexts: int = typer.Option(128, "--contexts", help="Held-out contexts to scan."),
    top_n: int = typer.Option(8, "--top", help="Top-activating contexts kept per latent."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Top-activating contexts, activation histograms and logit lens per latent, as JSON for `xsae viz features`."""
    from xsae_cli.sae.runs import features_run

    path, summary = features_run(run_dir, hook=hook, output=output, n_contexts=contexts, top_n=top_n, device=ctx.obj.config.hardware.device, force=force)
    live = sum(1 for lat in summary["latents"] if lat["frequency"] > 0)
    brief = {"written": str(path), "latents": len(summary["latents"]), "alive": live, "tokens": summary["n_tokens"]}
    out.emit(brief, lambda d: out.console.print(f"wrote [bold]{d['written']}[/bold]: {d['latents']} latents ({d['alive']} fired) over {d['tokens']:,} tokens"))
