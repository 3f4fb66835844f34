"""TransformerLens conversion: config, logits within 1e-4 in float32, safe save and reload."""

from __future__ import annotations

import json

import pytest
import torch

from tests.unit.restore.conftest import small_model
from xsae_cli.restore.convert import (
    TL_CONFIG,
    TL_WEIGHTS,
    convert,
    load_converted,
    max_logit_diff,
    tl_logits,
    to_hooked_transformer,
)
from xsae_cli.restore.data import Vocab
from xsae_cli.restore.model import save_model


@pytest.mark.parametrize("bias", [True, False])
def test_hooked_transformer_matches_in_float32(bias: bool) -> None:
    model = small_model(attn_bias=bias, max_position=32)
    tl = to_hooked_transformer(model)
    cfg = tl.cfg
    assert cfg.attention_dir == "bidirectional" and cfg.d_mlp == 48 and cfg.rotary_adjacent_pairs is False
    assert cfg.act_fn == "gelu" and cfg.normalization_type == "LN" and cfg.eps == 1e-5
    assert max_logit_diff(model, tl) <= 1e-4
    ids = torch.randint(0, 40, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 11:] = 0
    with torch.no_grad():
        a, b = model(ids, mask), tl_logits(tl, ids, mask)
        assert (a - b)[mask.bool()].abs().max() <= 1e-4
        # TransformerLens's own causal default would not match: the check can fail.
        tl.cfg.attention_dir = "causal"
        assert (model(ids) - tl(ids)).abs().max() > 1e-3


def test_convert_writes_config_and_safetensors_and_reloads(tmp_path) -> None:
    model = small_model()
    folder = tmp_path / "model"
    folder.mkdir()
    save_model(model, Vocab([chr(97 + i) for i in range(37)]), folder)
    report = convert(folder)
    out = folder / "transformer_lens"
    assert report["max_abs_logit_diff"] <= 1e-4 and report["out"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([TL_CONFIG, TL_WEIGHTS, "vocab.json"])
    assert json.loads((out / TL_CONFIG).read_text())["config"]["attention_dir"] == "bidirectional"
    tl = load_converted(out)
    ids = torch.randint(0, 40, (1, 16))
    with torch.no_grad():
        assert (tl(ids) - model(ids)).abs().max() <= 1e-4
    from xsae_cli.core.errors import XsaeError

    with pytest.raises(XsaeError, match="already exists"):
        convert(folder)
