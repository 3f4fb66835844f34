"""`xsae sane`: Universal SANE: embed model weights, train the autoencoder, find lineage and neighbours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from xsae_cli.commands.options import options, renamed, split_list
from xsae_cli.core import console as out
from xsae_cli.core.errors import XsaeError
from xsae_cli.sane.settings import CalibrateSettings, EmbedSettings, LineageSettings, SaneTrainSettings

app = typer.Typer(help="Universal SANE: embed model weights, train the autoencoder, find lineage and neighbours.", no_args_is_help=True)


def _tokenise(bar: Any, names: list[str], cs: int, scheme: Any, *, force: bool = False, strict: bool = False) -> list[tuple[Any, float, int]]:
    """Tokenise (or find cached) each model with a progress bar: (TokenizedModel, seconds, bytes read; 0 = cached)."""
    import time

    from xsae_cli.sane.dataset import TokenizedModel, model_source, tokenize_to_cache
    from xsae_cli.sane.tokenizer import model_chunk_count
    from xsae_cli.zoo.weights import tensor_index

    done = []
    for name in names:
        src = model_source(name)
        # a derived view's chunk count is known only once it is built: an open-ended bar then
        total = model_chunk_count(tensor_index(src.resolved), cs) if scheme.view == "weights" else None
        task = bar.add_task(f"tokenise {src.name}", total=total, unit="chunks")
        read = [0]

        def cb(chunks: int, nbytes: int, task: Any = task, read: list = read) -> None:
            read[0] = nbytes
            bar.update(task, completed=chunks)

        t0 = time.perf_counter()
        folder = tokenize_to_cache(src, cs, scheme, force=force, warn=out.warn, on_tensor=cb, strict=strict)
        tm = TokenizedModel(folder, src.name)
        bar.update(task, total=tm.n_chunks, completed=tm.n_chunks)
        # MB/s of the model's own files (a derived view reads them twice and writes far fewer chunks)
        size = sum(f.stat().st_size for f in src.resolved.weight_files) if read[0] else 0
        done.append((tm, time.perf_counter() - t0, size))
    return done


def _scheme(s: Any, view: str | None = None) -> Any:
    """The coordinate scheme of the [sane] settings ``s`` (``view`` overrides theirs)."""
    from xsae_cli.sane.tokenizer import CoordScheme
    from xsae_cli.sane.views import get_view

    v = get_view(view or s.view).name  # an unknown view: one line listing the registered ones
    return CoordScheme(layer_keywords=tuple(s.layer_keywords), view=v)


def _model_names(models: list[str] | None, zoo: str | None) -> list[str]:
    from xsae_cli.zoo.registry import Registry

    if models and zoo:
        raise XsaeError("--models and --zoo are both given", "pass one of them")
    if models:
        names = split_list(models) or []
        if not names:
            raise XsaeError("--models is empty", "pass model names separated by commas, e.g. --models a,b")
        return names
    if zoo:
        if zoo not in ("demo", "all"):
            raise XsaeError(f"unknown --zoo '{zoo}'", "use --zoo demo (every model in the catalogue) or --models a,b,c")
        names = Registry().names()
        if not names:
            raise XsaeError("the zoo catalogue is empty", "run `xsae zoo demo` (or `xsae zoo add SOURCE`) first")
        return names
    raise XsaeError("no models given", "pass --zoo demo or --models a,b,c")


@app.command("tokenize")
@options("sane", into="settings", only=("view", "chunk_size", "strict"))
def tokenize(
    ctx: typer.Context,
    names: list[str] = typer.Argument(..., help="Zoo names or model paths."),
    force: bool = typer.Option(False, "--force", help="Re-tokenise even when cached."),
    settings: SaneTrainSettings = None,  # type: ignore[assignment]
) -> None:
    """Cut models' weights (or their token-space circuits) into chunks with depth/position/kind coordinates, cached on disk."""
    cs = settings.chunk_size
    with out.progress() as bar:
        done = _tokenise(bar, names, cs, _scheme(settings), force=force, strict=settings.strict)
    rows = [
        {
            "name": tm.name,
            "n_chunks": tm.n_chunks,
            "n_tensors": tm.manifest["n_tensors"],
            "chunk_size": cs,
            "scheme": tm.scheme,
            "view": tm.manifest.get("view", {}).get("view", "weights"),
            "outlier_directions": tm.manifest.get("view", {}).get("outlier_directions"),  # circuits: embedding directions shrunk
            "seconds": secs,
            "mb_per_second": (nbytes / 1e6 / secs) if nbytes else None,
            "cached": nbytes == 0,
            "cache": str(tm.folder),
        }
        for tm, secs, nbytes in done
    ]

    def render(data: list[dict[str, Any]]) -> None:
        out.console.print(
            out.table(
                "tokenised",
                ["model", "view", "chunks", "tensors", "seconds", "MB/s", "cache"],
                [[r["name"], r["view"], f"{r['n_chunks']:,}", r["n_tensors"], f"{r['seconds']:.2f}", "cached" if r["cached"] else f"{r['mb_per_second']:.0f}", r["cache"]] for r in data],
            )
        )

    out.emit(rows, render)


