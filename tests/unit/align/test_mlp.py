"""The mlp mapper: learns a nonlinear map, stops on validation, handles sparse codes."""

from __future__ import annotations

import torch

from xsae_cli.align.linear import r2_score
from xsae_cli.align.mappers.mlp import (
    MlpMapper,
    MlpMapperSettings,
    SparseInput,
    mapper_loss,
    to_sparse_rows,
)
from xsae_cli.align.mappers.ridge import Ridge
from xsae_cli.align.metrics import topk_codes


def test_mlp_beats_ridge_on_a_nonlinear_map_and_keeps_the_best_val_epoch() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 12, generator=g)
    w = torch.randn(12, 6, generator=g)
    y = (x @ w).abs() * 5.0 + 2.0  # symmetric: no linear map predicts it
    tr, va, te = slice(0, 3000), slice(3000, 3500), slice(3500, 4000)
    fit = MlpMapper(MlpMapperSettings(hidden=64, max_epochs=12, patience=3, lr=3e-3)).fit(x[tr], y[tr], x[va], y[va])
    mean = y[tr].double().mean(0)
    net = r2_score(fit.predict(x[te]), y[te], mean)
    lin = r2_score(Ridge().fit(x[tr], y[tr], x[va], y[va]).predict(x[te]), y[te], mean)
    assert net > 0.7 and lin < 0.05
    hist = fit.info["history"]
    assert fit.info["val_r2"] == max(h["val_r2"] for h in hist)
    assert hist[fit.info["best_epoch"] - 1]["val_r2"] == fit.info["val_r2"]


def test_shuffled_pairs_give_no_held_out_skill() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 8, generator=g)
    y = x @ torch.randn(8, 4, generator=g)
    perm = torch.randperm(1500, generator=g)
    fit = MlpMapper(MlpMapperSettings(hidden=32, max_epochs=6, patience=2)).fit(x[:1500], y[:1500][perm], x[1500:1750], y[1500:1750])
    assert r2_score(fit.predict(x[1750:]), y[1750:], y[:1500].double().mean(0)) < 0.05


def test_sparse_codes_in_and_out() -> None:
    g = torch.Generator().manual_seed(2)
    codes = topk_codes(torch.rand(1200, 64, generator=g), 4)
    idx, val = to_sparse_rows(codes)
    assert idx.shape == (1200, 4) and torch.equal(torch.zeros_like(codes).scatter(1, idx, val), codes)
    layer = SparseInput(64, 8)
    dense = codes @ layer.bag.weight + layer.bias  # the EmbeddingBag is a Linear layer on the dense row
    assert torch.allclose(layer((idx, val)), dense, atol=1e-5)
    target = topk_codes(codes @ torch.rand(64, 32, generator=g), 4)
    fit = MlpMapper(MlpMapperSettings(hidden=32, max_epochs=3), sparse=True).fit(codes[:1000], target[:1000], codes[1000:1100], target[1000:1100])
    pred = fit.predict(codes[1100:])
    assert pred.shape == (100, 32) and bool((pred >= 0).all())  # codes are never negative
    loss, terms = mapper_loss(pred, target[1100:], target[:1000].mean(0), MlpMapperSettings(), sparse=True)
    assert torch.isfinite(loss) and set(terms) == {"mse", "cosine", "correlation", "sparsity"}
