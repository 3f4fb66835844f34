"""The original Universal SANE's model_embeddings.json (a bare {name: [floats]} map) is read like xsae's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_xsae
from xsae_cli.core.errors import XsaeError
from xsae_cli.sane.embed import cosine_neighbors, read_embeddings
from xsae_cli.viz.cluster import load_embeddings


def _plain(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    base = rng.normal(size=512)
    table = {"gpt2": base.tolist(), "gpt2-ft": (base + 0.01 * rng.normal(size=512)).tolist(), "other": rng.normal(size=512).tolist()}
    path = tmp_path / "model_embeddings.json"
    path.write_text(json.dumps(table))
    return path


def test_cluster_and_neighbors_read_the_plain_map(tmp_path: Path) -> None:
    path = _plain(tmp_path)
    emb = load_embeddings(path)
    assert emb.names == ["gpt2", "gpt2-ft", "other"] and emb.vectors.shape == (3, 512)
    assert emb.families == ["unknown"] * 3
    near = cosine_neighbors(read_embeddings(path), "gpt2")
    assert near[0][0] == "gpt2-ft" and near[0][1] < 0.01 < near[1][1]


def test_a_plain_map_with_a_bad_vector_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model_embeddings.json"
    path.write_text(json.dumps({"a": [1.0, 2.0], "b": ["x"]}))
    with pytest.raises(XsaeError, match=r"embeddings\['b'\]"):
        load_embeddings(path)


def test_viz_cluster_plots_the_original_file(tmp_path: Path) -> None:
    path = _plain(tmp_path)
    proc = run_xsae("viz", "cluster", "--input", str(path), "--out", str(tmp_path / "plot.svg"), "--method", "pca")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "plot.svg").read_text().lstrip().startswith("<?xml")
