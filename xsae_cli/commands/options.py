"""Typer options generated from settings fields, and the option aliases shared by every command.

``@options("sae")`` gives a command one ``--flag`` per field of the ``[sae]`` section (spelling, help,
default and ``--help`` group from the field), collects the flags the user actually gave, layers them
on the loaded configuration (so ``config show``'s sources hold for the run) and passes the section's
settings object, already checked, to the command::

    @app.command("train")
    @options("sae", into="settings")
    def train(ctx: typer.Context, model: str = ModelOpt, settings: SaeRunSettings = None) -> None:
        train_run(model, settings)

One spelling per concept across commands: ``--out`` for every output path (``--output`` and
``--output-dir`` are hidden aliases for a release), and one list convention (a list option can be
repeated, and each value may hold comma-separated items: ``--hook a --hook b`` = ``--hook a,b``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from collections.abc import Callable, Sequence
from typing import Any, Optional

import typer

from xsae_cli.core.config import flag_name, sections
from xsae_cli.core.errors import XsaeError
from xsae_cli.core.settings import Section, base_type, field_types, meta_of, rule_text

_LAZY = re.compile(r"\{choices:([A-Za-z0-9_.]+)\}")


def split_list(values: Sequence[str] | None) -> list[str] | None:
    """The list convention: repeated values, each possibly comma-separated, flattened; None if not given."""
    if values is None:
        return None
    items = [part.strip() for v in values for part in str(v).split(",")]
    items = [i for i in items if i]
    return items


def _cli_type(tp: Any, parse: Any) -> Any:
    inner, _ = base_type(tp)
    if parse is not None:
        return Optional[str]  # noqa: UP045 (a type built at run time for Typer)
    if typing.get_origin(inner) is list or (typing.get_origin(inner) is tuple and Ellipsis in typing.get_args(inner)):
        return Optional[list[str]]  # noqa: UP045 (a type built at run time for Typer)
    if typing.get_origin(inner) is tuple:
        return Optional[str]  # noqa: UP045 (a type built at run time for Typer)
    if inner in (int, float, str, bool):
        return Optional[inner]  # noqa: UP045 (a type built at run time for Typer)
    return Optional[str]  # noqa: UP045 (a type built at run time for Typer)


def _default_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _help(sec: Section, f: dataclasses.Field) -> str:
    m = meta_of(f)
    text = m.help  # plain text; commands/helptext.py escapes it when help is shown
    if callable(m.choices):
        text += f" {{choices:{sec.name}.{f.name}}}"
    return text


def resolve_lazy_help(command: Any, argv: Sequence[str]) -> None:
    """Fill in ``{choices:section.key}`` markers of the command ``argv`` names from the registries.

    Only the command whose help is shown: reading a registry may import the models (torch), which
    ``xsae --help`` and every other command should not pay for.
    """
    cmd = command
    for token in argv:
        sub = getattr(cmd, "commands", {}).get(token)
        if sub is not None:
            cmd = sub
    secs = sections()
    for param in getattr(cmd, "params", []):
        help_text = getattr(param, "help", None)
        if help_text and "{choices:" in help_text:

            def fill(m: re.Match[str]) -> str:
                name, key = m.group(1).rsplit(".", 1)
                f = next(f for f in secs[name].fields() if f.name == key)
                return "(" + rule_text(meta_of(f)) + ")"

            param.help = _LAZY.sub(fill, help_text)


def options(
    *names: str,
    into: str | Sequence[str] = "settings",
    exclude: Sequence[str] = (),
    only: Sequence[str] | None = None,
    aliases: dict[str, Sequence[str]] | None = None,
    raw: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add a Typer option for every CLI field of the sections ``names``; pass each built settings
    object to the parameter of the same position in ``into``.

    ``raw``: pass the given flags (``{section: {key: value}}``) instead, for the root command,
    which loads the configuration itself.

    ``exclude`` / ``only`` are field names (``"tokens"``) or dotted (``"align.sae.tokens"``);
    ``aliases`` adds hidden old spellings for this command (``{"align.sae.tokens": ["--sae-tokens"]}``).
    """
    targets = [into] if isinstance(into, str) else list(into)
    if len(targets) != len(names):
        raise TypeError("options(): one `into` parameter per section")
    extra_aliases = {k: tuple(v) for k, v in (aliases or {}).items()}

    def wanted(sec: Section, f: dataclasses.Field) -> bool:
        dotted = f"{sec.name}.{f.name}"
        if not meta_of(f).cli or f.name in exclude or dotted in exclude:
            return False
        return only is None or f.name in only or dotted in only

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        secs = sections()
        hints = typing.get_type_hints(func)
        original = inspect.signature(func)
        kept = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in original.parameters.values() if p.name not in targets]
        if not any(p.name == "ctx" for p in kept):
            raise TypeError(f"{func.__name__}: a command with generated options needs a `ctx: typer.Context` parameter")
        taken: dict[str, str] = {}
        for p in kept:
            info = p.default
            for decl in getattr(info, "param_decls", None) or ():
                for spelling in str(decl).split("/"):
                    taken[spelling] = p.name
        generated: list[inspect.Parameter] = []
        plan: list[tuple[str, str, str, list[str]]] = []  # (param, section, field, alias params)
        for si, name in enumerate(names):
            sec = secs[name]
            types = field_types(sec.cls)
            for f in sec.fields():
                if not wanted(sec, f):
                    continue
                m = meta_of(f)
                flag = flag_name(f)
                tp = _cli_type(types[f.name], m.parse)
                inner, _ = base_type(types[f.name])
                decls = [f"{flag}/--no-{flag[2:]}"] if inner is bool else [flag]
                if m.short:
                    decls.append(m.short)
                for spelling in (flag, f"--no-{flag[2:]}") if inner is bool else (flag,):
                    if spelling in taken:
                        raise TypeError(f"{func.__name__}: {spelling} is both {taken[spelling]} and [{name}] {f.name}")
                    taken[spelling] = f"[{name}] {f.name}"
                pname = f"_s{si}_{f.name}"
                default = _default_text(sec.default_of(f))
                info = typer.Option(None, *decls, help=_help(sec, f), show_default=default or False, rich_help_panel=m.panel)
                generated.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=tp))
                alias_params = []
                for ai, alias in enumerate(m.aliases + extra_aliases.get(f"{name}.{f.name}", ()) + extra_aliases.get(f.name, ())):
                    if alias in taken:
                        continue  # an old spelling another option now owns
                    taken[alias] = f"[{name}] {f.name}"
                    aname = f"{pname}__a{ai}"
                    alias_decl = f"{alias}/--no-{alias[2:]}" if inner is bool else alias
                    generated.append(inspect.Parameter(aname, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(None, alias_decl, hidden=True), annotation=tp))
                    alias_params.append(aname)
                plan.append((pname, name, f.name, alias_params))

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            flags: dict[str, dict[str, Any]] = {name: {} for name in names}
            for pname, section, key, alias_params in plan:
                value = kwargs.pop(pname, None)
                for aname in alias_params:
                    old = kwargs.pop(aname, None)
                    if old is not None:
                        if value is not None:
                            raise XsaeError(f"--{key.replace('_', '-')} is given twice (once under an old spelling)", "pass it once")
                        value = old
                if isinstance(value, list):
                    value = split_list(value)
                flags[section][key] = value
            if raw:
                for target, name in zip(targets, names):
                    kwargs[target] = {name: flags[name]}
                return func(*args, **kwargs)
            ctx = kwargs.get("ctx") or next((a for a in args if isinstance(a, typer.Context)), None)
            if ctx is None:
                raise TypeError(f"{func.__name__}: @options needs the command to take a typer.Context")
            state = ctx.obj
            state.config = state.config.with_flags(flags)
            for target, name in zip(targets, names):
                kwargs[target] = state.config.section(name)
            return func(*args, **kwargs)

        params = kept + generated
        # Typer reads the signature and the annotations: give it real types (commands use string annotations).
        wrapper.__signature__ = original.replace(parameters=_ordered(params))  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not inspect.Parameter.empty}
        return wrapper

    return decorate


