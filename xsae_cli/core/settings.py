"""Settings as data: one dataclass per config section, each field declaring its help, range and flag.

Why: a setting used to be declared two or three times (the service's dataclass, a config section, a
Typer option) and merged by hand in the commands, so some could not be set at all and ``config show``
did not tell the truth. Now a service's own settings dataclass *is* its section:

    @dataclass(frozen=True)
    class SaeTrainSettings(Settings):
        k: int = setting(32, "Active latents per token (topk, batchtopk).", ge=1)

    register_section("sae", SaeTrainSettings)                    # [sae], XSAE_SAE_K, --k
    register_section("align.sae", SaeTrainSettings, k=16)        # the same fields, align's defaults

:func:`~xsae_cli.core.config.load_config` fills every registered section from defaults <- xsae.toml
<- ``XSAE_<SECTION>_<KEY>`` <- the flags a user gave, checks each value against its field (type,
range, choices) and names the file line, variable or flag of a bad one; constructing a settings object
from Python checks the same rules (``__post_init__``). :func:`~xsae_cli.core.cli_options.options`
generates the Typer options of a command from the same fields.

Settings modules hold no model code and import nothing heavy (no torch): ``xsae --help`` and
``xsae config show`` import every one of them.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from xsae_cli.core.errors import XsaeError

META_KEY = "xsae"
_MISSING: Any = dataclasses.MISSING


@dataclass(frozen=True)
class Meta:
    """What a field declares besides its type and default."""

    help: str
    choices: tuple[str, ...] | Callable[[], Sequence[str]] | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    flag: str | None = None  # the CLI spelling; default --name-with-dashes
    aliases: tuple[str, ...] = ()  # older spellings, accepted but hidden from --help
    short: str | None = None
    cli: bool = True  # False: settable from TOML and the environment only
    parse: Callable[[Any], Any] | None = None  # text or TOML value -> value (e.g. "2M" tokens)
    panel: str | None = None  # --help group
    example: str | None = None  # shown in the fix of a bad value
    #: On a resume from a checkpoint: "same" (changes the result: a different value is refused), "free"
    #: (logging, checkpointing, device: may differ), "grow" (a budget, tokens / steps / epochs: may grow; recorded).
    resume: str = "same"

    def choice_list(self) -> list[str] | None:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A settings field: its default, a one-sentence help text and its rules (see :class:`Meta`)."""
    m = Meta(help=help, **meta)
    if isinstance(default, (list, dict, set)):
        frozen = list(default) if isinstance(default, list) else default
        return field(default_factory=lambda: type(frozen)(frozen), metadata={META_KEY: m})
    return field(default=default, metadata={META_KEY: m})


def resume_changes(saved: dict[str, Any], now: Any) -> tuple[list[str], dict[str, list[Any]]]:
    """Between the settings a checkpoint was trained with (``saved``, its JSON) and ``now``'s: the
    differences a resume must refuse ("k 8 -> 4") and the budgets that grew ({"tokens": [old, new]}).

    The policy is each field's ``resume`` (see :class:`Meta`), so a new setting brings its own; a field
    the checkpoint does not record (an older run) is not compared."""
    import json

    def norm(v: Any) -> Any:
        return json.loads(json.dumps(v, default=str))

    refused: list[str] = []
    grown: dict[str, list[Any]] = {}
    for f in dataclasses.fields(now):
        policy = meta_of(f).resume
        if policy == "free" or f.name not in saved:
            continue
        old, new = norm(saved[f.name]), norm(getattr(now, f.name))
        if old == new:
            continue
        if policy == "grow" and isinstance(old, (int, float)) and isinstance(new, (int, float)) and new > old:
            grown[f.name] = [old, new]
            continue
        flag = meta_of(f).flag or "--" + f.name.replace("_", "-")
        refused.append(f"{flag} {old} -> {new}")
    return refused, grown


