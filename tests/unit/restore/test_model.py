"""The restoration model: parameter names and count, RoPE at every length, checkpoint loading."""

from __future__ import annotations

import math

import pytest
import torch

from tests.unit.restore.conftest import small_config, small_model
from xsae_cli.core.errors import XsaeError
from xsae_cli.restore.model import (
    RestorationModel,
    apply_rotary,
    load_restoration,
    preset_config,
    rotary_cache,
)


def test_seed_preset_has_37m_parameters_at_vocab_11812() -> None:
    with torch.device("meta"):
        model = RestorationModel(preset_config("seed", 11812))
    assert model.n_params() == 37_475_620
    cfg = model.config
    assert (cfg.max_position, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.rotary_base) == (768, 384, 8, 1536, 16, 10000)


def test_state_dict_names_match_the_original() -> None:
    names = set(small_model().state_dict())
    for n in ["embed.weight", "final_ln.weight", "final_ln.bias", "head.weight", "head.bias"]:
        assert n in names
    for part in ["ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "ff.0.weight", "ff.0.bias", "ff.2.weight", "ff.2.bias"]:
        assert f"layers.2.{part}" in names
    for proj in ["q_proj", "k_proj", "v_proj", "out_proj"]:
        assert f"layers.0.attn.{proj}.weight" in names and f"layers.0.attn.{proj}.bias" in names
    assert not any("rope" in n or "cos" in n for n in names)  # the rotary cache is not a weight
    no_bias = set(small_model(attn_bias=False).state_dict())
    assert "layers.0.attn.q_proj.bias" not in no_bias and "layers.0.ff.0.bias" in no_bias


# ------------------------------------------------------------------ the original's forward, bug and all


def _original_apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    seq_len, head_dim = x.shape[-2:]
    cos = cos[:seq_len]  # slices the size-1 first axis: a no-op, so only seq_len == max_position broadcasts
    sin = sin[:seq_len]
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _original_forward(model: RestorationModel, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    cfg = model.config
    hd = cfg.d_model // cfg.n_heads
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.einsum("i,j->ij", torch.arange(cfg.max_position).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    bsz, seq = ids.shape
    x = model.embed(ids)
    mask = None if attention_mask is None else (1.0 - attention_mask[:, None, None, :]) * -1e9
    for layer in model.layers:
        a = layer.attn
        h = layer.ln1(x)
        q, k, v = (p(h).view(bsz, seq, cfg.n_heads, hd).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        q, k = _original_apply_rotary(q, cos, sin), _original_apply_rotary(k, cos, sin)
        scores = q @ k.transpose(-2, -1) * hd**-0.5
        if mask is not None:
            scores = scores + mask
        out = (scores.softmax(-1) @ v).transpose(1, 2).contiguous().view(bsz, seq, cfg.d_model)
        x = x + a.out_proj(out)
        x = x + layer.ff(layer.ln2(x))
    return model.head(model.final_ln(x))


@torch.no_grad()
def test_same_logits_as_the_original_at_max_position() -> None:
    model = small_model(max_position=24)
    ids = torch.randint(0, 40, (2, 24))
    mask = torch.ones(2, 24)
    mask[1, 15:] = 0
    assert torch.allclose(model(ids), _original_forward(model, ids), atol=1e-5)
    assert torch.allclose(model(ids, mask.long()), _original_forward(model, ids, mask), atol=1e-5)
    with pytest.raises(RuntimeError):  # the original form cannot run at any other length
        _original_forward(model, ids[:, :10])


def _direct_rotation(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate each pair (i, i + d/2) of position p by angle p * base^(-2i/d), written out by hand."""
    *_, seq, d = x.shape
    out = x.clone()
    half = d // 2
    for p in range(seq):
        for i in range(half):
            theta = p * base ** (-2 * i / d)
            a, b = x[..., p, i], x[..., p, i + half]
            out[..., p, i] = a * math.cos(theta) - b * math.sin(theta)
            out[..., p, i + half] = a * math.sin(theta) + b * math.cos(theta)
    return out


@pytest.mark.parametrize("seq", [1, 7, 24, 40])
def test_rope_is_a_direct_rotation_at_every_length(seq: int) -> None:
    x = torch.randn(2, 3, seq, 8)
    cos, sin = rotary_cache(8, 24, 10000.0)
    if seq > 24:  # the model grows its cache on demand; do the same here
        cos, sin = rotary_cache(8, seq, 10000.0)
    assert torch.allclose(apply_rotary(x, cos, sin), _direct_rotation(x, 10000.0), atol=1e-5)


@torch.no_grad()
def test_shorter_inputs_run_and_attention_sees_relative_positions() -> None:
    model = small_model(max_position=32)
    ids = torch.randint(0, 40, (1, 12))
    full = model(ids)
    assert full.shape == (1, 12, 40) and torch.isfinite(full).all()
    # Padding on the right changes nothing for the real positions.
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 5)], 1).long()
    assert torch.allclose(model(padded, mask)[:, :12], full, atol=1e-5)


# ------------------------------------------------------------------ checkpoints


def _save_original(path, model: RestorationModel) -> None:
    cfg = {k: v for k, v in model.config.to_dict().items() if k != "attn_bias"}
    torch.save({"model_state_dict": model.state_dict(), "config": cfg, "vocab_size": cfg["vocab_size"]}, path)


@pytest.mark.parametrize("bias", [True, False])
def test_original_pt_checkpoint_loads_with_or_without_attention_biases(tmp_path, bias: bool) -> None:
    model = small_model(attn_bias=bias, vocab_size=200)
    _save_original(tmp_path / "best_model.pt", model)
    loaded = load_restoration(tmp_path / "best_model.pt")
    assert loaded.model.config.attn_bias is bias
    ids = torch.randint(0, 200, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), model(ids))
    assert loaded.vocab.kind == "codepoint" and loaded.vocab.index("a") == ord("a")


def test_wrong_keys_are_listed_on_one_line(tmp_path) -> None:
    model = small_model()
    state = dict(model.state_dict())
    state["blocks.0.W_Q"] = state.pop("layers.0.attn.q_proj.weight")
    torch.save({"model_state_dict": state, "config": small_config().to_dict(), "vocab_size": 40}, tmp_path / "other.pt")
    with pytest.raises(XsaeError) as err:
        load_restoration(tmp_path / "other.pt")
    line = err.value.one_line()
    assert "\n" not in line
    assert "missing keys: layers.0.attn.q_proj.weight" in line and "unexpected keys: blocks.0.W_Q" in line


def test_pickled_module_is_refused(tmp_path) -> None:
    torch.save({"model_state_dict": small_model(), "config": {}, "vocab_size": 40}, tmp_path / "evil.pt")
    with pytest.raises(XsaeError, match="unpickling it would need code"):
        load_restoration(tmp_path / "evil.pt")


def test_config_mismatch_is_a_user_error(tmp_path) -> None:
    model = small_model()
    cfg = small_config().to_dict()
    cfg["d_ff"] = 64
    torch.save({"model_state_dict": model.state_dict(), "config": cfg, "vocab_size": 40}, tmp_path / "m.pt")
    with pytest.raises(XsaeError, match="layers.0.ff.0.weight has shape"):
        load_restoration(tmp_path / "m.pt")
