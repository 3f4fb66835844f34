"""Run folders are owned: one writer per ``--out`` at a time.

Every command that trains or writes into a run folder (``sae train``, ``sane train``, ``restore train``,
``restore sae``, ``align transfer``, ...) holds :func:`owned` around its work. The lock is the file
``<out>/.xsae.lock``, locked with ``fcntl.flock`` and holding the owner's pid, host and start time:

* a second writer is refused in one line that names the owner (pid, host, since when, the command);
* the kernel drops a flock when its process dies, however it dies (``kill -9`` too), so a lock file
  left by a dead process is not held by anyone and the next writer takes it over (and says so);
* on a file system without ``flock`` (some network mounts) the owner's pid is checked instead: a lock
  of a pid that no longer runs on this host is stale and taken over.

Inside one process the lock is re-entrant (a service that calls another on the same folder). In a
multi-process launch (``RANK`` set by torchrun / accelerate) only rank 0 takes it: the ranks of one
launch are one writer.

If the folder did not exist, it is made to hold the lock and removed again on exit when nothing but
the lock was written into it, so a command refused early leaves no folder behind.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xsae_cli.core.errors import XsaeError

LOCK_NAME = ".xsae.lock"

#: Folders this process holds (resolved path -> depth), so that nested holders do not lock themselves out.
_held: dict[Path, int] = {}


class RunLocked(XsaeError):
    """Another live process writes into the same run folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def read_owner(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The owner record of ``folder``'s lock file, or None (no file, or not readable as a record)."""
    try:
        data = json.loads((Path(folder) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process"
    since = owner.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    cmd = owner.get("command") or ""
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} (since {when}{', ' + cmd if cmd else ''})"


def _refuse(folder: Path, owner: dict[str, Any] | None) -> RunLocked:
    return RunLocked(
        f"{folder} is in use by {_describe(owner)}",
        "wait for it to finish (or stop it), or choose another --out",
    )


def _is_launch_follower() -> bool:
    try:
        return int(os.environ.get("RANK", "0") or 0) != 0
    except ValueError:
        return False


def _record() -> dict[str, Any]:
    argv = sys.argv[1:] if sys.argv and os.path.basename(sys.argv[0]).startswith("xsae") else sys.argv
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": round(time.time(), 3), "command": " ".join(["xsae", *argv])[:300]}


def _write_record(fd: int) -> None:
    data = json.dumps(_record()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _check_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise XsaeError(f"--out {folder} is a file, not a folder", "choose a folder (it is made if missing)")
    parent = next((p for p in folder.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise XsaeError(f"--out {folder}: {parent} is a file, not a folder", "choose a path under a folder")


def _make(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it made (deepest last) so that they can be removed again."""
    made: list[Path] = []
    for p in reversed([folder, *folder.parents]):
        if not p.exists():
            try:
                p.mkdir()
                made.append(p)
            except FileExistsError:
                pass
            except OSError as exc:
                if exc.errno == errno.ENAMETOOLONG:
                    raise XsaeError(f"--out {folder}: a name is longer than the file system allows", "choose a shorter path") from None
                raise XsaeError(f"cannot make the run folder {folder}: {exc.strerror or exc}", "choose a folder you can write to") from None
    return made


def _acquire_flock(fd: int, folder: Path) -> bool:
    """True when locked; False when this file system has no flock (use the pid check)."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refuse(folder, read_owner(folder)) from None
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise
    return True


def _acquire_pid(folder: Path, lock: Path) -> int:
    """Lock by O_EXCL creation; a record of a pid gone from this host is stale and replaced."""
    for _ in range(3):
        try:
            return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = read_owner(folder)
            if owner and owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) and _pid_alive(owner["pid"]):
                raise _refuse(folder, owner) from None
            if owner and owner.get("host") != socket.gethostname():
                raise _refuse(folder, owner) from None  # another host's process: its pid cannot be checked from here
            _warn_stale(folder, owner)
            lock.unlink(missing_ok=True)
    raise _refuse(folder, read_owner(folder))


def _warn_stale(folder: Path, owner: dict[str, Any] | None) -> None:
    if owner:
        from xsae_cli.core.console import warn

        warn(f"taking over {folder}: its lock was held by {_describe(owner)}, which is gone")


@contextmanager
def owned(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``folder`` (made if missing) for the duration; refuse (exit 2) if a live process holds it."""
    folder = Path(folder)
    _check_folder(folder)
    if _is_launch_follower():
        yield folder
        return
    key = folder.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield folder
        finally:
            _held[key] -= 1
        return
    made = _make(folder)
    lock = folder / LOCK_NAME
    fd = -1
    use_flock = True
    try:
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            use_flock = _acquire_flock(fd, folder)
            if not use_flock:
                os.close(fd)
                fd = -1
                break
            # The holder before us may have removed the file between our open and our flock:
            # then we hold an orphan inode, so start again on the file now at the path.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = -1
            if not folder.exists():
                made += _make(folder)
        if use_flock:
            previous = read_owner(folder)
            if previous and previous.get("pid") != os.getpid():
                _warn_stale(folder, previous)
        else:
            fd = _acquire_pid(folder, lock)
        _write_record(fd)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        _remove_made(made)
        raise
    _held[key] = 1
    try:
        yield folder
    finally:
        del _held[key]
        # Remove the record before letting go, so that nobody reads a finished owner as stale.
        try:
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
        _remove_made(made)


def _remove_made(made: list[Path]) -> None:
    """Remove the folders :func:`owned` made, deepest first, where nothing else was written into them."""
    for p in reversed(made):
        try:
            p.rmdir()
        except OSError:
            break
