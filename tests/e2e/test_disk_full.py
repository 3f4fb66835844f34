"""A real full disk under `xsae sae export`: a 2 MB tmpfs mounted in a private mount namespace
(``unshare -rm``: no root needed where user namespaces are allowed; skipped elsewhere, where
tests/unit/core/test_io_diskfull.py still simulates the same failures in-process).

The export of a 4 MB SAE onto it fails in one line naming the destination and the bytes needed,
both when the free-space check refuses it up front and when the check is bypassed so the write
itself hits ENOSPC inside safetensors' writer; the previous export is intact and no temporary
file or folder is left.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import xsae_bin


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    where.mkdir(exist_ok=True)
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(where))}"], capture_output=True, check=False)
    return probe.returncode == 0


def _sae(path: Path, d_in: int, d_sae: int) -> Path:
    from xsae_cli.sae.formats import save_sae
    from xsae_cli.sae.models import SaeConfig, create_sae

    save_sae(create_sae(SaeConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=4, metadata={"hook_name": "blocks.0"})), path)
    return path


def test_sae_export_onto_a_full_disk(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs in a user namespace here (unshare -rm); the in-process tests cover the writers")
    small, big = _sae(tmp_path / "small", 16, 32), _sae(tmp_path / "big", 256, 2048)  # ~5 KB and ~4 MB of weights
    logs = tmp_path / "logs"
    logs.mkdir()
    xsae = " ".join(shlex.quote(a) for a in xsae_bin())
    # the same CLI entry point, with the up-front free-space check switched off: the write itself fails
    no_precheck = f"{shlex.quote(sys.executable)} -c 'import sys; import xsae_cli.core.io as io; io.ensure_room = lambda *a: None; from xsae_cli.cli import app; sys.argv[0] = \"xsae\"; app()'"
    q = {k: shlex.quote(str(v)) for k, v in {"mnt": mnt, "small": small, "big": big, "logs": logs}.items()}
    script = f"""
mount -t tmpfs -o size=2m tmpfs {q["mnt"]}
{xsae} sae export {q["small"]} {q["mnt"]}/out > {q["logs"]}/first.out 2>&1; echo $? > {q["logs"]}/first.rc
(cd {q["mnt"]}/out && sha256sum * > {q["logs"]}/before.sha)
{xsae} sae export {q["big"]} {q["mnt"]}/out --force > {q["logs"]}/pre.out 2> {q["logs"]}/pre.err; echo $? > {q["logs"]}/pre.rc
{no_precheck} sae export {q["big"]} {q["mnt"]}/out --force > {q["logs"]}/write.out 2> {q["logs"]}/write.err; echo $? > {q["logs"]}/write.rc
(cd {q["mnt"]}/out && sha256sum * > {q["logs"]}/after.sha)
ls -A {q["mnt"]} > {q["logs"]}/ls
"""
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr

    def read(name: str) -> str:
        return (logs / name).read_text()

    assert read("first.rc").strip() == "0", read("first.out")
    for case in ("pre", "write"):
        assert read(f"{case}.rc").strip() == "2", (case, read(f"{case}.err"))
        err = read(f"{case}.err").strip()
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in err, (case, err)
        assert lines[0].startswith("error: no space left on the device") and f"{mnt}/out" in lines[0] and "bytes" in lines[0], (case, lines[0])
        assert "needs 4,2" in lines[0] or "needs more than" in lines[0], (case, lines[0])  # the ~4.2 MB the SAE takes
    assert read("after.sha") == read("before.sha")  # the previous export is intact
    assert read("ls").split() == ["out"]  # no temporary file or folder left