@app.command("train")
@options("sane", into="settings")
def train(
    ctx: typer.Context,
    zoo: str | None = typer.Option(None, "--zoo", help="'demo': every model in the catalogue."),
    models: list[str] | None = typer.Option(None, "--models", help="Zoo names or paths (repeat, or separate with commas)."),
    out_dir: Path = typer.Option(Path("runs/sane"), "--out", "-o", help="Run folder (checkpoint_epoch_N/ inside)."),
    force: bool = typer.Option(False, "--force", help="Delete existing checkpoints and start over (default: resume)."),
    settings: SaneTrainSettings = None,  # type: ignore[assignment]
) -> None:
    """Train the SANE autoencoder on a zoo; resumes from the last checkpoint in --out."""
    from xsae_cli.core.runlock import owned
    from xsae_cli.sane.train import preflight
    from xsae_cli.sane.train import train as run_train

    hw = ctx.obj.config.hardware
    settings = settings.replace(seed=hw.seed, device=hw.device)
    names = _model_names(models, zoo)
    cs = settings.chunk_size
    scheme = _scheme(settings)
    model_cfg = settings.model_config()
    with owned(out_dir), out.progress() as bar:  # held from the first check: a second writer is refused before tokenising
        preflight(out_dir, cs, scheme.scheme_id, force, settings)
        tms = [tm for tm, _s, _b in _tokenise(bar, names, cs, scheme, strict=settings.strict)]
        state: dict[str, Any] = {}

        def on_step(step: int, total_steps: int, losses: dict[str, float]) -> None:
            if "task" not in state:
                state["task"] = bar.add_task("train", total=total_steps * settings.batch_size, unit="windows")
            bar.update(state["task"], completed=step * settings.batch_size, description=f"train loss {losses['loss']:.3f}")

        result = run_train(tms, out_dir, settings, model_cfg, scheme, force=force, on_step=on_step, info=out.info, warn=out.warn)
    if not result.is_main:  # the other processes of a launch: rank 0 reports
        return
    summary = {
        "out": str(out_dir),
        "models": [t.name for t in tms],
        "epochs_done": result.epochs_done,
        "resumed_from": result.resumed_from,
        "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
        "history": result.history,
    }

    def render(d: dict[str, Any]) -> None:
        last = d["history"][-1] if d["history"] else None
        tail = f", last loss {last['loss']:.4f}, {last['windows_per_second']:.1f} windows/s" if last else ""
        out.console.print(f"trained on {len(d['models'])} models for {d['epochs_done']} epochs{tail}; checkpoint [bold]{d['last_checkpoint']}[/bold]")

    out.emit(summary, render)


