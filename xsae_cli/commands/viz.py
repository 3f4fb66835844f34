"""`xsae viz`: Plots and offline HTML dashboards from the files the other groups write."""

from __future__ import annotations

from pathlib import Path

import typer

from xsae_cli.commands.options import options, renamed
from xsae_cli.core import console as out
from xsae_cli.viz.settings import VizSettings

app = typer.Typer(help="Plots and offline HTML dashboards from the files the other groups write.", no_args_is_help=True)


def _written(d: dict) -> None:
    extra = ", ".join(f"{k} {v}" for k, v in d.items() if k in ("models", "method", "runs", "series", "latents", "figures", "bytes") and v is not None)
    out.console.print(f"wrote [bold]{d['written']}[/bold]" + (f" ({extra})" if extra else ""))


@app.command("cluster")
@renamed("output", "--output")
@options("viz", into="v", only=("method", "dpi"))
def cluster(
    ctx: typer.Context,
    input_path: Path = typer.Option(..., "--input", "-i", help="model_embeddings.json written by `xsae sane embed`."),
    output: Path | None = typer.Option(None, "--out", "-o", help="Where to write (default: embedding_plot.<format>)."),
    fmt: str | None = typer.Option(None, "--format", help="png, svg or html (default: the output's suffix, else [viz] format)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    v: VizSettings = None,  # type: ignore[assignment]
) -> None:
    """Models as points: PCA, t-SNE or UMAP of SANE weight embeddings, coloured by family, labelled."""
    from xsae_cli.viz.cluster import cluster as run
    from xsae_cli.viz.common import resolve_format

    cfg = ctx.obj.config
    fmt = resolve_format(output or Path(f"embedding_plot.{fmt or v.format}"), fmt, v.format)
    output = output or Path(f"embedding_plot.{fmt}")
    _refuse(output, force)
    summary = run(input_path, output, method=v.method, fmt=fmt, dpi=v.dpi, seed=cfg.hardware.seed)
    out.emit(summary, _written)


@app.command("curves")
@renamed("output", "--output")
@options("viz", into="v", only=("dpi",))
def curves(
    ctx: typer.Context,
    run_dirs: list[Path] = typer.Argument(..., help="Run folders of `xsae sae train`, `xsae sane train` or any run with a train_log.jsonl (several are overlaid)."),
    output: Path = typer.Option(Path("curves.png"), "--out", "-o", help="Where to write (png or svg)."),
    fmt: str | None = typer.Option(None, "--format", help="png or svg (default: the output's suffix, else [viz] format)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    v: VizSettings = None,  # type: ignore[assignment]
) -> None:
    """Training curves (loss, FVU, L0, dead %, lr; SANE losses; any logged number against its step), several runs overlaid."""
    from xsae_cli.viz.common import resolve_format
    from xsae_cli.viz.curves import plot_curves

    fmt = resolve_format(output, fmt, v.format if v.format in ("png", "svg") else "png", ("png", "svg"))
    _refuse(output, force)
    out.emit(plot_curves(list(run_dirs), output, fmt=fmt, dpi=v.dpi), _written)


def _refuse(path: Path, force: bool) -> None:
    from xsae_cli.core.errors import XsaeError

    if path.exists() and not force:
        raise XsaeError(f"{path} already exists", "pass --force to replace it, or choose another --out")


@app.command("features")
@renamed("output", "--output")
@options("viz", into="v", only=("page_size",))
def features(
    ctx: typer.Context,
    source: Path = typer.Argument(..., help="features.json from `xsae sae features`, or the SAE run / hook folder holding it."),
    output: Path = typer.Option(Path("features.html"), "--out", "-o", help="Where to write the HTML page."),
    hook: str | None = typer.Option(None, "--hook", help="Which hook's features (when the run has several)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    v: VizSettings = None,  # type: ignore[assignment]
) -> None:
    """One offline HTML page of every latent: histogram, top contexts, logit lens, search."""
    from xsae_cli.viz.features import write_features_page

    _refuse(output, force)
    out.emit(write_features_page(source, output, hook=hook, page_size=v.page_size), _written)


@app.command("report")
@renamed("output", "--output")
@options("viz", into="v", only=("method", "dpi", "max_image_mb"))
def report(
    ctx: typer.Context,
    run_dirs: list[Path] = typer.Argument(..., help="Run folders xsae wrote (sae, sane, align, restore, ...), or folders holding them (one level down)."),
    output: Path = typer.Option(Path("report.html"), "--out", "-o", help="Where to write the HTML page."),
    title: str | None = typer.Option(None, "--title", help="The page's heading (default: xsae report)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    v: VizSettings = None,  # type: ignore[assignment]
) -> None:
    """One offline HTML page per set of runs: config, metrics, versions, curves and pictures of each."""
    from xsae_cli.viz.report import write_report

    cfg = ctx.obj.config
    _refuse(output, force)
    summary = write_report(list(run_dirs), output, method=v.method, dpi=v.dpi, seed=cfg.hardware.seed, title=title, max_image_mb=v.max_image_mb)
    out.emit(summary, _report_written)


def _report_written(d: dict) -> None:
    rows = [[s["name"], s["kind"], str(s["tables"]), str(sum(s["figures"].values())), str(len(s["notes"]))] for s in d["sections"]]
    out.console.print(out.table("viz report", ["run", "kind", "tables", "pictures", "notes"], rows))
    _written(d)


@app.command("align")
@renamed("output", "--output")
@options("viz", into="v", only=("dpi",))
def align(
    ctx: typer.Context,
    report_path: Path = typer.Argument(..., help="report.json of `xsae align transfer`, or its --out folder."),
    output: Path = typer.Option(Path("align_plots"), "--out", "-o", help="A folder (align_bars.<format> and align_heatmap.<format>) or one .png/.svg file holding both."),
    fmt: str | None = typer.Option(None, "--format", help="png or svg (default: the output's suffix, else format in the viz config section)."),
    metric: str = typer.Option("r2", "--metric", help="Score the bars show: r2, cosine, latent_r, f1 or matched_fraction."),
    force: bool = typer.Option(False, "--force", help="Replace existing output files."),
    v: VizSettings = None,  # type: ignore[assignment]
) -> None:
    """Alignment pictures: matched latents' correlation heatmap, and each mapper next to its null, 2nd-SAE reference and upper bound per layer pair and direction."""
    from xsae_cli.viz.align import plot_align
    from xsae_cli.viz.common import resolve_format

    fmt = resolve_format(output, fmt, v.format if v.format in ("png", "svg") else "png", ("png", "svg"), folder_ok=True)
    summary = plot_align(report_path, output, fmt=fmt, metric=metric.lower(), dpi=v.dpi, force=force)
    for note in summary["notes"]:
        out.warn(note)
    out.emit(summary, _align_written)


def _align_written(d: dict) -> None:
    panels = ", ".join(f"{k} {n} panels" for k, n in d["panels"].items())
    out.console.print(f"wrote [bold]{', '.join(d['files'])}[/bold] ({d['metric']}; {len(d['layer_pairs'])} layer pairs; {panels})")
