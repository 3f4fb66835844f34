"""Training on ATF: the vocabulary and model files, and a resume that repeats the uninterrupted run."""

from __future__ import annotations

import json

import pytest

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import load_safetensors
from xsae_cli.restore.model import load_restoration
from xsae_cli.restore.train import RestoreTrainSettings, train


def _settings(atf, steps: int) -> RestoreTrainSettings:
    return RestoreTrainSettings(preset="tiny", corpus=[str(atf)], steps=steps, batch_size=4, seq_len=48, checkpoint_every=2, warmup_steps=2, held_out_fraction=0.2, device="cpu")


def test_train_then_resume_equals_uninterrupted(tmp_path, letters_atf) -> None:
    ref = train(_settings(letters_atf, 4), tmp_path / "ref")
    assert ref["steps"] == 4 and ref["train_docs"] + ref["held_out_docs"] == 6
    loaded = load_restoration(tmp_path / "ref")
    assert loaded.vocab.kind == "chars" and "š" not in loaded.vocab.stoi and "z" in loaded.vocab.stoi
    assert "[" not in loaded.vocab.stoi  # damage markup is not text
    assert json.loads((tmp_path / "ref" / "config.json").read_text())["model"]["n_layers"] == 4

    half = train(_settings(letters_atf, 2), tmp_path / "run")
    assert half["steps"] == 2
    (tmp_path / "run" / "config.json").unlink()  # as if the run had stopped after step 2
    resumed = train(_settings(letters_atf, 4), tmp_path / "run")
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 4
    a = load_safetensors(tmp_path / "ref" / "model.safetensors")
    b = load_safetensors(tmp_path / "run" / "model.safetensors")
    assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a)

    with pytest.raises(XsaeError, match="already holds a trained model"):
        train(_settings(letters_atf, 4), tmp_path / "ref")


def test_resume_with_another_lr_is_refused(tmp_path, letters_atf) -> None:
    train(_settings(letters_atf, 2), tmp_path / "run")
    (tmp_path / "run" / "config.json").unlink()  # as if the run had stopped after step 2
    with pytest.raises(XsaeError) as exc:
        train(_settings(letters_atf, 4).replace(lr=5e-3, log_every=1), tmp_path / "run")
    line = exc.value.one_line()
    assert "--lr 0.001 -> 0.005" in line and "log-every" not in line and "steps" in line and "--force" in line
    assert train(_settings(letters_atf, 4).replace(lr=5e-3), tmp_path / "run", force=True)["steps"] == 4
