"""A full disk (or quota) while writing: one DiskFullError naming the destination and the bytes it
needs; nothing half-written is left and the previous output is intact. Simulated in-process at
the lowest write each writer uses (``os.write``, safetensors' writer, numpy's), so the test runs
anywhere; tests/e2e/test_disk_full.py fills a real (tiny tmpfs) disk where the OS allows it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from xsae_cli.core import io
from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import (
    DiskFullError,
    atomic_dir,
    atomic_paths,
    atomic_write_bytes,
    atomic_write_text,
    load_safetensors,
    save_safetensors,
)


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_write_bytes_on_a_full_disk_names_path_and_bytes_and_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    target = tmp_path / "result.json"
    atomic_write_text(target, "old result")
    real_write = os.write

    def write_some_then_fail(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data[:10]))  # part of it lands, then the device is full
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(io.os, "write", write_some_then_fail)
    with pytest.raises(DiskFullError) as caught:
        atomic_write_bytes(target, b"x" * 5000)
    line = caught.value.one_line()
    assert str(target) in line and "5,000 bytes" in line and "free" in line and "\n" not in line
    assert caught.value.exit_code == 2 and isinstance(caught.value, XsaeError)
    assert target.read_text() == "old result"
    assert _leftovers(tmp_path, {"result.json"}) == []  # no temporary file left


def test_a_write_larger_than_the_free_space_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io, "free_bytes", lambda path: 100)
    writes: list[int] = []
    monkeypatch.setattr(io.os, "write", lambda fd, data: writes.append(len(data)) or len(data))
    with pytest.raises(DiskFullError, match=r"needs 1,000 bytes .*100 bytes .* are free"):
        atomic_write_bytes(tmp_path / "big.bin", b"y" * 1000)
    assert writes == [] and list(tmp_path.iterdir()) == []


def test_safetensors_writer_disk_full_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.zeros(3)}, target)
    import safetensors.torch

    class SafetensorError(Exception):
        """What safetensors' Rust writer raises: no errno, only its text."""

    def full(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    new = {"a": torch.ones(1000, 10)}
    with pytest.raises(DiskFullError) as caught:
        save_safetensors(new, target)
    need = caught.value.need
    assert 40_000 < need < 40_200 and str(target) in caught.value.one_line()  # 40,000 data bytes + the header
    assert torch.equal(load_safetensors(target)["a"], torch.zeros(3))
    assert _leftovers(tmp_path, {"w.safetensors"}) == []


def test_a_folder_that_runs_out_of_room_names_the_folder_and_keeps_the_previous_one(tmp_path: Path) -> None:
    target = tmp_path / "sae"
    with atomic_dir(target) as d:
        (d / "cfg.json").write_text("old")
    with pytest.raises(DiskFullError) as caught, atomic_dir(target, force=True) as d:
        (d / "first.bin").write_bytes(b"z" * 3000)
        raise OSError(errno.ENOSPC, "No space left on device")  # any write inside: numpy, torch, a library
    line = caught.value.one_line()
    assert str(target) in line and "more than 3,000 bytes" in line
    assert (target / "cfg.json").read_text() == "old" and sorted(p.name for p in target.iterdir()) == ["cfg.json"]
    assert _leftovers(tmp_path, {"sae"}) == []  # neither the new folder nor the old one's backup left


def test_a_library_that_loses_the_errno_is_blamed_on_the_disk_only_when_it_is_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.save on a full disk says only "unexpected pos"; the free space decides.
    def boom() -> None:
        with io.atomic_path(tmp_path / "ckpt.pt") as tmp:
            tmp.write_bytes(b"a")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of space: a real bug stays a bug
        boom()
    monkeypatch.setattr(io, "free_bytes", lambda path: 0)
    with pytest.raises(DiskFullError, match="ckpt.pt"):
        boom()
    assert list(tmp_path.iterdir()) == []


def test_results_written_together_are_replaced_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sane embed`'s JSON + NPZ: a full disk on the second leaves both previous files."""
    a, b = tmp_path / "model_embeddings.json", tmp_path / "model_embeddings.npz"
    a.write_text("old json")
    np.savez(b, x=np.zeros(2))
    old_b = b.read_bytes()
    with pytest.raises(DiskFullError, match="needs 9,000 bytes"), atomic_paths(a, b, need=9000) as (ta, tb):
        ta.write_text("new json")
        with open(tb, "wb") as fh:
            fh.write(b"PK")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert a.read_text() == "old json" and b.read_bytes() == old_b
    assert _leftovers(tmp_path, {a.name, b.name}) == []
