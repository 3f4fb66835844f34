"""A crash (kill -9) in the middle of catalogue writes never corrupts the catalogue."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from xsae_cli.zoo.registry import Registry


def test_kill_during_writes_leaves_a_consistent_catalogue(tmp_path: Path) -> None:
    home = tmp_path / "home"
    script = textwrap.dedent(
        f"""
        from xsae_cli.zoo.registry import Registry, ModelEntry
        reg = Registry({str(home)!r})
        i = 0
        while True:
            reg.put(ModelEntry(name=f"m{{i}}", kind="hf_dir", source="s", path="p", params=i, extra={{"blob": "x" * 20000}}))
            i += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and len(Registry(home).list()) < 20:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    conn = sqlite3.connect(home / "zoo.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    entries = Registry(home).list()
    assert len(entries) >= 20
    assert all(e.extra["blob"] == "x" * 20000 for e in entries)  # no half-written rows
