"""Files that never lose results: atomic writes, safe loading, refusal to overwrite, checkpoints.

Every writer here goes through a temporary file in the destination folder and ``os.replace``, so
a crash or Ctrl-C leaves either the old file or the new one, never half of one. A full disk (or a
full quota) is one :class:`DiskFullError` line naming the destination and the bytes it needs; the
temporary file is removed and the previous output stays as it was. Loading never unpickles
arbitrary objects: safetensors by default, ``torch.load(weights_only=True)`` otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xsae_cli.core.errors import XsaeError

#: errno values that mean "the device (or the user's quota) is full".
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: How libraries that lose the errno say it (safetensors' Rust writer: "... (os error 28)").
_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (?:28|122)\b|StorageFull|QuotaExceeded")
#: A failed write with less than this free at its destination is blamed on the disk: torch.save's
#: zip writer reports a full disk only as "unexpected pos".
_LOW_SPACE = 1 << 20


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KB``: sizes in messages and tables."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class DiskFullError(XsaeError):
    """A write that ran out of space: names the destination, the bytes it needs and the bytes free."""

    def __init__(self, path: Path, need: int, free: int | None, at_least: bool = False) -> None:
        self.path, self.need, self.free = Path(path), int(need), free
        room = f"; {free:,} bytes ({format_bytes(free)}) are free there" if free is not None else ""
        size = f"{'more than ' if at_least else ''}{self.need:,} bytes ({format_bytes(self.need)})"
        super().__init__(
            f"no space left on the device (or quota) to write {self.path}: it needs {size}{room}",
            "free some space or write somewhere else (nothing was half-written; any previous output is unchanged)",
        )


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes this process may still write where ``path`` lives (root may use the reserved blocks)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return int(blocks * st.f_frsize)


def ensure_room(path: str | os.PathLike[str], need: int) -> None:
    """Refuse a write of ``need`` bytes up front when the device plainly cannot hold it."""
    free = free_bytes(Path(path).parent)
    if free is not None and need > free:
        raise DiskFullError(Path(path), need, free)


def is_disk_full(exc: BaseException, where: str | os.PathLike[str]) -> bool:
    """Was ``exc`` (raised while writing under ``where``) caused by a full device or quota?"""
    seen: BaseException | None = exc
    for _ in range(8):  # the cause chain, bounded
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        if _FULL_TEXT.search(str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, (OSError, RuntimeError)):
        free = free_bytes(where)
        return free is not None and free < _LOW_SPACE
    return False


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_paths(*paths: str | os.PathLike[str], need: int | None = None) -> Iterator[list[Path]]:
    """Yield one temporary path beside each of ``paths``; they replace ``paths`` only if the block succeeds.

    Several outputs that belong together (an embedding's JSON and NPZ) are replaced together: a
    failure while writing any of them leaves every previous file as it was. ``need`` (total bytes,
    when known) is checked against the free space first and named in a full-disk error.
    """
    targets = [Path(p) for p in paths]
    for t in targets:
        t.parent.mkdir(parents=True, exist_ok=True)
    if need is not None and targets:
        ensure_room(targets[0], need)
    tmps: list[Path] = []
    try:
        for t in targets:
            fd, name = tempfile.mkstemp(prefix=f".{t.name}.", suffix=".tmp", dir=t.parent)
            os.close(fd)
            tmps.append(Path(name))
        yield list(tmps)
        for tmp in tmps:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            if tmp.exists():  # mkstemp makes 0600 files; results are shared like any file the user writes
                os.chmod(tmp, 0o666 & ~_umask())
        for tmp, t in zip(tmps, targets):
            os.replace(tmp, t)
    except XsaeError:
        raise
    except Exception as exc:
        if not targets or not is_disk_full(exc, targets[0].parent):
            raise
        written = sum(_size(t) for t in tmps)
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise DiskFullError(targets[0] if len(targets) == 1 else targets[0].parent, need or written, free_bytes(targets[0].parent), at_least=need is None) from exc
    finally:
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike[str], need: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    with atomic_paths(path, need=need) as (tmp,):
        yield tmp


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path, need=len(data)) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    from xsae_cli.core.console import dumps

    atomic_write_text(path, dumps(data) + "\n")


def _owner_tag() -> str:
    """``<host>-<pid>``: the temporary folder of :func:`atomic_dir` names its builder, so that a later
    run can tell the debris of a killed process from a folder another live process is building."""
    import socket

    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}"


#: Temporary folders in the old naming (no owner) older than this are debris.
LEGACY_TMP_SECONDS = 24 * 3600


def clean_stale_tmp(path: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.<name>.<host>-<pid>.*.tmp`` folders beside ``path`` whose builder on this host is gone
    (a ``kill -9`` during a harvest or a checkpoint), and unowned ones older than a day. Returns them."""
    import time

    path = Path(path)
    host, _pid = _owner_tag().rsplit("-", 1)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.)?[^/]*\.tmp$")
    removed: list[Path] = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if not m or not p.is_dir():
            continue
        if m.group("pid") is not None:
            if m.group("host") != host or _alive(int(m.group("pid"))):
                continue
        else:
            try:
                if time.time() - p.stat().st_mtime < LEGACY_TMP_SECONDS:
                    continue
            except OSError:
                continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@contextmanager