def refuse_changed_resume(where: Any, refused: list[str], grows: Sequence[str] = ()) -> None:
    """One line listing what differs from the checkpoint in ``where``; nothing when ``refused`` is empty."""
    if refused:
        more = f" (only {', '.join(grows)} may grow on a resume)" if grows else ""
        raise XsaeError(
            f"the checkpoints in {where} were trained with other settings: {'; '.join(refused)}",
            f"rerun with the checkpoint's values to resume, pass --force to start over, or choose another --out{more}",
        )


class InvalidSetting(XsaeError):
    """A value outside what its field allows; the config loader adds where the value came from."""

    def __init__(self, key: str, value: Any, rule: str, example: str | None = None, hint: str | None = None) -> None:
        self.key, self.value, self.rule, self.example = key, value, rule, example
        super().__init__(f"{key} = {value!r} {rule}", hint or (f"e.g. {example}" if example else None))


class Settings:
    """Base of every settings dataclass: values are checked when the object is built."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check_value(f, getattr(self, f.name))

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


# ----------------------------------------------------------------------------------------------
# Types
# ----------------------------------------------------------------------------------------------


def meta_of(f: dataclasses.Field) -> Meta:
    m = f.metadata.get(META_KEY)
    return m if isinstance(m, Meta) else Meta(help="")


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def base_type(tp: Any) -> tuple[Any, bool]:
    """(the type without Optional, whether None is allowed)."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007 (built at run time)
    return tp, False


def type_name(tp: Any) -> str:
    tp, nullable = base_type(tp)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = {int: "integers", float: "numbers", str: "strings"}.get(args[0] if args else str, "values")
        text = f"a list of {inner}"
    else:
        text = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))
    return text


def example_of(tp: Any, m: Meta | None = None) -> str:
    if m is not None and m.example:
        return m.example
    tp, _ = base_type(tp)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return '["a", "b"]'
    if m is not None and m.choice_list():
        return repr(m.choice_list()[0])  # type: ignore[index]
    return {bool: "true", int: "42", float: "0.001", str: '"text"'}.get(tp, "...")


def coerce(value: Any, tp: Any, m: Meta, *, text: bool) -> Any:
    """``value`` as type ``tp``; ``text``: it came from the environment or a flag (a string).

    TOML values must already have the type (a string is not an integer there); ``parse`` may
    accept other forms (``"2M"`` tokens). Raises TypeError or ValueError on a mismatch.
    """
    inner, nullable = base_type(tp)
    if value is None:
        if nullable:
            return None
        raise TypeError
    if text and nullable and isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
        return None
    if m.parse is not None and (isinstance(value, str) or not _is(value, inner)):
        return m.parse(value)
    origin = typing.get_origin(inner)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(inner) if a is not Ellipsis] or [str]
        items = value
        if isinstance(value, str):
            items = [p.strip() for p in value.split(",") if p.strip()] if text else None
        if not isinstance(items, (list, tuple)):
            raise TypeError
        if origin is tuple and Ellipsis not in typing.get_args(inner) and len(items) != len(args):
            raise ValueError(f"needs {len(args)} values")
        kinds = args if origin is tuple and len(args) == len(items) else [args[0]] * len(items)
        out = [_scalar(v, k, text=text or isinstance(v, str) and k is not str) for v, k in zip(items, kinds)]
        return tuple(out) if origin is tuple else out
    return _scalar(value, inner, text=text)


def _is(value: Any, tp: Any) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(tp) in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, tp) if isinstance(tp, type) else True


def _scalar(value: Any, tp: Any, *, text: bool) -> Any:
    if text and isinstance(value, str):
        s = value.strip()
        if tp is bool:
            low = s.lower()
            if low in {"1", "true", "yes", "on"}:
                return True
            if low in {"0", "false", "no", "off"}:
                return False
            raise ValueError
        if tp is int:
            return int(s)
        if tp is float:
            return float(s)
        return s
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a list of layers may mix 5 and "5:1"
        raise TypeError
    return value


