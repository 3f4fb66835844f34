"""Layered configuration: defaults in code <- xsae.toml <- XSAE_<SECTION>_<KEY> <- flags.

One frozen dataclass per group plus ``[hardware]``. Every value remembers where it came from, so
``xsae config show`` can say why a run used what it used. Mistakes are caught at load time with
the file and line named: an unknown key lists the valid ones and the closest match.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from xsae_cli.core.errors import XsaeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_FILE = "xsae.toml"


@dataclass(frozen=True)
class HardwareSettings:
    """Where and how computation runs; shared by every group."""

    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    launcher: str = "none"
    num_processes: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = "127.0.0.1"
    main_process_port: int = 29500
    accelerate_config: str = ""
    deepspeed_config: str = ""


@dataclass(frozen=True)
class ZooSettings:
    trust_remote_code: bool = False
    offline: bool = False
    revision: str = "main"


@dataclass(frozen=True)
class SaeSettings:
    arch: str = "topk"
    k: int = 32
    expansion: int = 8
    optimizer: str = "signum"
    lr: float = 0.0  # 0: the optimizer's default (adam 3e-4; signum 5e-3 / sqrt(d_sae / 2**14))
    batch_size: int = 4096
    context_size: int = 128
    tokens: str = "2M"
    corpus: str = "builtin"


@dataclass(frozen=True)
class SaneSettings:
    chunk_size: int = 64
    window_size: int = 1024
    batch_size: int = 4
    epochs: int = 10
    lr: float = 3e-4
    max_steps_per_epoch: int = 100
    latent_dim: int = 16
    d_model: int = 128
    mixed_precision: str = "no"
    layer_keywords: list[str] = field(default_factory=lambda: ["layers", "layer", "h", "blocks", "block", "blk", "mixer", "rwkv"])
    view: str = "circuits"  # what is tokenised: circuits (token-space, symmetry-free), canonical (sorted weights) or weights


@dataclass(frozen=True)
class AlignSettings:
    """`xsae align`: which layers, how much text, which SAEs and mappers, how hard to intervene."""

    layers: list[str] = field(default_factory=lambda: ["5", "6", "7"])  # A's blocks (B at the same relative depth) or a:b pairs
    corpus: str = "builtin"
    text_field: str = "text"
    limit: int = 0  # documents read from the corpus; 0 = all
    context_size: int = 128
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    max_train_pairs: int = 30000  # paired rows the mappers fit on (subsampled within the train documents)
    max_test_pairs: int = 20000
    arch: str = "topk"
    k: int = 32
    expansion: int = 4
    sae_tokens: str = "200k"  # training tokens per SAE (passes over the train documents' tokens)
    sae_batch_size: int = 2048
    mappers: list[str] = field(default_factory=lambda: ["procrustes", "ridge", "mlp"])  # names registered in align.mappers ("hypernet" = old name of mlp)
    hypernet_hidden: int = 256
    hypernet_epochs: int = 20
    hypernet_patience: int = 3
    hypernet_dropout: float = 0.1
    hypernet_lr: float = 0.001
    match_threshold: float = 0.5
    intervene_latents: int = 4
    intervene_contexts: int = 8
    intervene_mapper: str = "ridge"
    strength: float = 0.5  # pushed vector norm = strength x the layer's median token norm
    top_tokens: int = 10


@dataclass(frozen=True)
class RestoreSettings:
    preset: str = "tiny"  # tiny (tests, demo) or seed (the original 37M model)
    corpus: list[str] = field(default_factory=lambda: ["builtin"])  # builtin, .atf, .txt, .jsonl, .parquet
    steps: int = 2000
    batch_size: int = 16  # windows per training step
    seq_len: int = 0  # characters per training window; 0: the preset's max_position
    lr: float = 1e-3
    beam: int = 8  # predict: beams per gap length
    top: int = 5  # predict: restorations shown per gap
    max_gap: int = 10  # predict: longest restoration tried for [...]
    layer: int = -1  # sae: block whose output is hooked; -1: the middle block
    arch: str = "topk"
    k: int = 32
    expansion: int = 8
    sae_batch_size: int = 1024  # sae: activation rows per step
    epochs: int = 50  # sae: passes over the samples
    max_samples: int = 200  # sae: corpus windows streamed through the model


@dataclass(frozen=True)
class VizSettings:
    format: str = "png"  # static plots: png or svg (html for an interactive cluster plot)
    dpi: int = 150
    method: str = "pca"  # cluster projection: pca, tsne or umap (umap needs pip install umap-learn)
    page_size: int = 50  # latent cards the features dashboard renders at a time
    max_image_mb: float = 8.0  # report: pictures from run folders larger than this are listed, not embedded


SECTIONS: dict[str, type] = {
    "hardware": HardwareSettings,
    "zoo": ZooSettings,
    "sane": SaneSettings,
    "sae": SaeSettings,
    "align": AlignSettings,
    "restore": RestoreSettings,
    "viz": VizSettings,
}

# Variables under XSAE_ that are not config keys.
RESERVED_ENV = {"XSAE_HOME", "XSAE_CACHE", "XSAE_LAUNCHED", "XSAE_DEMO_DIR", "XSAE_CRASH_AT_STEP", "XSAE_BF16_ENCODER", "XSAE_SPARSE_BACKEND"}


@dataclass(frozen=True)
class Config:
    hardware: HardwareSettings
    zoo: ZooSettings
    sane: SaneSettings
    sae: SaeSettings
    align: AlignSettings
    restore: RestoreSettings
    viz: VizSettings
    sources: Mapping[str, str] = field(default_factory=dict)
    file: str | None = None

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def rows(self) -> list[tuple[str, str, Any, str]]:
        """(section, key, value, source) for every setting, in declaration order."""
        out = []
        for name, section in self.as_dict().items():
            for key, value in section.items():
                out.append((name, key, value, self.sources.get(f"{name}.{key}", "default")))
        return out


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _check_value(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise TypeError. TOML values must already be that type."""
    if typing.get_origin(tp) is list:
        if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
            return [str(v) for v in value]
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    return value