def atomic_dir(path: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and move it into place when complete.

    An existing ``path`` is refused unless ``force``; with ``force`` it is replaced only after the
    new folder is complete, so a failed run never destroys the previous result.
    """
    path = Path(path)
    refuse_overwrite(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner_tag()}.", suffix=".tmp", dir=path.parent))
    try:
        try:
            yield tmp
        except DiskFullError as exc:  # a file inside ran out of room: name the folder and all it needs
            raise DiskFullError(path, _size(tmp) + exc.need, free_bytes(path.parent), at_least=True) from exc
        except XsaeError:
            raise
        except Exception as exc:
            if is_disk_full(exc, path.parent):
                written = _size(tmp)
                shutil.rmtree(tmp, ignore_errors=True)
                raise DiskFullError(path, written, free_bytes(path.parent), at_least=True) from exc
            raise
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
    with atomic_path(path, need=safetensors_size(clean, metadata)) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def safetensors_size(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> int:
    """Bytes a safetensors file of ``tensors`` takes: data, plus a header estimated to within its padding."""
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    header = {k: {"dtype": str(t.dtype), "shape": list(t.shape), "data_offsets": [0, data]} for k, t in tensors.items()}
    if metadata:
        header["__metadata__"] = metadata  # type: ignore[assignment]
    return 8 + len(json.dumps(header, separators=(",", ":"))) + 8 + data


def _shares_storage(t: Any, tensors: dict[str, Any]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(1 for o in tensors.values() if o.untyped_storage().data_ptr() == ptr) > 1


#: Bits per element of every safetensors dtype (the format's own list; the Python package exposes
#: it only through torch, which a header check should not have to import).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}
_MAX_HEADER = 100_000_000  # the format's own limit on the header's length


def check_safetensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate a safetensors file's header against the format and the file's size; return the header.

    Everything the format promises is checked before any tensor is read: the header is a JSON
    mapping of tensor names to ``{dtype, shape, data_offsets}``; dtypes are known; dimensions are
    non-negative integers; each byte range holds exactly ``prod(shape)`` elements; the ranges tile
    the data section in order, with no overlap, gap or trailing bytes; ``__metadata__`` maps
    strings to strings. The safetensors library's own parser then reads the header as well, so a
    file passes here only if it would load. A truncated download, an interrupted copy or a crafted
    header shows up here with the path and the tensor named, instead of as an opaque error deep
    inside a model load (or as wrong numbers).
    """
    path = Path(path)
    if not path.exists():
        raise XsaeError(f"file not found: {path}", "check the path")
    if path.is_dir():
        raise XsaeError(f"{path} is a folder, not a safetensors file", "point at the .safetensors file")
    size = path.stat().st_size
    try:
        header = _read_safetensors_header(path, size)
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy"):  # the library's parser: the final word on what loads
            pass
    except XsaeError:
        raise
    except Exception as exc:  # ValueError/TypeError from the checks above, SafetensorError from the library
        reason = str(exc).replace("Error while deserializing header: ", "").splitlines()[0] if str(exc) else type(exc).__name__
        raise XsaeError(f"corrupt or truncated safetensors file {path}: {reason}", "re-download or re-create it") from exc
    return header


def _read_safetensors_header(path: Path, size: int) -> dict[str, Any]:
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError(f"{size} bytes is shorter than the 8-byte header length")
        n = int.from_bytes(raw, "little")
        if n <= 0 or n > size - 8 or n > _MAX_HEADER:
            raise ValueError(f"header length {n} does not fit a file of {size} bytes")
        text = fh.read(n)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:
                raise ValueError(f"tensor {k!r} is listed twice in the header")
            seen[k] = v
        return seen

    header = json.loads(text, object_pairs_hook=no_duplicates)
    if not isinstance(header, dict):
        raise TypeError(f"the header is a JSON {type(header).__name__}, not a mapping of tensor names")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError("__metadata__ must map strings to strings")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ValueError(f"tensor {name!r} is not a {{dtype, shape, data_offsets}} entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPE_BITS:
            raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPE_BITS)})")
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise ValueError(f"tensor {name!r} has shape {shape!r}, not a list of integers")
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor {name!r} has a negative dimension in shape {shape}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ValueError(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
        begin, end = offsets
        if begin < 0 or end < begin:
            raise ValueError(f"tensor {name!r} has reversed or negative data_offsets [{begin}, {end}]")
        numel = 1
        for d in shape:
            numel *= d
        bits = numel * SAFETENSORS_DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            raise ValueError(f"tensor {name!r}: shape {shape} of {dtype} needs {bits / 8:g} bytes but its data_offsets [{begin}, {end}] hold {end - begin}")
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin < at:
            raise ValueError(f"tensor {name!r} overlaps the tensor before it (data_offsets start at {begin}, before byte {at})")
        if begin > at:
            raise ValueError(f"tensor {name!r} leaves a gap (data_offsets start at {begin}, the data before ends at {at})")
        at = end
    data = size - 8 - n
    if at > data:
        raise ValueError(f"tensors need {8 + n + at} bytes but the file has {size}")
    if at < data:
        raise ValueError(f"the file has {data - at} bytes after its last tensor")
    return header


def load_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, Any]:
    from safetensors.torch import load_file

    check_safetensors(path)
    return load_file(str(path), device=device)


