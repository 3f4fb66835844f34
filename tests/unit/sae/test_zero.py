"""The DeepSpeed config xsae hands to the engine (no process group needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xsae_cli.core.errors import XsaeError
from xsae_cli.sae.zero import load_zero_config, zero_config_for, zero_stage

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "deepspeed"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_recipes_load_as_one_engine_step_per_trainer_step(stage: int) -> None:
    cfg = load_zero_config(RECIPES / f"zero{stage}.json")
    assert zero_stage(cfg) == stage
    assert cfg["train_micro_batch_size_per_gpu"] == 1 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["zero_allow_untested_optimizer"] is True


def test_optimizer_and_batch_sections_are_replaced_by_xsae_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}, "train_batch_size": 64}))
    cfg = load_zero_config(path)
    assert "optimizer" not in cfg and "scheduler" not in cfg and "train_batch_size" not in cfg
    err = capsys.readouterr().err
    assert "ignoring the 'optimizer' section" in err and "ignoring the 'scheduler' section" in err


def test_bf16_and_non_adam_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}))
    with pytest.raises(XsaeError, match="enables bf16"):
        load_zero_config(path)
    with pytest.raises(XsaeError, match="not 'signum'"):
        zero_config_for(RECIPES / "zero1.json", "signum")
    path.write_text("[1, 2]")
    with pytest.raises(XsaeError, match="must hold a JSON object"):
        load_zero_config(path)


def test_weight_norm_forward_matches_renormalised_decoder() -> None:
    """Under ZeRO the forward divides by the row norms; folded, it is the same SAE."""
    import torch

    from xsae_cli.sae.models import SaeConfig, create_sae

    # bf16_encoder off: the training forward is compared with inference, so the top-k must be exact
    # (a bf16 selection may swap near-ties, which depends on the data).
    sae = create_sae(SaeConfig(arch="topk", d_in=16, d_sae=64, k=4, bf16_encoder=False), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1, generator=g) + 0.5)  # rows drift off the unit sphere as Adam steps the raw weights
    x = torch.randn(32, 16, generator=g)
    sae.decoder_weight_norm = True
    y = sae(x)
    loss, x_hat, fired, _terms = sae(x, None, train_step=True)
    assert torch.allclose(x_hat, y, atol=1e-5) and loss.requires_grad and int(fired.sum()) == 32 * 4
    sae.fold_decoder_weight_norm()
    assert not sae.decoder_weight_norm and torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)
    assert torch.allclose(sae(x), y, atol=1e-5)
