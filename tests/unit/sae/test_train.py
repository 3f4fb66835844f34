"""Trainer: learns, resumes exactly from a checkpoint, stops on non-finite input keeping the last checkpoint."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.sae.settings import SaeTrainSettings
from xsae_cli.sae.train import SaeTrainer, lr_factor


def _data(n: int = 8192, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(64, d, generator=g), dim=-1)
    codes = torch.rand(n, 64, generator=g) * (torch.rand(n, 64, generator=g) < 0.05)
    return codes @ dictionary + 0.01 * torch.randn(n, d, generator=g)


def _batches(x: torch.Tensor, batch: int):
    def make(skip: int) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(skip, x.shape[0], batch):
            yield {"h": x[start : start + batch]}

    return make


def _settings(**kw) -> SaeTrainSettings:
    base = dict(arch="topk", k=4, expansion=4, batch_size=256, tokens=8192, checkpoint_every=8, log_every=4)
    base.update(kw)
    return SaeTrainSettings(**base)


def Trainer(settings: SaeTrainSettings, d_in: dict, run_dir: Path, **kw) -> SaeTrainer:
    return SaeTrainer(settings, d_in, run_dir, seed=1, **kw)


@pytest.mark.parametrize(("optimizer", "lr"), [("signum", None), ("adam", 3e-3)])
def test_training_lowers_fvu_and_logs(tmp_path: Path, optimizer: str, lr: float | None) -> None:
    x = _data()
    trainer = Trainer(_settings(optimizer=optimizer, lr=lr), {"h": 16}, tmp_path)
    logs = trainer.fit(_batches(x, 256))
    assert trainer.step == 32 and trainer.tokens == 8192
    assert logs["h"]["fvu"] < 0.5
    lines = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 8 and '"fvu"' in lines[0]
    assert trainer.checkpoints.steps()[-1] == 32


@pytest.mark.parametrize("optimizer", ["signum", "adam"])
def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path: Path, optimizer: str) -> None:
    x = _data()
    straight = Trainer(_settings(optimizer=optimizer), {"h": 16}, tmp_path / "a")
    straight.fit(_batches(x, 256))

    # Simulate a crash right after the step-16 checkpoint: a run told to stop at 16 steps' worth.
    first = Trainer(_settings(tokens=8192, optimizer=optimizer), {"h": 16}, tmp_path / "b")
    for _i, batch in enumerate(_batches(x, 256)(0)):
        first.train_step(batch)
        if first.step % 8 == 0:
            first.save_checkpoint()
        if first.step == 20:  # work after the last checkpoint is lost, as in a kill -9
            break
    resumed = Trainer(_settings(optimizer=optimizer), {"h": 16}, tmp_path / "b")
    resumed.fit(_batches(x, 256))
    assert resumed.step == straight.step
    for (name, a), (_, b) in zip(straight.finalize()["h"].state_dict().items(), resumed.finalize()["h"].state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_nan_activations_stop_with_step_and_hook_and_keep_checkpoint(tmp_path: Path) -> None:
    x = _data()
    x[2000] = float("nan")
    trainer = Trainer(_settings(), {"h": 16}, tmp_path)
    with pytest.raises(XsaeError) as exc:
        trainer.fit(_batches(x, 256))
    text = str(exc.value)
    assert "step 7" in text and "hook h" in text and "checkpoint" in text
    # No checkpoint had been written yet at step 7 (first at 8), and none is written after the fault.
    assert trainer.checkpoints.steps() == []


def test_lr_schedule_warms_up_and_decays() -> None:
    s = _settings(tokens=256 * 100, warmup_fraction=0.1, decay_fraction=0.2, optimizer="adam")
    assert lr_factor(0, s) == pytest.approx(0.1)
    assert lr_factor(50, s) == 1.0
    assert lr_factor(99, s) == pytest.approx(1 / 20)
    free = _settings(tokens=256 * 100, warmup_fraction=0.1, decay_fraction=0.2, optimizer="signum")
    assert lr_factor(99, free) == 1.0  # schedule-free: no decay


def test_checkpoint_for_other_hooks_is_refused(tmp_path: Path) -> None:
    x = _data()
    Trainer(_settings(tokens=2048), {"h": 16}, tmp_path).fit(_batches(x, 256))
    with pytest.raises(XsaeError, match="not \\['other'\\]"):
        Trainer(_settings(), {"other": 16}, tmp_path).try_resume()


def test_tensorboard_tracker_writes_events(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    trainer = Trainer(_settings(tokens=2048, log_with="tensorboard"), {"h": 16}, tmp_path)
    trainer.fit(_batches(_data(), 256))
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_unknown_tracker_is_refused_when_the_settings_are_built(tmp_path: Path) -> None:
    with pytest.raises(XsaeError, match="log_with = 'mlflw' is not one of tensorboard, wandb"):
        _settings(tokens=512, log_with="mlflw")  # before a trainer (or a model) exists


def test_resume_with_other_settings_is_refused_listing_them(tmp_path: Path) -> None:
    """k, lr, optimizer change the result: refused in one line; more tokens and logging may change."""
    import json

    x = _data()
    (tmp_path / "run.json").write_text(json.dumps({"settings": {}}))
    Trainer(_settings(tokens=2048), {"h": 16}, tmp_path).fit(_batches(x, 256))
    with pytest.raises(XsaeError) as exc:
        Trainer(_settings(tokens=2048, k=8, lr=1e-3, log_every=2), {"h": 16}, tmp_path).try_resume()
    line = exc.value.one_line()
    assert "--k 4 -> 8" in line and "--lr None -> 0.001" in line and "log-every" not in line and "--force" in line
    assert "\n" not in line
    resumed = Trainer(_settings(tokens=4096, log_every=2, checkpoint_every=4), {"h": 16}, tmp_path)
    assert resumed.try_resume() and resumed.tokens == 2048
    assert json.loads((tmp_path / "run.json").read_text())["resumes"] == [{"step": 8, "tokens": 2048, "grown": {"tokens": [2048, 4096]}}]
    with pytest.raises(XsaeError, match="--tokens 2048 -> 1024"):  # a budget may only grow
        Trainer(_settings(tokens=1024), {"h": 16}, tmp_path).try_resume()


def test_ctrl_c_saves_a_checkpoint_and_exits_130_not_2(tmp_path: Path) -> None:
    from xsae_cli.core.errors import Interrupted

    x = _data()

    def interrupted(skip: int) -> Iterator[dict[str, torch.Tensor]]:
        for i, batch in enumerate(_batches(x, 256)(skip)):
            if i == 5:
                raise KeyboardInterrupt
            yield batch

    trainer = Trainer(_settings(), {"h": 16}, tmp_path)
    with pytest.raises(Interrupted) as exc:
        trainer.fit(interrupted)
    assert exc.value.exit_code == 130 and "at step 5" in exc.value.one_line()
    assert trainer.checkpoints.steps() == [5]