#: Where a file's bytes show it was written by ``torch.save``: a zip archive (torch >= 1.6), or
#: the legacy pickle whose first object is torch's magic number (protocol 2+).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = re.compile(rb"^\x80[\x02-\x05]")
#: A code-free conversion a user can run where they trust the file; the fix for a pickled model.
CONVERT_PICKLE_HINT = (
    "xsae never runs code from a model file; if you trust it, convert it once to safetensors "
    '(python -c "import torch; from safetensors.torch import save_file; '
    "save_file({k: v.contiguous() for k, v in torch.load('FILE', weights_only=False).items()}, 'model.safetensors')\") "
    "or re-save just the state dict with torch.save(model.state_dict(), ...)"
)


def safe_torch_load(path: str | os.PathLike[str], mmap: bool = False) -> Any:
    """``torch.load`` that only accepts tensors and plain containers.

    A file whose unpickling needs code objects (a pickled model class, a malicious payload) is
    refused with its path named: loading it would run code from the file. Files that are not
    ``torch.save`` output at all (empty, text, random bytes) are refused by their first bytes,
    before torch sees them; a damaged archive or pickle is refused with torch's reason.
    """
    import pickle
    import warnings

    path = Path(path)
    if not path.exists():
        raise XsaeError(f"file not found: {path}", "check the path")
    if path.is_dir():
        raise XsaeError(f"{path} is a folder, not a PyTorch checkpoint", "point at the .pt/.bin file")
    with open(path, "rb") as fh:
        head = fh.read(4)
    is_zip = head == _ZIP_MAGIC
    if not is_zip and not _PICKLE_MAGIC.match(head):
        what = "empty" if not head else "neither a torch.save zip archive nor a pickle"
        raise XsaeError(f"{path} is not a PyTorch checkpoint: the file is {what}", "re-create it with torch.save, or point at the right file")
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as exc:
        needs = pickle_code(path, is_zip)
        if needs:
            raise XsaeError(f"refused to load {path}: unpickling it would need code ({', '.join(needs[:3])})", CONVERT_PICKLE_HINT.replace("FILE", str(path))) from exc
        reason = re.search(r"WeightsUnpickler error: ([^\n]+)", str(exc))
        raise XsaeError(
            f"cannot read {path} safely: its pickle is damaged or is not a plain state dict ({reason.group(1).strip() if reason else 'weights_only refused it'})",
            "re-create it with torch.save(model.state_dict(), ...), or as safetensors",
        ) from exc
    except Exception as exc:  # RuntimeError (damaged zip), EOFError (cut pickle), KeyError/ValueError (bad records)
        first = re.split(r"(?<=\.)\s", str(exc).splitlines()[0])[0] if str(exc) else type(exc).__name__  # torch's first sentence
        raise XsaeError(f"cannot read PyTorch checkpoint {path}: {first.rstrip('.')}", "the file may be truncated or damaged; re-create it") from exc


