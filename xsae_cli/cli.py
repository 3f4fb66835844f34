"""The root ``xsae`` command: global options, the six groups, and one-line user errors.

Groups are mounted from ``commands/``; each is a thin Typer layer over a service package.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from xsae_cli import __version__
from xsae_cli.commands.options import options
from xsae_cli.core import console as out
from xsae_cli.core.config import Config, load_config
from xsae_cli.core.errors import XsaeError


@dataclass
class AppState:
    """What the root callback resolves once and every command reads through ``ctx.obj``."""

    config: Config
    config_path: str | None = None


class XsaeApp(typer.Typer):
    """Typer app that turns :class:`XsaeError` into one stderr line and exit code 2.

    ``--debug`` keeps the traceback for bug reports. Help text that names a registry's choices
    (``{choices:sae.arch}``) is filled in only when help is shown, so other commands never pay for
    importing the models.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            command = typer.main.get_command(self)
            argv = list(kwargs.pop("args", None) or (args[0] if args else sys.argv[1:]))
            if "--help" in argv or "-h" in argv:
                from xsae_cli.commands.helptext import honest_help
                from xsae_cli.commands.options import resolve_lazy_help

                resolve_lazy_help(command, argv)
                honest_help(command, argv)
            try:
                rc = command.main(args=argv, prog_name="xsae", standalone_mode=False)
            except typer.Exit as exc:
                rc = exc.exit_code
            except typer.TyperException as exc:  # a bad flag: one line, exit 2, like every other user mistake
                if type(exc).__name__ == "NoArgsIsHelpError":  # help was shown
                    sys.exit(2)
                where = getattr(getattr(exc, "ctx", None), "command_path", "xsae")
                message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
                raise XsaeError(message, f"see `{where} --help`") from None
            except typer.Abort:
                rc = 130
            if rc == 130:  # click turns Ctrl-C into exit code 130; it is not a user error
                out.err_console.print("interrupted", highlight=False)
            sys.exit(rc if isinstance(rc, int) else 0)
        except OSError as exc:  # a write outside the atomic writers (e.g. the SQLite catalogue) met a full disk
            import errno

            if exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) or out.state.debug or "--debug" in sys.argv:
                raise
            where = f" writing {exc.filename}" if exc.filename else ""
            out.err_console.print(f"[bold red]error:[/bold red] {escape(f'no space left on the device{where}')}. free some space and run the command again", highlight=False, soft_wrap=True)
            sys.exit(2)
        except XsaeError as exc:
            if out.state.debug or "--debug" in sys.argv:
                raise
            prefix = "interrupted: " if exc.exit_code == 130 else "[bold red]error:[/bold red] "
            out.err_console.print(f"{prefix}{escape(exc.one_line())}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)


app = XsaeApp(
    name="xsae",
    help="Study what neural networks learn, across models: zoo, SANE weight embeddings, SAEs, alignment, restoration, viz.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"xsae {__version__}")
        raise typer.Exit()


@app.callback()
@options("hardware", into="flags", raw=True)
def root(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", help="TOML config file (default: ./xsae.toml when present)."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    flags: dict = None,  # type: ignore[assignment]
) -> None:
    if json_out:
        out.enable_json()
    out.state.debug = debug
    cfg = load_config(config, flags=flags)
    ctx.obj = AppState(config=cfg, config_path=str(config) if config else None)
    from xsae_cli.core import launch

    name = launch.check_launcher(cfg.hardware.launcher)
    relaunching = name != "none" and not launch.in_launched_process() and ctx.invoked_subcommand is not None
    # Only a relaunch needs to know about CUDA: asking imports torch, which every other command would pay for.
    cpu = relaunching and (cfg.hardware.device == "cpu" or (cfg.hardware.device == "auto" and not _cuda_available()))
    if relaunching and not cpu:  # a GPU recipe on a machine without its GPUs fails now, not in every rank
        launch.check_gpus(cfg.hardware.num_processes, _cuda_count())
    if cfg.hardware.device != "auto" or cfg.hardware.dtype != "float32":
        # Fail before any work when the asked-for device or dtype is not there.
        from xsae_cli.core.hardware import resolve_device, resolve_dtype

        resolve_dtype(cfg.hardware.dtype, resolve_device(cfg.hardware.device))

    if relaunching:
        hw = cfg.hardware
        spec = launch.LaunchSpec(
            launcher=name,
            num_processes=hw.num_processes,
            num_machines=hw.num_machines,
            machine_rank=hw.machine_rank,
            main_process_ip=hw.main_process_ip,
            main_process_port=hw.main_process_port,
            accelerate_config=hw.accelerate_config,
            deepspeed_config=hw.deepspeed_config,
            cpu=cpu,
        )
        out.info(f"launching under {name} with {hw.num_processes * hw.num_machines} process(es)")
        raise typer.Exit(launch.relaunch(spec, sys.argv[1:]))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mount() -> None:
    from xsae_cli.commands import system

    system.register(app)
    from xsae_cli.commands import align, restore, sae, sane, viz, zoo

    app.add_typer(zoo.app, name="zoo")
    app.add_typer(sane.app, name="sane")
    app.add_typer(sae.app, name="sae")
    app.add_typer(align.app, name="align")
    app.add_typer(restore.app, name="restore")
    app.add_typer(viz.app, name="viz")


_mount()
