"""SANE views as a registry: a view defined and registered in this file tokenises through the cache,
gets its own scheme id and falls back along its chain, with no other file changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.sane import views
from xsae_cli.sane.views import View, get_view, register_view, view_help, view_names


@pytest.fixture()
def squares():
    """A view of the squared weights (revision 3), registered for one test."""

    def build(resolved, warn=None):
        from xsae_cli.zoo.weights import iter_weights, tensor_index

        if getattr(resolved, "config", None) is None:
            return None, "wants a config"
        return (tensor_index(resolved), ((n, t.float() ** 2) for n, t in iter_weights(resolved)), {"view": "squares"}), ""

    view = register_view(View("squares", build, revision=3, fallback="weights", help="squared weights"))
    yield view
    del views._VIEWS["squares"]


def test_a_view_registered_in_a_test_tokenises_with_no_other_file_changed(squares, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from xsae_cli.sane.dataset import ModelSource, TokenizedModel, tokenize_to_cache
    from xsae_cli.sane.tokenizer import CoordScheme, view_of_scheme
    from xsae_cli.zoo.sources import resolve

    assert "squares" in view_names() and "squares (squared weights)" in view_help() and get_view("squares") is squares
    scheme = CoordScheme(view="squares")
    assert scheme.scheme_id.startswith("squares-v3-") and view_of_scheme(scheme.scheme_id) == "squares"
    assert CoordScheme.from_record(scheme.record(64)) == scheme and scheme.record(64)["view_revision"] == 3

    folder = tmp_path / "m"
    folder.mkdir()
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    save_file({"layers.0.w": w, "layers.1.w": -w}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "none"}')
    tm = TokenizedModel(tokenize_to_cache(ModelSource("m", resolve(str(folder)), "a" * 64), scheme=scheme, cache_dir=tmp_path / "cache"), "m")
    assert tm.manifest["view"] == {"view": "squares"} and tm.coord_scheme == scheme
    assert tm.manifest["tensors"][0]["mean"] == pytest.approx(float((w**2).mean()), rel=1e-5)

    bare = tmp_path / "bare.safetensors"  # no config: the view says why and the chain goes on
    save_file({"layers.0.w": w}, str(bare))
    warned: list[str] = []
    tb = TokenizedModel(tokenize_to_cache(ModelSource("bare", resolve(str(bare)), "b" * 64), scheme=scheme, cache_dir=tmp_path / "cache", warn=warned.append), "bare")
    assert tb.manifest["view"]["view"] == "weights" and tb.manifest["view"]["reason"] == "wants a config"
    assert len(warned) == 1 and "no squares view" in warned[0] and "tokenised as stored" in warned[0]


def test_unknown_view_lists_the_registered_ones() -> None:
    with pytest.raises(XsaeError, match=r"unknown view 'nope'.*--view circuits \| canonical \| weights"):
        get_view("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_view(View("weights", lambda r, w=None: (None, "")))
