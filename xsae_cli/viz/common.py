"""Helpers every viz renderer shares: output format resolution, reading JSON with named fields,
embedding data safely in HTML."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from xsae_cli.core.errors import XsaeError
from xsae_cli.viz.style import FORMATS

#: Suffixes of formats xsae does not write: PNG bytes in a file named .jpg would open as a broken image.
OTHER_IMAGE_SUFFIXES = ("jpg", "jpeg", "gif", "bmp", "tif", "tiff", "webp", "pdf", "eps", "ps", "ico", "avif", "heic")


def resolve_format(output: Path, fmt: str | None, default: str = "png", allowed: tuple[str, ...] = FORMATS, folder_ok: bool = False) -> str:
    """The output format: ``--format`` if given, else the output's suffix, else ``default``.

    A ``--format`` that contradicts the file's suffix is refused rather than writing a PNG named .svg;
    so is a suffix of a format xsae does not write (``.jpg``, ``.gif``, ...) and, unless the command
    writes a folder of figures (``folder_ok``), an output that is an existing folder.
    """
    output = Path(output)
    suffix = output.suffix.lower().lstrip(".")
    if output.is_dir() and not folder_ok:
        raise XsaeError(f"--out {output} is a folder", f"name a file in it, e.g. {output / ('figure.' + (fmt or default))}")
    if suffix in OTHER_IMAGE_SUFFIXES:
        good = fmt if fmt in allowed else default if default in allowed else allowed[0]
        raise XsaeError(f"--out {output}: xsae writes {', '.join(allowed)} here, not .{suffix}", f"name it {output.with_suffix('.' + good).name}")
    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in allowed:
            raise XsaeError(f"unknown --format '{fmt}'", f"use one of: {', '.join(allowed)}")
        if suffix in allowed and suffix != fmt:
            raise XsaeError(f"--format {fmt} does not match the output file {output}", f"name it {output.with_suffix('.' + fmt).name} or drop --format")
        return fmt
    if suffix in allowed:
        return suffix
    if default not in allowed:
        raise XsaeError(f"[viz] format '{default}' is not one of {', '.join(allowed)}", "fix [viz] format in xsae.toml or XSAE_VIZ_FORMAT")
    return default


def require(obj: Any, field: str, path: Path | str, where: str = "", kind: type | tuple[type, ...] | None = None) -> Any:
    """``obj[field]``, or an XsaeError naming the file and the field."""
    at = f" {where}:" if where else ""
    if not isinstance(obj, dict) or field not in obj:
        raise XsaeError(f"{path}:{at} missing field '{field}'", "is this the file the command expects? re-create it with the xsae command that writes it")
    value = obj[field]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise XsaeError(f"{path}:{at} field '{field}' must be {_article(names)}, got {type(value).__name__}", "re-create the file with the xsae command that writes it")
    return value


def _article(name: str) -> str:
    return {"dict": "an object", "list": "a list", "str": "a string", "int": "an integer", "float": "a number", "int or float": "a number"}.get(name, name)


def script_json(data: Any) -> str:
    """JSON safe to place inside ``<script type="application/json">``: no ``</script>``, no ``<!--``."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_default)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)
