"""Training on the tiny zoo: the loss falls, resume equals an uninterrupted run, mismatches are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import load_safetensors
from xsae_cli.sane.model import SaneModelConfig
from xsae_cli.sane.settings import SaneTrainSettings as TrainSettings
from xsae_cli.sane.train import check_compatible, read_checkpoint_config, train

CFG = SaneModelConfig(d_model=32, n_heads=4, enc_layers=1, dec_layers=1, latent_dim=8)


def settings(**kw) -> TrainSettings:
    base = dict(epochs=2, batch_size=4, window_size=128, steps_per_epoch=4, device="cpu", seed=1, lr=1e-3)
    base.update(kw)
    return TrainSettings(**base)


def test_loss_decreases_on_tiny_zoo(tiny_models, tmp_path: Path) -> None:
    r = train(tiny_models, tmp_path / "run", settings(epochs=6, steps_per_epoch=6, lr=2e-3), CFG)
    losses = [h["loss"] for h in r.history]
    assert len(losses) == 6
    assert np.mean(losses[-3:]) < 0.9 * losses[0], losses
    assert np.mean([h["recon"] for h in r.history[-3:]]) < r.history[0]["recon"]
    assert r.history[-1]["windows_per_second"] > 0


def test_resume_equals_uninterrupted(tiny_models, tmp_path: Path) -> None:
    full = train(tiny_models, tmp_path / "full", settings(epochs=3), CFG)
    part = train(tiny_models, tmp_path / "part", settings(epochs=3), CFG, stop_after_epoch=1)
    assert part.epochs_done == 1
    rest = train(tiny_models, tmp_path / "part", settings(epochs=3), CFG)
    assert rest.resumed_from == 1 and rest.epochs_done == 3
    a = load_safetensors(full.last_checkpoint / "model.safetensors")
    b = load_safetensors(rest.last_checkpoint / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in rest.history]
    meta = read_checkpoint_config(full.last_checkpoint)
    assert meta["epoch"] == 3 and meta["chunk_size"] == 64 and meta["model"]["latent_dim"] == 8
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["checkpoint_epoch_1", "checkpoint_epoch_2", "checkpoint_epoch_3"]


def test_mismatched_checkpoints_are_refused_naming_both_values(demo_zoo, tiny_models, sane_cache: Path, tmp_path: Path) -> None:
    from xsae_cli.sane.dataset import TokenizedModel, model_source, tokenize_to_cache

    train(tiny_models[:2], tmp_path / "run", settings(epochs=1, steps_per_epoch=1), CFG)
    c32 = [TokenizedModel(tokenize_to_cache(model_source(n), chunk_size=32, cache_dir=sane_cache), n) for n in ("tiny-gpt2", "tiny-gemma")]
    with pytest.raises(XsaeError, match="chunk_size 64.*chunk_size 32"):
        train(c32, tmp_path / "run", settings(epochs=2, steps_per_epoch=1), SaneModelConfig(chunk_size=32, d_model=32, latent_dim=8))
    meta = read_checkpoint_config(tmp_path / "run" / "checkpoint_epoch_1")
    with pytest.raises(XsaeError, match=f"{meta['scheme']}.*depth-v9-other"):
        check_compatible(meta, 64, "depth-v9-other", "ckpt")
    # a checkpoint of an older revision of the same view: the fix is to retrain, not another --view
    with pytest.raises(XsaeError, match="revision v1 of the circuits view") as err:
        check_compatible({**meta, "scheme": "circuits-v1-0123456789"}, 64, "circuits-v2-abcdefabcd", "ckpt")
    assert "sane train" in err.value.hint


def test_bad_settings_are_user_errors() -> None:
    """Refused when the settings are built, before any model is tokenised or trained."""
    with pytest.raises(XsaeError, match="batch_size = 1 must be >= 2"):  # no negatives for the contrastive loss
        settings(batch_size=1)
    with pytest.raises(XsaeError, match="mixed_precision = 'fp8' is not one of no, fp16, bf16"):
        settings(mixed_precision="fp8")


def test_embeddings_and_neighbors(tiny_models, tmp_path: Path) -> None:
    from xsae_cli.sane.embed import cosine_neighbors, embed_tokenized
    from xsae_cli.sane.train import load_model

    r = train(tiny_models, tmp_path / "run", settings(epochs=1, steps_per_epoch=2), CFG)
    model, _meta = load_model(r.last_checkpoint)
    vecs = {}
    for tm in tiny_models:
        v, n = embed_tokenized(model, tm, 128, batch_size=8)
        assert v.shape == (512,) and np.isfinite(v).all() and n == tm.n_windows(128)
        vecs[tm.name] = v
    v2, _ = embed_tokenized(model, tiny_models[0], 128, batch_size=3)  # batching does not change the result
    assert np.allclose(v2, vecs[tiny_models[0].name], atol=1e-5)
    rows = cosine_neighbors(vecs, "tiny-gpt2")
    assert [n for n, _ in rows] and "tiny-gpt2" not in [n for n, _ in rows] and len(rows) == 4
    assert all(0 <= d <= 2 for _, d in rows) and [d for _, d in rows] == sorted(d for _, d in rows)
    with pytest.raises(XsaeError, match="at least two"):
        cosine_neighbors({"a": vecs["tiny-gpt2"]}, "a")
    with pytest.raises(XsaeError, match="not in the embeddings"):
        cosine_neighbors(vecs, "nope")


def test_a_checkpoint_rebuilds_its_own_scheme() -> None:
    """Stored as data, or (older checkpoints) derived from the id; its keywords win over the current
    setting with a note; another view, or a view whose output changed since, is refused."""
    from xsae_cli.sane.tokenizer import CoordScheme
    from xsae_cli.sane.train import checkpoint_scheme

    custom = CoordScheme(layer_keywords=("layers", "cells"), view="canonical")
    meta = {"chunk_size": 64, "scheme": custom.scheme_id, "coord_scheme": custom.record(64)}
    notes: list[str] = []
    assert checkpoint_scheme(meta, "ckpt", layer_keywords=["layers", "h"], warn=notes.append) == custom
    assert len(notes) == 1 and "layers,cells" in notes[0] and "those are used" in notes[0]
    old = {"chunk_size": 64, "scheme": custom.scheme_id}  # written before schemes were stored: the id alone
    assert checkpoint_scheme(old, "ckpt", layer_keywords=["layers", "cells"]) == custom
    assert checkpoint_scheme({"chunk_size": 64, "scheme": CoordScheme(view="weights").scheme_id}, "ckpt") == CoordScheme(view="weights")
    with pytest.raises(XsaeError, match="coordinate scheme"):  # an id none of the known settings give
        checkpoint_scheme(old, "ckpt", layer_keywords=["layers"])
    with pytest.raises(XsaeError, match="trained on the canonical view, not circuits"):
        checkpoint_scheme(meta, "ckpt", view="circuits")
    stale = {**meta, "scheme": "circuits-v1-0123456789", "coord_scheme": {**CoordScheme().record(64), "id": "circuits-v1-0123456789", "view_revision": 1}}
    with pytest.raises(XsaeError, match="revision v1 of the circuits view"):
        checkpoint_scheme(stale, "ckpt")


def test_resume_with_another_width_or_lr_is_refused(tiny_models, tmp_path: Path) -> None:
    """`sane train --d-model 64` on an existing run used to resume and ignore the flag."""
    from xsae_cli.sane.train import preflight

    first = train(tiny_models[:2], tmp_path / "run", settings(epochs=1, steps_per_epoch=1), CFG)
    with pytest.raises(XsaeError) as exc:
        train(tiny_models[:2], tmp_path / "run", settings(epochs=2, steps_per_epoch=1, d_model=64, lr=2e-3, save_every=2), CFG)
    line = exc.value.one_line()
    assert "--d-model 128 -> 64" in line and "--lr 0.001 -> 0.002" in line and "save-every" not in line and "--force" in line
    meta = read_checkpoint_config(first.last_checkpoint)
    with pytest.raises(XsaeError, match="--d-model 128 -> 64"):  # the command's check, before tokenising
        preflight(tmp_path / "run", meta["chunk_size"], meta["scheme"], False, settings(d_model=64))
    more = train(tiny_models[:2], tmp_path / "run", settings(epochs=2, steps_per_epoch=1, save_every=2), CFG)  # more epochs: allowed
    assert more.resumed_from == 1 and more.epochs_done == 2
