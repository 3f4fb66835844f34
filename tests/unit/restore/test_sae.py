"""Residual-stream capture on the original model, its TransformerLens twin, and the activation stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.restore.conftest import small_model
from xsae_cli.core.errors import XsaeError
from xsae_cli.restore.sae import (
    DirectCapture,
    TransformerLensCapture,
    activation_stream,
    hook_name,
    make_capture,
)


def test_direct_capture_is_the_block_output_and_stops_the_forward() -> None:
    model = small_model(n_layers=3)
    ids = torch.randint(3, 40, (2, 16))
    attn = torch.ones(2, 16, dtype=torch.long)
    ran = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(model.layers)]
    head_calls = []
    handles.append(model.final_ln.register_forward_hook(lambda *a: head_calls.append(1)))
    acts = DirectCapture(model, 1)(ids, attn)
    for h in handles:
        h.remove()
    assert ran == [0, 1] and not head_calls  # block 2 and the head never ran
    with torch.no_grad():
        x = model.embed(ids)
        cos, sin = model.rotary(16, x.device)
        mask = torch.zeros(2, 1, 1, 16)
        for layer in model.layers[:2]:
            x = layer(x, cos, sin, mask)
    assert torch.allclose(acts, x, atol=1e-6)
    assert not model.layers[1]._forward_hooks  # the hook is removed again


def test_transformer_lens_route_gives_the_same_activations() -> None:
    model = small_model(n_layers=3)
    ids = torch.randint(3, 40, (3, 20))
    attn = torch.ones(3, 20, dtype=torch.long)
    attn[2, 12:] = 0
    direct = DirectCapture(model, 2)(ids, attn)
    via_tl = TransformerLensCapture(model, 2, "cpu")(ids, attn)
    assert (direct - via_tl)[attn.bool()].abs().max() < 1e-4
    assert hook_name(2) == "blocks.2.hook_resid_post"


def test_bad_layer_and_route_are_user_errors() -> None:
    model = small_model(n_layers=3)
    with pytest.raises(XsaeError, match=r"--layer 3 does not exist: the model has 3 blocks"):
        make_capture(model, 3, "direct", "cpu")
    with pytest.raises(XsaeError, match="unknown --via"):
        make_capture(model, 0, "hooks", "cpu")


def test_stream_covers_every_real_character_each_epoch_in_batches() -> None:
    model = small_model(n_layers=2)
    ids = np.random.default_rng(0).integers(3, 40, (6, 16))
    attn = np.ones((6, 16), dtype=np.int64)
    attn[0, 10:] = 0
    capture = DirectCapture(model, 0)
    batches = list(activation_stream(capture, ids, attn, epochs=2, batch_samples=2, batch_tokens=25, seed=0, device="cpu", hook="h"))
    sizes = [b["h"].shape[0] for b in batches]
    assert sum(sizes) == 2 * int(attn.sum()) and max(sizes) == 25
    again = list(activation_stream(capture, ids, attn, epochs=2, batch_samples=2, batch_tokens=25, seed=0, device="cpu", hook="h"))
    assert all(torch.equal(a["h"], b["h"]) for a, b in zip(batches, again))  # seeded: a resume replays it
    # The rows are the model's activations at real (unpadded) positions.
    full = capture(torch.from_numpy(ids), torch.from_numpy(attn))[torch.from_numpy(attn).bool()]
    got = torch.cat([b["h"] for b in batches])
    assert torch.allclose(got.sum(0), 2 * full.sum(0), atol=1e-3)  # every row exactly once per epoch
