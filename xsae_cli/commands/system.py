"""Root-level commands that are about xsae itself: ``doctor`` and ``config show``."""

from __future__ import annotations

import typer

from xsae_cli.core import console as out

config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
    app.add_typer(config_app, name="config")


def doctor(
    ctx: typer.Context,
    distributed: bool = typer.Option(False, "--distributed", help="Join the launcher's process group and all-reduce once (use with --launcher)."),
) -> None:
    """Versions, devices, XSAE_HOME and which demo models are present."""
    from xsae_cli.core import hardware, launch
    from xsae_cli.core.config import xsae_cache, xsae_home
    from xsae_cli.zoo import demo

    with out.status("reading package versions and probing devices (imports torch)"):
        report = {
            "versions": hardware.package_versions(),
            "hardware": hardware.device_summary(),
            "xsae_home": str(xsae_home()),
            "xsae_cache": str(xsae_cache()),
            "demo_models": demo.demo_status(),
        }
    if distributed:
        device = hardware.resolve_device(ctx.obj.config.hardware.device)
        report["distributed"] = launch.distributed_check(cpu=device.type == "cpu")

    def render(r: dict) -> None:
        rows = [[k, v or "[dim]not installed[/dim]"] for k, v in r["versions"].items()]
        out.console.print(out.table("versions", ["package", "version"], rows))
        hw = r["hardware"]
        out.console.print(f"devices: [bold]{', '.join(hw['devices'])}[/bold]  cpu threads: {hw['cpu_threads']}")
        out.console.print(f"XSAE_HOME: {r['xsae_home']}")
        out.console.print(f"XSAE_CACHE: {r['xsae_cache']}")
        demo_rows = [[name, "yes" if present else "[red]no[/red]", src] for name, (present, src) in r["demo_models"].items()]
        out.console.print(out.table("demo models", ["model", "present", "source"], demo_rows))
        if "distributed" in r:
            d = r["distributed"]
            out.console.print(f"rank {d['rank']}/{d['world_size']} backend={d['backend']} allreduce_sum={d['allreduce_sum']}")

    out.emit(report, render)


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """The effective configuration, each value with where it came from."""
    cfg = ctx.obj.config
    rows = cfg.rows()
    data = {
        "file": cfg.file,
        "values": cfg.as_dict(),
        "sources": {f"{s}.{k}": src for s, k, _, src in rows},
    }
    out.emit(data, lambda d: out.console.print(out.table("xsae config", ["section", "key", "value", "source"], [list(r) for r in rows])))