# ----------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------


def rule_text(m: Meta) -> str:
    """The field's valid range or choices, in words ("an integer >= 1", "one of a, b")."""
    parts = []
    for name, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        bound = getattr(m, name)
        if bound is not None:
            parts.append(f"{op} {_num(bound)}")
    choices = m.choice_list()
    if choices:
        parts.append("one of " + ", ".join(choices))
    return " and ".join(parts)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()  # type: ignore[operator]
    return _MISSING


def check_value(f: dataclasses.Field, value: Any) -> None:
    """Raise :class:`InvalidSetting` if ``value`` breaks ``f``'s declared rules."""
    m = meta_of(f)
    if value is None:
        return
    items = value if isinstance(value, (list, tuple)) else [value]
    # Choices read from a registry (a callable) may import heavy modules: the field's own default is
    # ours and needs no check, so `xsae --help` and `config show` stay light.
    lazy_default = callable(m.choices) and value == _field_default(f)
    choices = None if lazy_default else m.choice_list()
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise InvalidSetting(f.name, value, "must be a finite number", m.example)
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            for name, ok in (("ge", lambda b, x=item: x >= b), ("gt", lambda b, x=item: x > b), ("le", lambda b, x=item: x <= b), ("lt", lambda b, x=item: x < b)):
                bound = getattr(m, name)
                if bound is not None and not ok(bound):
                    raise InvalidSetting(f.name, value, f"must be {rule_text(m)}", m.example)
        if choices is not None and isinstance(item, str) and item not in choices:
            import difflib

            close = difflib.get_close_matches(item, choices, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"e.g. {choices[0]}"
            raise InvalidSetting(f.name, item, f"is not {rule_text(m)}", hint=hint)


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """A registered config section: its name (dotted for sub-tables), class and context defaults."""

    name: str
    cls: type
    defaults: dict[str, Any]
    fixed: tuple[str, ...] = ()  # fields the service sets itself (not settable in this section)
    renamed: dict[str, str] = field(default_factory=dict)  # old key -> "section.key" it moved to
    help: str = ""

    def fields(self) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.cls) if f.name not in self.fixed and f.init]

    def default_of(self, f: dataclasses.Field) -> Any:
        if f.name in self.defaults:
            return self.defaults[f.name]
        if f.default is not _MISSING:
            return f.default
        if f.default_factory is not _MISSING:
            return f.default_factory()  # type: ignore[operator]
        return None

    def build(self, values: dict[str, Any]) -> Any:
        return self.cls(**{**self.defaults, **values})

    @property
    def env_prefix(self) -> str:
        return "XSAE_" + self.name.upper().replace(".", "_") + "_"


SECTIONS: dict[str, Section] = {}


def register_section(name: str, cls: type, *, fixed: Sequence[str] = (), renamed: dict[str, str] | None = None, help: str = "", **defaults: Any) -> type:
    """Make ``cls`` the config section ``[name]`` (dotted names are sub-tables: ``[align.sae]``).

    ``defaults`` override the class's own for this section only (one definition per setting, with
    the defaults of each place it is used); ``fixed`` fields are set by the service, not by users;
    ``renamed`` keeps old keys working (with a warning) for a release.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((set(defaults) | set(fixed)) - names)
    if unknown:
        raise TypeError(f"section {name}: {cls.__name__} has no field(s) {', '.join(unknown)}")
    if name in SECTIONS and SECTIONS[name].cls is not cls:
        raise TypeError(f"section {name} is registered twice ({SECTIONS[name].cls.__name__}, {cls.__name__})")
    SECTIONS[name] = Section(name, cls, dict(defaults), tuple(fixed), dict(renamed or {}), help or (cls.__doc__ or "").strip().splitlines()[0] if (help or cls.__doc__) else "")
    return cls
