"""Layered configuration: defaults in code <- xsae.toml <- XSAE_<SECTION>_<KEY> <- flags.

Every section is a settings dataclass registered by its service (see :mod:`xsae_cli.core.settings`):
``[hardware]`` here, ``[sae]`` in ``sae/settings.py``, ``[align.sae]`` (a sub-table: the SAEs align
trains) in ``align/settings.py``, and so on. Every value remembers where it came from, so
``xsae config show`` can say why a run used what it used. Mistakes are caught at load time, before any
model is read, with the file and line, variable or flag named: an unknown key lists the valid ones and
the closest match; a value outside its field's range names the range.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.settings import (
    SECTIONS,
    InvalidSetting,
    Section,
    Settings,
    coerce,
    example_of,
    field_types,
    meta_of,
    register_section,
    setting,
    type_name,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_FILE = "xsae.toml"

#: The modules that register the groups' sections: import-light (no torch), one line per group.
SECTION_MODULES = (
    "xsae_cli.zoo.settings",
    "xsae_cli.sane.settings",
    "xsae_cli.sae.settings",
    "xsae_cli.align.settings",
    "xsae_cli.restore.settings",
    "xsae_cli.viz.settings",
)

LAUNCHERS = ("none", "accelerate", "deepspeed", "torchrun")


@dataclass(frozen=True)
class HardwareSettings(Settings):
    """Where and how computation runs; shared by every group (the root command's options)."""

    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps.", example="cpu")
    dtype: str = setting("float32", "The model's dtype: float32, bfloat16 or float16.", choices=("float32", "fp32", "float", "bfloat16", "bf16", "float16", "fp16", "half"))
    seed: int = setting(0, "Random seed; the same seed repeats a CPU run exactly.")
    launcher: str = setting("none", "Re-run the command under accelerate, deepspeed or torchrun.", choices=LAUNCHERS)
    num_processes: int = setting(1, "Processes per machine for --launcher.", ge=1)
    num_machines: int = setting(1, "Machines for --launcher.", ge=1)
    machine_rank: int = setting(0, "This machine's rank for --launcher.", ge=0)
    main_process_ip: str = setting("127.0.0.1", "Address of machine 0 for --launcher.")
    main_process_port: int = setting(29500, "Port on machine 0 for --launcher.", ge=1, le=65535)
    accelerate_config: str = setting("", "accelerate YAML config for --launcher accelerate (see recipes/accelerate/).")
    deepspeed_config: str = setting("", "DeepSpeed JSON config (ZeRO-1/2/3 for `sae train`; see recipes/deepspeed/).")


register_section("hardware", HardwareSettings)

# Variables under XSAE_ that are not config keys.
RESERVED_ENV = {"XSAE_HOME", "XSAE_CACHE", "XSAE_LAUNCHED", "XSAE_DEMO_DIR", "XSAE_CRASH_AT_STEP", "XSAE_BF16_ENCODER", "XSAE_SPARSE_BACKEND"}


def sections() -> dict[str, Section]:
    """Every registered section, after importing the modules that register them."""
    for module in SECTION_MODULES:
        importlib.import_module(module)
    return SECTIONS


class Config:
    """The effective settings of every section, with where each value came from.

    ``cfg.sae`` / ``cfg.hardware`` (top-level sections by attribute), ``cfg.section("align.sae")``
    (any section by name); :meth:`with_flags` layers a command's flags on top.
    """

    def __init__(self, values: dict[str, Any], sources: Mapping[str, str], file: str | None, inputs: dict[str, Any]) -> None:
        self._values = values
        self.sources = dict(sources)
        self.file = file
        self._inputs = inputs

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    def section(self, name: str) -> Any:
        if name not in self._values:
            raise KeyError(f"no config section [{name}]")
        return self._values[name]

    def with_flags(self, flags: Mapping[str, Mapping[str, Any]]) -> Config:
        """The same files and environment, with ``flags`` (section -> key -> value; None = not given)
        on top of the flags this config was built with."""
        merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (self._inputs.get("flags") or {}).items()}
        for section, table in flags.items():
            merged.setdefault(section, {}).update({k: v for k, v in table.items() if v is not None})
        return load_config(self._inputs.get("path"), cwd=self._inputs.get("cwd"), env=self._inputs.get("env"), flags=merged)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(obj) for name, obj in self._values.items()}

    def rows(self) -> list[tuple[str, str, Any, str]]:
        """(section, key, value, source) for every setting, in declaration order."""
        out = []
        for name, obj in self._values.items():
            for f in SECTIONS[name].fields():
                out.append((name, f.name, getattr(obj, f.name), self.sources.get(f"{name}.{f.name}", "default")))
        return out