@app.command("embed")
@renamed("output_dir", "--output-dir")
@options("sane.embed", into="settings")
def embed(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint_epoch_N folder from `xsae sane train`."),
    models: list[str] | None = typer.Option(None, "--models", help="Zoo names or paths (repeat, or separate with commas)."),
    zoo: str | None = typer.Option(None, "--zoo", help="'demo': every model in the catalogue."),
    output_dir: Path = typer.Option(Path("out"), "--out", "-o", help="Where model_embeddings.json/.npz go."),
    force: bool = typer.Option(False, "--force", help="Replace existing embeddings."),
    view: str | None = typer.Option(None, "--view", help="What is tokenised (default: the view the checkpoint was trained on)."),
    settings: EmbedSettings = None,  # type: ignore[assignment]
) -> None:
    """One 512-d embedding per model (windows covering the whole model, or --max-windows evenly spaced ones, pooled)."""
    from xsae_cli.sane.embed import embed_models

    cfg = ctx.obj.config
    names = _model_names(models, zoo)
    s = settings
    with out.progress() as bar:
        result = embed_models(
            checkpoint,
            names,
            output_dir,
            window_size=s.window_size,
            batch_size=s.batch_size,
            device=cfg.hardware.device,
            view=view,
            force=force,
            warn=out.warn,
            progress=bar,
            max_windows=s.max_windows,
            layer_keywords=cfg.sane.layer_keywords,
            layout=s.format,
        )
    brief = {"written": result.get("written"), "dim": result["dim"], "models": result["models"], "config": result["config"]}

    def render(d: dict[str, Any]) -> None:
        out.console.print(
            out.table(
                "embedded",
                ["model", "chunks", "windows", "coverage", "seconds"],
                [[n, f"{m['n_chunks']:,}", m["windows"], f"{m['coverage']:.0%}", f"{m['seconds']:.2f}"] for n, m in d["models"].items()],
            )
        )
        out.console.print(f"wrote [bold]{d['written']['json']}[/bold] ({d['dim']}-d)")

    out.emit(brief, render)


@app.command("calibrate")
@options("sane.calibrate", into="settings")
def calibrate(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint_epoch_N folder from `xsae sane train`."),
    lineage: Path = typer.Option(..., "--lineage", help='JSON {"model": "its base", ...} of known descendants (zoo names or paths); at least two bases.'),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Where the calibrated checkpoint goes (default: <checkpoint>_calibrated)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    settings: CalibrateSettings = None,  # type: ignore[assignment]
) -> None:
    """Fit the per-kind pooling gains on known lineages, so embeddings weigh what survives fine-tuning."""
    from xsae_cli.sane.calibrate import calibrate_checkpoint, read_lineage

    target = out_dir or checkpoint.parent / f"{checkpoint.name}_calibrated"
    with out.progress() as bar:
        result = calibrate_checkpoint(
            checkpoint, read_lineage(lineage), target, force=force, max_windows=settings.max_windows, warn=out.warn, progress=bar, layer_keywords=ctx.obj.config.sane.layer_keywords
        )

    def render(d: dict[str, Any]) -> None:
        gains = ", ".join(f"{k} {v:.2f}" for k, v in d["kind_gains"].items())
        out.console.print(f"fitted on {d['n_models']} models of {d['n_bases']} lineages: {gains}; checkpoint [bold]{d['checkpoint']}[/bold]")

    out.emit(result, render)


@app.command("neighbors")
def neighbors(
    name: str = typer.Argument(..., help="A model in the embeddings file."),
    embeddings: Path = typer.Option(Path("out/model_embeddings.json"), "--embeddings", help="model_embeddings.json from `xsae sane embed`."),
    top: int | None = typer.Option(None, "--top", help="Show only the nearest N."),
) -> None:
    """The nearest models to NAME by cosine distance."""
    from xsae_cli.sane.embed import cosine_neighbors, read_embeddings

    rows = cosine_neighbors(read_embeddings(embeddings), name, top)
    data = {"model": name, "neighbors": [{"name": n, "cosine_distance": d} for n, d in rows]}
    out.emit(data, lambda d: out.console.print(out.table(f"nearest to {name}", ["model", "cosine distance"], [[r["name"], f"{r['cosine_distance']:.4f}"] for r in d["neighbors"]])))


