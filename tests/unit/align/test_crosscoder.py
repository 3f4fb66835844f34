"""Crosscoder and universal SAE on known answers (synthetic paired activations, so they run in seconds).

Model A's activations are sparse features times a dictionary; "an exactly rotated copy" is
``2 * x_a @ Q + 1``; "an unrelated model" has its own features and dictionary (another width);
"a fine-tuned copy with a planted feature" adds one direction on some tokens to B only.
"""

from __future__ import annotations

import pytest
import torch

from xsae_cli.align.crosscoder import CrosscoderConfig, evaluate, latent_stats, load, save, train
from xsae_cli.core.errors import XsaeError

N, F, D = 3000, 24, 12
STEPS = 500


def _features(g: torch.Generator, n: int = N) -> torch.Tensor:
    return (torch.rand(n, F, generator=g) < 0.08).float() * torch.rand(n, F, generator=g) * 3


def _dictionary(g: torch.Generator, d: int) -> torch.Tensor:
    w = torch.randn(F, d, generator=g)
    return w / w.norm(dim=1, keepdim=True)


def _pair(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    xa = _features(g) @ _dictionary(g, D)
    if kind == "rotated":
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
        return xa, 2 * xa @ q + 1
    return xa, _features(g) @ _dictionary(g, D + 4)


def _fit(xa: torch.Tensor, xb: torch.Tensor, objective: str, **kw: object) -> tuple[dict, dict]:  # type: ignore[type-arg]
    cfg = CrosscoderConfig(["a", "b"], [xa.shape[1], xb.shape[1]], d_sae=48, k=4, objective=objective, **kw)  # type: ignore[arg-type]
    cut = int(0.8 * N)
    res = train([xa[:cut], xb[:cut]], cfg, steps=STEPS, batch_size=256, lr=3e-3)
    test = [xa[cut:], xb[cut:]]
    return evaluate(res.model, test), latent_stats(res.model, test)


def test_rotated_copy_nearly_all_latents_shared() -> None:
    ev, st = _fit(*_pair("rotated"), "crosscoder")
    assert ev["r2_joint"]["a"] > 0.8 and ev["r2_joint"]["b"] > 0.8
    assert st["shared_fraction"] > 0.9 and max(st["exclusive_fraction"].values()) == 0.0
    rel = torch.tensor(st["relative_norm"][0])[torch.tensor(st["firing_rate"]) > 0]
    assert (rel - 0.5).abs().median() < 0.05  # relative norm near 0.5


def test_universal_cross_reconstruction_rotated_vs_unrelated() -> None:
    ev, st = _fit(*_pair("rotated"), "universal")
    own = ev["r2_from_one"]
    assert own["a->a"] > 0.8 and own["b->b"] > 0.8
    assert own["a->b"] > own["a->a"] - 0.05 and own["b->a"] > own["b->b"] - 0.05  # cross close to each side's own
    assert st["shared_fraction"] > 0.9
    ev_u, st_u = _fit(*_pair("unrelated"), "universal")
    assert ev_u["r2_from_one"]["a->a"] > 0.8 and ev_u["r2_from_one"]["b->b"] > 0.8
    assert abs(ev_u["r2_from_one"]["a->b"]) < 0.1 and abs(ev_u["r2_from_one"]["b->a"]) < 0.1  # near its null (0: the mean)
    assert st_u["shared_fraction"] < 0.3


def test_planted_feature_is_an_exclusive_latent() -> None:
    g = torch.Generator().manual_seed(1)
    xa = _features(g) @ _dictionary(g, D)
    planted = torch.randn(D, generator=g)
    planted /= planted.norm()
    on = (torch.rand(N, generator=g) < 0.1).float() * (1 + torch.rand(N, generator=g))
    xb = xa + 2.0 * on[:, None] * planted
    cfg = CrosscoderConfig(["base", "tuned"], [D, D], d_sae=48, k=4)
    cut = int(0.8 * N)
    res = train([xa[:cut], xb[:cut]], cfg, steps=STEPS, batch_size=256, lr=3e-3)
    st = latent_stats(res.model, [xa[cut:], xb[cut:]])
    rel_tuned = torch.tensor(st["relative_norm"][1])
    alive = torch.tensor(st["firing_rate"]) > 0
    best = int(torch.where(alive, rel_tuned, torch.zeros_like(rel_tuned)).argmax())
    assert rel_tuned[best] > 0.9  # exclusive to the fine-tuned side
    direction = res.model.W_dec[1][best].detach()
    assert abs(float(torch.nn.functional.cosine_similarity(direction, planted, dim=0))) > 0.9  # and it is the planted direction


def test_save_load_round_trip_and_bad_input(tmp_path) -> None:  # type: ignore[no-untyped-def]
    xa, xb = _pair("unrelated")
    cfg = CrosscoderConfig(["a", "b"], [D, D + 4], d_sae=16, k=2, sparsity="batchtopk")
    res = train([xa[:500], xb[:500]], cfg, steps=20, batch_size=128)
    save(res.model, tmp_path / "cc")
    back = load(tmp_path / "cc")
    assert back.cfg == cfg and float(back.threshold) == float(res.model.threshold) > 0
    with torch.no_grad():
        assert torch.equal(back.encode([back.normalise(0, xa[:50]), back.normalise(1, xb[:50])]), res.model.encode([res.model.normalise(0, xa[:50]), res.model.normalise(1, xb[:50])]))
    l1 = train([xa[:500], xb[:500]], CrosscoderConfig(["a", "b"], [D, D + 4], d_sae=16, sparsity="l1", l1_coefficient=1e-2), steps=20)
    assert l1.history[-1]["loss"] == l1.history[-1]["loss"]  # finite
    with pytest.raises(XsaeError, match="two or more models"):
        CrosscoderConfig(["a"], [D], d_sae=8)
    with pytest.raises(XsaeError, match="paired rows must agree"):
        train([xa[:10], xb[:9]], cfg, steps=1)
    with pytest.raises(XsaeError, match=r"no readable crosscoder\.json"):
        load(tmp_path)
