"""Activation harvest with the model on the GPU: the forward stops after the last hook as on the CPU,
and the rows are the CPU's (fp32 rounding; bf16 rounding for a bf16 model)."""

from __future__ import annotations

import pytest
import torch

from tests.unit.data.test_activations import _llama, _reference
from xsae_cli.data.activations import ActivationStore

pytestmark = pytest.mark.gpu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def test_harvest_on_the_device_stops_early_and_matches_the_cpu(tok, small, device: torch.device) -> None:
    model = _llama().to(device)
    ran = {"last": 0, "head": 0}
    h1 = model.model.layers[3].register_forward_hook(lambda *a: ran.__setitem__("last", ran["last"] + 1))
    h2 = model.lm_head.register_forward_hook(lambda *a: ran.__setitem__("head", ran["head"] + 1))
    try:
        store = ActivationStore(model, tok, ["model.layers.1"], small, shuffle=False, batch_contexts=5)
        got = store.harvest()["model.layers.1"]
    finally:
        h1.remove()
        h2.remove()
    assert ran == {"last": 0, "head": 0}  # layers 2-3 and the LM head never ran
    assert got.device.type == device.type and got.dtype == torch.float32
    ref = _reference(_llama(), small, 1)  # full forward on the CPU, output_hidden_states
    assert got.shape == ref.shape and _rel(got, ref) < 1e-5


def test_bf16_model_on_the_device_harvests_float32_rows_near_the_cpu(tok, small, device: torch.device) -> None:
    """`--dtype bfloat16`: the model runs in bf16, the SAE gets fp32 rows within bf16 rounding of the fp32 model."""
    model = _llama().to(device=device, dtype=torch.bfloat16)
    rows = ActivationStore(model, tok, ["model.layers.1"], small, shuffle=False, batch_contexts=5).harvest()["model.layers.1"]
    assert rows.dtype == torch.float32 and rows.device.type == device.type
    ref = _reference(_llama(), small, 1)
    assert rows.shape == ref.shape and _rel(rows, ref) < 2e-2  # 4e-3 measured on a CPU