@app.command("evaluate")
@options("sane.evaluate", into="settings")
def evaluate(
    ctx: typer.Context,
    out_dir: Path = typer.Option(Path("runs/sane-lineage"), "--out", "-o", help="Work folder: lineage zoo, caches, runs, lineage.json."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Score this SANE checkpoint in every fold (default: train one per fold, with its held-out types left out)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing lineage.json (the built zoo is reused)."),
    settings: LineageSettings = None,  # type: ignore[assignment]
) -> None:
    """Lineage benchmark: retrieval of each variant's base (held-out transform types) vs quantile and random-encoder baselines."""
    from xsae_cli.sane.evaluate import evaluate as run_eval
    from xsae_cli.sane.lineage.report import format_table

    settings = settings.replace(seed=ctx.obj.config.hardware.seed)
    fams, reals, seeds = settings.families, settings.real, settings.seeds
    if (out_dir / "lineage.json").exists() and not force:
        raise XsaeError(f"{out_dir / 'lineage.json'} already exists", "pass --force to replace it, or choose another --out")
    with out.progress() as bar:
        state: dict[str, Any] = {}
        from xsae_cli.sane.lineage.zoo import TRANSFORMS

        n_members = (len(fams) * seeds + len(reals)) * (1 + len(TRANSFORMS))

        def on_member(name: str) -> None:
            if "build" not in state:
                state["build"] = bar.add_task("build lineage zoo", total=n_members, unit="models")
            bar.advance(state["build"])

        def on_step(step: int, total: int, losses: dict[str, float]) -> None:
            if step == 1 or "task" not in state:
                state["task"] = bar.add_task("train SANE (fold)", total=total, unit="steps")
            bar.update(state["task"], completed=step, description=f"train SANE loss {losses['loss']:.3f}")

        result = run_eval(out_dir, settings, checkpoint, log=out.info, on_step=on_step, on_member=on_member, force=force)

    def render(r: dict[str, Any]) -> None:
        out.console.print(
            out.table(
                f"lineage retrieval of the base, held-out transform types ({r['n_bases']} bases, {r['n_variants']} variants): top-1 / MRR / AUROC",
                ["transform", "fold", "SANE", "quantile stats", "random encoder", "raw cosine", "base nearest (S / Q / R / C)"],
                format_table(r),
            )
        )
        for f in r["folds"]:
            p = f["pairs"]
            rec = f["reconstruction_held_out"]
            out.console.print(
                f"fold {f['fold']}: same-lineage pairs mAP / AUROC: SANE {p['sane']['map']:.3f} / {p['sane']['auroc']:.3f}, "
                f"quantile {p['quantile_baseline']['map']:.3f} / {p['quantile_baseline']['auroc']:.3f}, "
                f"random encoder {p['random_encoder_baseline']['map']:.3f} / {p['random_encoder_baseline']['auroc']:.3f}; "
                f"masked R^2 vs per-tensor mean {rec['r2_masked']:.3f} (visible {rec['r2_visible']:.3f})"
            )
        met = ", ".join(f"{k}: {'met' if v['met'] else 'NOT met ' + str(v['failing'])}" for k, v in r["goals"].items())
        out.console.print(f"goals: {met}")
        check = r["function_check_max_rel_logit_diff"]
        checked = f"max relative logit change {check:.1e}" if check is not None else "no function-preserving transform in this zoo"
        out.console.print(f"function-preserving transforms: {checked}; wrote {out_dir / 'lineage.json'}")

    out.emit(result, render)
