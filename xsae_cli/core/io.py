"""Files that never lose results: atomic writes, safe loading, refusal to overwrite, checkpoints.

Every writer here goes through a temporary file in the destination folder and ``os.replace``, so
a crash or Ctrl-C leaves either the old file or the new one, never half of one. Loading never
unpickles arbitrary objects: safetensors by default, ``torch.load(weights_only=True)`` otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from xsae_cli.core.errors import XsaeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        if tmp_path.exists():  # mkstemp makes 0600 files; results are shared like any file the user writes
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    from xsae_cli.core.console import dumps

    atomic_write_text(path, dumps(data) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and move it into place when complete.

    An existing ``path`` is refused unless ``force``; with ``force`` it is replaced only after the
    new folder is complete, so a failed run never destroys the previous result.
    """
    path = Path(path)
    refuse_overwrite(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def refuse_overwrite(path: str | os.PathLike[str], force: bool) -> None:
    path = Path(path)
    if path.exists() and not force and (path.is_file() or any(path.iterdir())):
        raise XsaeError(f"{path} already exists", "pass --force to replace it, or choose another --out")


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    path = Path(path)
    if not path.exists():
        raise XsaeError(f"{what} not found: {path}", "check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise XsaeError(f"{path} is not valid JSON ({exc})", "re-create it or point at the right file") from exc


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (contiguous copies, shared storage split)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu().clone() if _shares_storage(v, tensors) else v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def _shares_storage(t: Any, tensors: dict[str, Any]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(1 for o in tensors.values() if o.untyped_storage().data_ptr() == ptr) > 1


def check_safetensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate a safetensors file's header against its size; return the header.

    A truncated download or an interrupted copy shows up here with the path named, before any
    tensor is read, instead of as an opaque error deep inside a model load.
    """
    path = Path(path)
    if not path.exists():
        raise XsaeError(f"file not found: {path}", "check the path")
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"tensors need {8 + n + end} bytes but the file has {size}")
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise XsaeError(f"corrupt or truncated safetensors file {path}: {exc}", "re-download or re-create it") from exc
    return header


def load_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, Any]:
    from safetensors.torch import load_file

    check_safetensors(path)
    return load_file(str(path), device=device)


def safe_torch_load(path: str | os.PathLike[str], mmap: bool = False) -> Any:
    """``torch.load`` that only accepts tensors and plain containers.

    A file whose unpickling needs code objects (a pickled model class, a malicious payload) is
    refused with its path named: loading it would run code from the file.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise XsaeError(f"file not found: {path}", "check the path")
    import re
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+", str(exc))
        reason = found.group(0) if found else "it holds Python objects beyond tensors and plain containers"
        raise XsaeError(
            f"refused to load {path}: unpickling it would need code ({reason})",
            "xsae loads only tensors and plain containers; re-save the state dict with torch.save(model.state_dict(), ...) or as safetensors",
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        if mmap and "mmap" in str(exc):
            return safe_torch_load(path, mmap=False)
        raise XsaeError(f"cannot read PyTorch checkpoint {path}: {str(exc).splitlines()[0]}", "the file may be truncated; re-create it") from exc


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, Any], Any]:
    """Split a nested state (optimizer state dicts, RNG states) into tensors and a JSON skeleton.

    Lets checkpoints hold everything a resume needs in safetensors + JSON, never a pickle.
    """
    import torch

    tensors: dict[str, Any] = {}

    def walk(o: Any, key: str) -> Any:
        if isinstance(o, torch.Tensor):
            tensors[key] = o
            return {"__tensor__": key}
        if isinstance(o, dict):
            return {"__dict__": [[walk(k, f"{key}.k{i}") if not isinstance(k, (str, int)) else k, walk(v, f"{key}.{i}")] for i, (k, v) in enumerate(o.items())]}
        if isinstance(o, (list, tuple)):
            return {"__list__": [walk(v, f"{key}.{i}") for i, v in enumerate(o)], "tuple": isinstance(o, tuple)}
        return o

    skeleton = walk(obj, prefix or "s")
    return tensors, skeleton


def unflatten_state(tensors: dict[str, Any], skeleton: Any) -> Any:
    def build(o: Any) -> Any:
        if isinstance(o, dict):
            if "__tensor__" in o:
                return tensors[o["__tensor__"]]
            if "__dict__" in o:
                return {k: build(v) for k, v in o["__dict__"]}
            if "__list__" in o:
                items = [build(v) for v in o["__list__"]]
                return tuple(items) if o.get("tuple") else items
        return o

    return build(skeleton)


class Checkpoints:
    """Numbered checkpoints in ``run_dir/checkpoints/step_<N>/`` (state.safetensors + meta.json).

    A checkpoint folder appears only when complete (built under a temporary name), so after a
    crash or ``kill -9`` :meth:`latest` returns the last complete one and training resumes from it.
    """

    def __init__(self, run_dir: str | os.PathLike[str], keep: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
        tensors, skeleton = flatten_state(state)
        target = self.root / f"step_{step:09d}"
        with atomic_dir(target, force=True) as tmp:
            save_safetensors(tensors, tmp / "state.safetensors")
            atomic_write_json(tmp / "meta.json", {"step": step, "skeleton": skeleton, **(meta or {})})
        for old in self.steps()[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(self.root / f"step_{old:09d}", ignore_errors=True)
        return target

    def steps(self) -> list[int]:
        if not self.root.exists():
            return []
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith("step_") and (p / "meta.json").exists():
                out.append(int(p.name[5:]))
        return sorted(out)

    def latest(self) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
        steps = self.steps()
        if not steps:
            return None
        d = self.root / f"step_{steps[-1]:09d}"
        meta = read_json(d / "meta.json", "checkpoint metadata")
        tensors = load_safetensors(d / "state.safetensors")
        return steps[-1], unflatten_state(tensors, meta.pop("skeleton")), meta