def _unknown(kind: str, name: str, valid: list[str], where: str, scope: str = "") -> XsaeError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    scope = f" in {scope}" if scope else ""
    return XsaeError(f"{where}: unknown {kind} '{name}'{scope}", f"{hint}valid {kind}s: {', '.join(valid)}")


def _line_of(text: str, section: str, key: str | None) -> int | None:
    current = None
    for no, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        m = re.match(r"^\[\s*([A-Za-z0-9_.\-]+)\s*\]", stripped)
        if m:
            current = m.group(1)
            if key is None and current == section:
                return no
            continue
        if current == section and key is not None and re.match(rf"^{re.escape(key)}\s*=", stripped):
            return no
    return None


def _read_file(path: Path) -> tuple[dict[str, Any], str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise XsaeError(f"cannot read config file {path}: {exc.strerror}", "check the --config path") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise XsaeError(f"config file {path} is not UTF-8 text (byte {exc.start})", "save it as UTF-8 TOML") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise XsaeError(f"{path}: invalid TOML ({exc})", "fix the syntax at that line") from exc


def flag_name(f: dataclasses.Field) -> str:
    return meta_of(f).flag or "--" + f.name.replace("_", "-")


class _Layers:
    """Values and their sources, section by section, as the layers are read."""

    def __init__(self, secs: dict[str, Section]) -> None:
        self.secs = secs
        self.values: dict[str, dict[str, Any]] = {name: {} for name in secs}
        self.sources: dict[str, str] = {}
        self.types = {name: field_types(s.cls) for name, s in secs.items()}
        self.fields = {name: {f.name: f for f in s.fields()} for name, s in secs.items()}

    def set(self, section: str, key: str, raw: Any, source: str, *, text: bool, describe: Any) -> None:
        f = self.fields[section][key]
        tp = self.types[section][key]
        try:
            value = coerce(raw, tp, meta_of(f), text=text)
        except (TypeError, ValueError, XsaeError) as exc:
            reason = f" ({exc.message})" if isinstance(exc, XsaeError) else (f" ({exc})" if str(exc) else "")
            raise describe(f"must be {type_name(tp)}{reason}, got {raw!r}", example_of(tp, meta_of(f))) from None
        self.values[section][key] = value
        self.sources[f"{section}.{key}"] = source


def _table_keys(secs: dict[str, Section], name: str) -> list[str]:
    subs = [n[len(name) + 1 :] for n in secs if n.startswith(name + ".") and "." not in n[len(name) + 1 :]]
    return [f.name for f in secs[name].fields()] + subs if name in secs else subs


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Build the effective configuration.

    ``path`` is an explicit ``--config`` file (must exist); otherwise ``xsae.toml`` in ``cwd`` is
    used when present. ``flags`` maps section -> key -> value for command-line overrides; ``None``
    values mean "flag not given".
    """
    from xsae_cli.core.console import warn

    inputs = {"path": path, "cwd": cwd, "env": env, "flags": {k: dict(v) for k, v in (flags or {}).items()}}
    env = os.environ if env is None else env
    secs = sections()
    layers = _Layers(secs)

    file_path: Path | None = None
    if path is not None:
        file_path = Path(path)
        if not file_path.exists():
            raise XsaeError(f"config file not found: {file_path}", "check the --config path")
        if file_path.is_dir():
            raise XsaeError(f"config file {file_path} is a directory", "pass a TOML file to --config")
    else:
        candidate = Path(cwd or os.getcwd()) / DEFAULT_FILE
        if candidate.is_file():
            file_path = candidate

    if file_path is not None:
        data, text = _read_file(file_path)
        tops = sorted({n.split(".")[0] for n in secs})

        def walk(name: str, table: Any) -> None:
            if not isinstance(table, dict):
                raise XsaeError(f"{file_path}: '{name}' must be a table", f"write it as [{name}] followed by key = value lines")
            for key, value in table.items():
                sub = f"{name}.{key}"
                line = _line_of(text, name, key)
                where = f"{file_path}" + (f" line {line}" if line else "")
                if sub in secs and isinstance(value, dict):
                    walk(sub, value)
                    continue
                target, tkey = name, key
                if name in secs and key in secs[name].renamed:
                    moved = secs[name].renamed[key]
                    target, tkey = moved.rsplit(".", 1)
                    warn(f"{where}: [{name}] {key} is now [{target}] {tkey}; the old key works for this release")
                if target not in secs or tkey not in layers.fields[target]:
                    fixed = name in secs and key in secs[name].fixed
                    if fixed:
                        raise XsaeError(f"{where}: [{name}] {key} is set by the command itself", f"remove it from [{name}]")
                    raise _unknown("key", key, _table_keys(secs, name), where, f"[{name}]")

                def describe(problem: str, example: str, target: str = target, tkey: str = tkey, where: str = where) -> XsaeError:
                    return XsaeError(f"{where}: [{target}] {tkey} {problem}", f"write e.g. {tkey} = {example}")

                layers.set(target, tkey, value, f"file {file_path}" + (f":{line}" if line else ""), text=False, describe=describe)

        for section, table in data.items():
            if section not in tops:
                line = _line_of(text, section, None)
                raise _unknown("section", section, tops, f"{file_path}" + (f" line {line}" if line else ""))
            walk(section, table)

    by_prefix = sorted(secs.values(), key=lambda s: -len(s.env_prefix))
    for var, text_value in sorted(env.items()):
        if not var.startswith("XSAE_") or var in RESERVED_ENV:
            continue
        sec = next((s for s in by_prefix if var.startswith(s.env_prefix)), None)
        if sec is None:
            continue
        key = var[len(sec.env_prefix) :].lower()
        target, tkey = sec.name, key
        if key in sec.renamed:
            target, tkey = sec.renamed[key].rsplit(".", 1)
        if tkey not in layers.fields[target]:
            raise _unknown("key", key, [f.name for f in sec.fields()], f"environment variable {var}", f"[{sec.name}]")

        def describe_env(problem: str, example: str, var: str = var, text_value: str = text_value) -> XsaeError:
            return XsaeError(f"environment variable {var}={text_value!r}: {problem}", f"e.g. {var}={example.strip(chr(34))}")

        layers.set(target, tkey, text_value, f"env {var}", text=True, describe=describe_env)

    for section, table in (flags or {}).items():
        if section not in secs:
            raise XsaeError(f"command line: unknown config section [{section}]", "this is a bug in the command's options")
        for key, value in table.items():
            if value is None:
                continue
            if key not in layers.fields[section]:
                raise _unknown("key", key, list(layers.fields[section]), "command line", f"[{section}]")
            f = layers.fields[section][key]
            flag = flag_name(f)

            def describe_flag(problem: str, example: str, flag: str = flag) -> XsaeError:
                return XsaeError(f"{flag}: {problem}", f"e.g. {flag} {example.strip(chr(34))}")

            layers.set(section, key, value, f"flag {flag}", text=isinstance(value, str), describe=describe_flag)

    built: dict[str, Any] = {}
    for name, sec in secs.items():
        try:
            built[name] = sec.build(layers.values[name])
        except InvalidSetting as exc:
            raise _located(exc, name, layers, file_path) from None
    return Config(built, layers.sources, str(file_path) if file_path else None, inputs)


def _located(exc: InvalidSetting, section: str, layers: _Layers, file_path: Path | None) -> XsaeError:
    """An invalid value, named where the user wrote it: the flag, the variable or the file line."""
    source = layers.sources.get(f"{section}.{exc.key}", "default")
    f = layers.fields[section].get(exc.key)
    help_text = meta_of(f).help.rstrip(".") if f is not None else ""
    what = f" ({help_text})" if help_text else ""
    if source.startswith("flag "):
        flag = source[len("flag ") :]
        sep = " " if exc.rule.startswith("is ") else ": "  # "--mappers 'x' is not one of ...", "--k 0: must be >= 1"
        return XsaeError(f"{flag} {exc.value!r}{sep}{exc.rule}{what}", exc.hint)
    if source.startswith("env "):
        return XsaeError(f"environment variable {source[4:]}: [{section}] {exc.key} = {exc.value!r} {exc.rule}{what}", exc.hint)
    if source.startswith("file "):
        path, _, line = source[len("file ") :].rpartition(":")
        loc = f"{path} line {line}" if line.isdigit() else source[len("file ") :]
        return XsaeError(f"{loc}: [{section}] {exc.key} = {exc.value!r} {exc.rule}{what}", exc.hint)
    return XsaeError(f"[{section}] {exc.key} = {exc.value!r} {exc.rule}{what}", exc.hint)


def xsae_home() -> Path:
    """XSAE_HOME (default ~/.cache/xsae): the zoo catalogue lives here."""
    return _folder(Path(os.environ.get("XSAE_HOME") or Path.home() / ".cache" / "xsae").expanduser(), "XSAE_HOME")


def _folder(path: Path, name: str) -> Path:
    """``path``, refused when it (or a parent) is a file: every later mkdir there would fail with a traceback."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise XsaeError(f"{name} {path}: {p} is a file, not a folder", f"point {name} at a folder (it is made if missing)")
            break
    return path


def xsae_cache() -> Path:
    """XSAE_CACHE (default $XSAE_HOME/cache): derived files (converted GGUF, harvests) that can be rebuilt."""
    env = os.environ.get("XSAE_CACHE")
    return _folder(Path(env).expanduser(), "XSAE_CACHE") if env else _folder(xsae_home() / "cache", "XSAE_HOME")