def _parse_text(text: str, tp: Any) -> Any:
    """Parse an environment variable or flag string into ``tp``."""
    if typing.get_origin(tp) is list:
        return [p.strip() for p in text.split(",") if p.strip()]
    if tp is bool:
        low = text.strip().lower()
        if low in {"1", "true", "yes", "on"}:
            return True
        if low in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    return text


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
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise XsaeError(f"cannot read config file {path}: {exc.strerror}", "check the --config path") from exc
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise XsaeError(f"{path}: invalid TOML ({exc})", "fix the syntax at that line") from exc


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
    env = os.environ if env is None else env
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    sources: dict[str, str] = {}
    types = {name: _field_types(cls) for name, cls in SECTIONS.items()}

    file_path: Path | None = None
    if path is not None:
        file_path = Path(path)
        if not file_path.exists():
            raise XsaeError(f"config file not found: {file_path}", "check the --config path")
    else:
        candidate = Path(cwd or os.getcwd()) / DEFAULT_FILE
        if candidate.exists():
            file_path = candidate

    if file_path is not None:
        data, text = _read_file(file_path)
        for section, table in data.items():
            if section not in SECTIONS:
                line = _line_of(text, section, None)
                raise _unknown("section", section, list(SECTIONS), f"{file_path}" + (f" line {line}" if line else ""))
            if not isinstance(table, dict):
                raise XsaeError(f"{file_path}: '{section}' must be a table", f"write it as [{section}] followed by key = value lines")
            for key, value in table.items():
                line = _line_of(text, section, key)
                where = f"{file_path}" + (f" line {line}" if line else "")
                if key not in types[section]:
                    raise _unknown("key", key, list(types[section]), where, f"[{section}]")
                tp = types[section][key]
                try:
                    values[section][key] = _check_value(value, tp)
                except TypeError:
                    raise XsaeError(
                        f"{where}: [{section}] {key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}",
                        f"write e.g. {key} = {_example(tp)}",
                    ) from None
                sources[f"{section}.{key}"] = f"file {file_path}" + (f":{line}" if line else "")

    for var, text in sorted(env.items()):
        if not var.startswith("XSAE_") or var in RESERVED_ENV:
            continue
        rest = var[5:].lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            continue
        key = rest[len(section) + 1 :]
        if key not in types[section]:
            raise _unknown("key", key, list(types[section]), f"environment variable {var}", f"[{section}]")
        tp = types[section][key]
        try:
            values[section][key] = _parse_text(text, tp)
        except ValueError:
            raise XsaeError(f"environment variable {var}={text!r}: must be {_type_name(tp)}", f"e.g. {var}={_example(tp)}") from None
        sources[f"{section}.{key}"] = f"env {var}"

    for section, table in (flags or {}).items():
        for key, value in table.items():
            if value is None:
                continue
            if key not in types[section]:
                raise _unknown("key", key, list(types[section]), "command line", f"[{section}]")
            values[section][key] = value
            sources[f"{section}.{key}"] = "flag --" + key.replace("_", "-")

    built = {name: cls(**values[name]) for name, cls in SECTIONS.items()}
    return Config(**built, sources=sources, file=str(file_path) if file_path else None)


def _example(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return '["a", "b"]'
    return {bool: "true", int: "42", float: "0.001", str: '"text"'}.get(tp, "...")


def xsae_home() -> Path:
    """XSAE_HOME (default ~/.cache/xsae): the zoo catalogue lives here."""
    return Path(os.environ.get("XSAE_HOME") or Path.home() / ".cache" / "xsae").expanduser()


def xsae_cache() -> Path:
    """XSAE_CACHE (default $XSAE_HOME/cache): derived files (converted GGUF, harvests) that can be rebuilt."""
    env = os.environ.get("XSAE_CACHE")
    return Path(env).expanduser() if env else xsae_home() / "cache"
