"""The source registry: a source defined and registered here is resolved, catalogued, indexed and
streamed by `xsae zoo`'s service functions and its commands, with no other file changed."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xsae_cli.zoo.sources import (
    SOURCES,
    ResolvedModel,
    Source,
    TensorInfo,
    describe_sources,
    register_source,
    resolve,
)


class NumpyArchive(Source):
    """An ``.npz`` of named arrays: the index comes from each member's ``.npy`` header alone."""

    kind = "npz-test"
    describes = "a .npz archive (test source)"
    suffixes = (".npz",)

    def read_index(self, file: Path) -> list[TensorInfo]:
        out = []
        with zipfile.ZipFile(file) as z:
            for member in z.namelist():
                with z.open(member) as fh:
                    version = np.lib.format.read_magic(fh)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _fortran, dtype = read(fh)  # the header only, no data
                out.append(TensorInfo(member.removesuffix(".npy"), tuple(shape), str(dtype), file.name, int(np.prod(shape)) * dtype.itemsize))
        return out

    def read_weights(self, file: Path) -> Iterator[tuple[str, Any]]:
        import torch

        with np.load(file) as arrays:
            for name in arrays.files:  # one member decompressed at a time
                yield name, torch.from_numpy(arrays[name])

    def config(self, resolved: ResolvedModel) -> dict[str, Any] | None:
        return {"model_type": "npz-toy", "num_hidden_layers": 2, "hidden_size": 8}


@pytest.fixture()
def npz_source() -> Iterator[None]:
    register_source(NumpyArchive())  # the one registration line
    yield
    SOURCES.pop("npz-test", None)


@pytest.fixture()
def archive(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays = {
        "embed.weight": rng.standard_normal((10, 8)).astype(np.float32),
        "layers.0.w": rng.standard_normal((8, 8)).astype(np.float32),
        "layers.1.w": rng.standard_normal((8, 8)).astype(np.float32),
    }
    path = tmp_path / "toy.npz"
    np.savez(path, **arrays)
    return path, arrays


def test_a_source_registered_here_is_catalogued_listed_and_streamed(npz_source: None, archive: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    from xsae_cli.zoo.registry import Registry, add_model, resolve_entry
    from xsae_cli.zoo.weights import weight_rows

    path, arrays = archive
    assert "a .npz archive (test source)" in describe_sources()
    assert resolve(path).kind == "npz-test"
    reg = Registry(tmp_path / "home")
    entry = add_model(str(path), registry=reg)
    assert (entry.name, entry.kind, entry.params, entry.layers, entry.hidden, entry.model_type) == ("toy", "npz-test", 10 * 8 + 2 * 64, 2, 8, "npz-toy")
    assert [e.name for e in reg.list()] == ["toy"]
    resolved = resolve_entry("toy", reg)  # back through the catalogue's kind
    index = weight_rows(resolved)
    assert [(r["name"], tuple(r["shape"]), r["dtype"]) for r in index] == [(n, a.shape, "float32") for n, a in arrays.items()]
    streamed = weight_rows(resolved, stats=True, limit=2)
    assert [r["name"] for r in streamed] == ["embed.weight", "layers.0.w"]
    assert streamed[1]["mean"] == pytest.approx(float(arrays["layers.0.w"].mean()), rel=1e-5)


def test_the_zoo_commands_reach_it_through_the_registry(npz_source: None, archive: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process (the registration lives in this process): `zoo add`, `zoo list`, `zoo weights --stats`."""
    from typer.testing import CliRunner

    from xsae_cli.cli import app
    from xsae_cli.core import console

    path, arrays = archive
    monkeypatch.setenv("XSAE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(console, "state", console.OutputState())  # human output; one process, several commands
    runner = CliRunner()
    added = runner.invoke(app, ["zoo", "add", str(path), "--name", "toy"])
    assert added.exit_code == 0, added.output
    assert "added toy (npz-test, 208 parameters)" in added.output
    listed = runner.invoke(app, ["zoo", "list"])
    assert listed.exit_code == 0 and "toy" in listed.output and "npz-test" in listed.output
    shown = runner.invoke(app, ["zoo", "weights", "toy", "--stats"])
    assert shown.exit_code == 0, shown.output
    assert "toy: 3 tensors" in shown.output and all(name in shown.output for name in arrays)
    assert f"{float(arrays['embed.weight'].mean()):.4g}" in shown.output  # the streamed mean