def pickle_code(path: Path, is_zip: bool) -> list[str]:
    """The globals (classes, functions) a ``torch.save`` file's pickle would import beyond the
    tensors and containers ``weights_only`` allows, read with :mod:`pickletools` (which runs nothing).

    torch's own ``get_unsafe_globals_in_checkpoint`` stops at protocol-4 framing, which every
    pickled model class uses; ``pickletools`` reads every protocol.
    """
    import contextlib
    import io
    import pickletools
    import zipfile

    try:
        if is_zip:
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(name) if name else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return []
    found: list[str] = []
    strings: list[str] = []
    stream = io.BytesIO(data)
    with contextlib.suppress(ValueError, EOFError, IndexError, UnicodeDecodeError):  # a damaged pickle: what was read before the damage
        for _ in range(8):  # a legacy torch.save file is several pickles in a row
            if stream.tell() >= len(data):
                break
            for op, arg, _pos in pickletools.genops(stream):
                if isinstance(arg, str) and "UNICODE" in op.name:
                    strings.append(arg)
                elif op.name == "GLOBAL" and isinstance(arg, str):
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif op.name in ("INST", "OBJ"):
                    found.append(str(arg or "an INST/OBJ opcode").replace(" ", "."))
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except ImportError:  # the allow-list moved: treat torch's own names as safe
        allowed = set()
    return sorted({g for g in found if g not in allowed and not g.startswith(("torch.", "collections.OrderedDict"))})


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

    def latest_meta(self) -> dict[str, Any] | None:
        """The last complete checkpoint's meta.json (no tensors read): for checks before any work."""
        steps = self.steps()
        if not steps:
            return None
        meta = read_json(self.root / f"step_{steps[-1]:09d}" / "meta.json", "checkpoint metadata")
        meta.pop("skeleton", None)
        return meta

    def latest(self) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
        steps = self.steps()
        if not steps:
            return None
        d = self.root / f"step_{steps[-1]:09d}"
        meta = read_json(d / "meta.json", "checkpoint metadata")
        tensors = load_safetensors(d / "state.safetensors")
        return steps[-1], unflatten_state(tensors, meta.pop("skeleton")), meta
