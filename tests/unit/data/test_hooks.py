"""xsae_cli.data.hooks: one rule for the hidden state of any module's output or input."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

from xsae_cli.core.errors import XsaeError
from xsae_cli.data.hooks import (
    HiddenCapture,
    find_hidden,
    input_hidden,
    replace_hidden,
    replace_input_hidden,
    replacing,
)

H = torch.arange(6.0).reshape(1, 2, 3)
NEW = -torch.ones(1, 2, 3)
Pair = namedtuple("Pair", ["hidden", "extra"])


def _model_output():
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return BaseModelOutputWithPast(last_hidden_state=H, hidden_states=(H, H))


@pytest.mark.parametrize(
    "value",
    [H, (H, torch.zeros(1)), [None, H, torch.zeros(1)], Pair(H, 3), {"x": 1, "h": H}, "model_output"],
    ids=["tensor", "tuple", "list-with-none-first", "namedtuple", "dict", "ModelOutput"],
)
def test_find_and_replace_round_trip_keeps_everything_else(value) -> None:
    if value == "model_output":
        value = _model_output()
    assert find_hidden(value) is H
    out = replace_hidden(value, NEW)
    assert find_hidden(out) is NEW and type(out) is type(value)
    if not isinstance(value, torch.Tensor):
        rest_in = [v for v in (value.values() if isinstance(value, dict) else value) if v is not H]
        rest_out = [v for v in (out.values() if isinstance(out, dict) else out) if v is not NEW]
        assert len(rest_in) == len(rest_out) and all(a is b for a, b in zip(rest_in, rest_out))
    assert find_hidden(value) is H  # the original is left unchanged


def test_model_output_prefers_last_hidden_state_over_first_value() -> None:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    logits = torch.zeros(1, 2, 5)
    out = CausalLMOutputWithPast(logits=logits)
    assert find_hidden(out) is logits  # no hidden state field: the first tensor
    assert find_hidden(_model_output()) is H


def test_no_tensor_is_none_and_replacing_into_it_is_a_user_error() -> None:
    assert find_hidden((1, "a")) is None and find_hidden(None) is None
    with pytest.raises(XsaeError, match="holds no tensor"):
        replace_hidden((1, 2), NEW)


def test_input_rule_positional_then_hidden_states_keyword() -> None:
    assert input_hidden((H,), {"hidden_states": NEW}) is H
    assert input_hidden((), {"mask": NEW, "hidden_states": H}) is H
    assert input_hidden((None,), {"x": H}) is H
    args, kwargs = replace_input_hidden((), {"mask": H, "hidden_states": H}, NEW)
    assert kwargs["hidden_states"] is NEW and kwargs["mask"] is H and args == ()


class _Chain(nn.Module):
    """Three blocks returning (hidden, extra) tuples, counting calls."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(3, 3) for _ in range(3)])
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            self.calls += 1
            x = block(x)
        return x


def test_capture_stops_after_the_last_hook_and_equals_the_full_forward() -> None:
    torch.manual_seed(0)
    model = _Chain()
    x = torch.randn(2, 3)
    with torch.no_grad():
        ref1 = model.blocks[1](model.blocks[0](x))
    model.calls = 0
    with HiddenCapture(model, {"a": "blocks.0", "b": "blocks.1"}) as cap, torch.no_grad():
        model(x)
    assert model.calls == 2  # block 2 never ran
    torch.testing.assert_close(cap.values["b"], ref1)
    assert cap.missing() == [] and not model.blocks[0]._forward_hooks  # hooks removed

    model.calls = 0
    with HiddenCapture(model, {"b": model.blocks[1]}, stop=False) as cap:
        out = model(x)
    assert model.calls == 3 and out.shape == (2, 3)


def test_capture_input_site_and_missing_module() -> None:
    model = _Chain()
    x = torch.randn(2, 3)
    with HiddenCapture(model, {"in0": "blocks.0"}, site="input") as cap:
        model(x)
    assert cap.values["in0"] is x
    with HiddenCapture(model, {"a": "blocks.0", "never": nn.Linear(3, 3)}) as cap:
        model(x)
    assert cap.missing() == ["never"]


def test_capture_does_not_swallow_another_capture_s_stop() -> None:
    model = _Chain()
    with HiddenCapture(model, {"outer": "blocks.0"}) as outer, HiddenCapture(model, {"inner": "blocks.2"}, stop=False):
        model(torch.randn(1, 3))  # the outer stop at block 0 must pass through the inner capture
    assert "outer" in outer.values


def test_capture_of_a_module_without_tensor_names_the_hook() -> None:
    class Silent(nn.Module):
        def forward(self, x: torch.Tensor) -> None:
            return None

    model = nn.Sequential(Silent())
    with pytest.raises(XsaeError, match=r"hook h \(0\) gives NoneType with no tensor at its output"), HiddenCapture(model, {"h": "0"}):
        model(torch.zeros(1))
    with pytest.raises(XsaeError, match="unknown hook site"):
        HiddenCapture(model, {"h": "0"}, site="middle")


def test_replacing_splices_output_and_input() -> None:
    torch.manual_seed(0)
    model = _Chain()
    x = torch.randn(2, 3)
    with torch.no_grad():
        with replacing(model.blocks[2], torch.zeros_like):
            assert torch.equal(model(x), torch.zeros(2, 3))
        with replacing(model.blocks[2], torch.zeros_like, site="input"):
            torch.testing.assert_close(model(x), model.blocks[2].bias.expand(2, 3))
        assert not model.blocks[2]._forward_hooks and not model.blocks[2]._forward_pre_hooks