def _ordered(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """Positional parameters first, then keyword-only (the order inspect.Signature requires)."""
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword = [p.replace(kind=p.KEYWORD_ONLY) for p in params if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional + keyword


# ----------------------------------------------------------------------------------------------
# Old spellings
# ----------------------------------------------------------------------------------------------


def renamed(param: str, *old: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Accept the hidden old spellings ``old`` for the option of parameter ``param`` (one release).

    Used for the output path, now ``--out`` / ``-o`` on every command: ``@renamed("out_dir",
    "--output", "--output-dir")``. Giving both spellings is an error.
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(func)
        sig = inspect.signature(func)
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()]
        target = next((p for p in params if p.name == param), None)
        if target is None:
            raise TypeError(f"{func.__name__} has no parameter {param}")
        tp = hints.get(param, Any)
        inner, nullable = base_type(tp)
        hidden_name = f"_old_{param}"
        params.append(inspect.Parameter(hidden_name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(None, *old, hidden=True), annotation=Optional[inner]))  # noqa: UP045 (a type built at run time for Typer)
        required = getattr(target.default, "default", None) is ...
        if required:  # the new spelling may now be left out when an old one is given
            info = target.default
            info.default = None
            params = [p.replace(annotation=Optional[inner]) if p.name == param else p for p in params]  # noqa: UP045 (a type built at run time for Typer)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            old_value = kwargs.pop(hidden_name, None)
            if old_value is not None:
                if kwargs.get(param) is not None and kwargs.get(param) != getattr(target.default, "default", None):
                    raise XsaeError(f"{'/'.join(old)} and its new spelling are both given", "pass it once, as " + next(iter(getattr(target.default, "param_decls", ()) or ("--out",))))
                kwargs[param] = old_value
            if required and kwargs.get(param) is None:
                decl = next(iter(getattr(target.default, "param_decls", ()) or (param,)))
                raise XsaeError(f"missing option {decl}", f"pass {decl} PATH")
            return func(*args, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=_ordered(params))  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not inspect.Parameter.empty}
        return wrapper

    return decorate
