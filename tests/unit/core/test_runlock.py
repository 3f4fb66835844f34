"""Run folders are owned: a second writer is refused naming the owner; a dead owner's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.runlock import LOCK_NAME, RunLocked, owned, read_owner

HOLD = """
import sys, time
from xsae_cli.core.runlock import owned
with owned(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(folder: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_refused_then_dead_owner_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        with pytest.raises(RunLocked) as err, owned(run):
            pytest.fail("a second writer got the folder")
        line = err.value.one_line()
        assert f"pid {proc.pid}" in line and str(run) in line and "\n" not in line
        # kill -9: the holder cannot clean up, its record stays behind
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert read_owner(run)["pid"] == proc.pid
    with owned(run):
        assert read_owner(run)["pid"] == os.getpid()
    assert f"pid {proc.pid}" in capsys.readouterr().err  # the take-over is said
    assert not (run / LOCK_NAME).exists()  # a finished owner leaves no lock


def test_reentrant_and_no_folder_left_when_nothing_written(tmp_path: Path) -> None:
    run = tmp_path / "a" / "b"
    with owned(run), owned(run):  # a service calling another on the same folder
        assert (run / LOCK_NAME).exists()
    assert not (tmp_path / "a").exists()
    with owned(run):
        (run / "result.json").write_text("{}")
    assert (run / "result.json").exists() and not (run / LOCK_NAME).exists()


def test_stale_record_without_flock_uses_the_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where flock is missing (some network mounts), a record of a pid gone from this host is stale."""
    import errno
    import fcntl
    import json
    import socket

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": time.time()}))
    with owned(run):
        assert read_owner(run)["pid"] == os.getpid()
    (run / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": time.time()}))
    with pytest.raises(RunLocked, match=f"pid {os.getppid()}"), owned(run):
        pass


def test_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("keep")
    with pytest.raises(XsaeError, match="is a file, not a folder"), owned(f):
        pass
    with pytest.raises(XsaeError, match="is a file"), owned(f / "sub"):
        pass
    assert f.read_text() == "keep"
