"""Per-kind pooling gains: the embedding is linear in them, the fit favours the kind that keeps
lineage, and checkpoints from before the gains load unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.sane.calibrate import fit_kind_gains, kind_components
from xsae_cli.sane.embed import embed_tokenized
from xsae_cli.sane.model import SaneAutoencoder, SaneModelConfig
from xsae_cli.sane.tokenizer import KIND_ID, KINDS
from xsae_cli.sane.train import load_weights

CFG = SaneModelConfig(d_model=32, n_heads=4, enc_layers=1, dec_layers=1, latent_dim=8)


def test_embedding_is_the_gain_weighted_sum_of_kind_components(tiny_models) -> None:
    tm = tiny_models[0]
    torch.manual_seed(0)
    model = SaneAutoencoder(CFG).eval()
    comps = kind_components(model, tm, 128, max_windows=4)
    assert len(comps) >= 3 and torch.equal(model.kind_gain, torch.zeros(len(KINDS)))  # left as it was
    plain = embed_tokenized(model, tm, 128, max_windows=4)[0]
    assert np.allclose(plain, sum(comps.values()), atol=1e-8)
    g = np.zeros(len(KINDS))
    k0, k1 = sorted(comps)[:2]
    g[k0], g[k1] = np.log(5.0), np.log(0.2)
    model.kind_gain.copy_(torch.from_numpy(g))
    weighted = embed_tokenized(model, tm, 128, max_windows=4)[0]
    assert np.allclose(weighted, sum(np.exp(g[k]) * c for k, c in comps.items()), atol=1e-8)
    assert not np.allclose(weighted, plain)


def test_fit_raises_the_gain_of_the_kind_that_keeps_lineage() -> None:
    rng = np.random.default_rng(0)
    stable, drifty = KIND_ID["gram"], KIND_ID["circuit_qk"]
    comps, base_of = {}, {}
    for b in range(6):
        base = {stable: rng.normal(size=64), drifty: rng.normal(size=64)}
        comps[f"b{b}"], base_of[f"b{b}"] = base, f"b{b}"
        for v in range(3):  # a variant keeps the stable kind (drift 0.2) and loses most of the other (drift 1.5)
            comps[f"b{b}~{v}"] = {stable: base[stable] + 0.2 * rng.normal(size=64), drifty: base[drifty] + 1.5 * rng.normal(size=64)}
            base_of[f"b{b}~{v}"] = f"b{b}"
    g = fit_kind_gains(comps, base_of, len(KINDS), steps=200)
    assert g[stable] - g[drifty] > 1.0
    assert g[KIND_ID["circuit_mlp"]] == 0.0  # absent kinds keep gain 1

    def separation(gains: np.ndarray) -> float:
        def emb(n: str) -> np.ndarray:
            e = sum(np.exp(gains[k]) * c for k, c in comps[n].items())
            return e / np.linalg.norm(e)

        ratios = []
        for n in comps:
            if base_of[n] != n:
                d = {b: 1 - emb(n) @ emb(b) for b in comps if base_of[b] == b}
                ratios.append(min(v for b, v in d.items() if b != base_of[n]) / d[base_of[n]])
        return float(np.median(ratios))

    assert separation(g) > 1.5 * separation(np.zeros(len(KINDS)))
    with pytest.raises(XsaeError, match="two bases"):
        fit_kind_gains({"b0": comps["b0"], "b0~0": comps["b0~0"]}, base_of, len(KINDS))


def test_checkpoints_from_before_the_gains_pool_with_gain_one() -> None:
    torch.manual_seed(0)
    model = SaneAutoencoder(CFG)
    old = {k: v for k, v in model.state_dict().items() if k != "kind_gain"}
    model.kind_gain.fill_(1.0)
    load_weights(model, old)
    assert torch.equal(model.kind_gain, torch.zeros(len(KINDS)))
    assert not any(n == "kind_gain" for n, _ in model.named_parameters())  # gradient training leaves it alone


def test_lineage_files_are_checked(tmp_path) -> None:
    from xsae_cli.sane.calibrate import read_lineage

    good = tmp_path / "l.json"
    good.write_text('{"ft-a": "base-a", "ft-b": "base-b"}')
    assert read_lineage(good) == {"ft-a": "base-a", "ft-b": "base-b", "base-a": "base-a", "base-b": "base-b"}
    for text, msg in (('["x"]', "not a lineage map"), ("{}", "not a lineage map"), ('{"a": "b", "b": "c"}', "is a base and also descends"), ("{nope", "not valid JSON")):
        good.write_text(text)
        with pytest.raises(XsaeError, match=msg):
            read_lineage(good)
