"""SAE metrics: definitions on hand-made tensors, and exact whole-set aggregation over batches."""

from __future__ import annotations

import math

import pytest
import torch

from xsae_cli.sae.metrics import (
    FiringTracker,
    RunningStats,
    dead_fraction,
    dense_fraction,
    explained_variance,
    fire_counts,
    fvu,
    l0,
    mse,
    total_variance,
)


def test_fvu_reference_points():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 8, generator=g) * 3 + 5
    assert float(fvu(x, x)) == 0.0
    assert float(fvu(x, x.mean(0).expand_as(x))) == pytest.approx(1.0)  # predicting the mean
    assert float(fvu(x, torch.zeros_like(x))) > 1.0  # the offset counts as error, not variance
    noisy = x + 0.1 * torch.randn(100, 8, generator=g)
    manual = ((x - noisy) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert float(fvu(x, noisy)) == pytest.approx(float(manual), rel=1e-6)
    assert float(explained_variance(x, noisy)) == pytest.approx(1 - float(manual), rel=1e-6)


def test_fvu_uses_the_per_dimension_mean():
    x = torch.tensor([[0.0, 10.0], [2.0, 30.0]])
    assert float(total_variance(x)) == pytest.approx(1 + 1 + 100 + 100)
    assert float(fvu(x, x + 1.0)) == pytest.approx(4 / 202)


def test_mse_l0_and_fire_counts():
    x = torch.zeros(2, 3)
    assert float(mse(x, torch.ones(2, 3) * 2)) == pytest.approx(4.0)
    codes = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0], [0.0, 5.0, 0.0, 1.0]])
    assert float(l0(codes)) == pytest.approx(5 / 3)
    counts = fire_counts(codes)
    assert counts.tolist() == [0, 2, 0, 3]
    assert float(dead_fraction(counts)) == pytest.approx(0.5)
    assert float(dense_fraction(counts, n_tokens=3, threshold=0.9)) == pytest.approx(0.25)
    assert float(dense_fraction(counts, n_tokens=3, threshold=0.5)) == pytest.approx(0.5)
    assert float(dense_fraction(counts, n_tokens=0)) == 0.0


def test_running_stats_equals_whole_set_not_batch_average():
    g = torch.Generator().manual_seed(1)
    # Batches with different means: per-batch FVUs would each use their own mean.
    batches = [torch.randn(50, 6, generator=g) + shift for shift in (0.0, 4.0, -3.0)]
    recons = [b + 0.3 * torch.randn(50, 6, generator=g) for b in batches]
    codes = [torch.relu(torch.randn(50, 10, generator=g)) for _ in batches]
    stats = RunningStats(6, d_sae=10)
    for b, r, c in zip(batches, recons, codes):
        stats.update(b, r, codes=c)
    whole = float(fvu(torch.cat(batches), torch.cat(recons)))
    assert stats.fvu() == pytest.approx(whole, rel=1e-9)
    per_batch = sum(float(fvu(b, r)) for b, r in zip(batches, recons)) / 3
    assert abs(per_batch - whole) > 0.01  # the naive average really differs
    out = stats.compute()
    assert out["n_tokens"] == 150
    assert out["explained_variance"] == pytest.approx(1 - whole, rel=1e-9)
    assert out["mse"] == pytest.approx(float(mse(torch.cat(batches), torch.cat(recons))), rel=1e-9)
    assert out["l0"] == pytest.approx(float(l0(torch.cat(codes))), rel=1e-9)
    assert out["dead_fraction"] == pytest.approx(float(dead_fraction(fire_counts(torch.cat(codes)))))


def test_running_stats_with_fired_counts_and_named_scalars():
    stats = RunningStats(2)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    stats.update(x, x, fired=torch.tensor([2, 0, 1]))
    stats.update(x, x, fired=torch.tensor([1, 0, 0]))
    stats.add("ce_loss_recovered", 0.9, weight=2)
    stats.add("ce_loss_recovered", 0.6, weight=1)
    out = stats.compute()
    assert out["fvu"] == 0.0
    assert out["l0"] == pytest.approx(4 / 4)
    assert out["dead_fraction"] == pytest.approx(1 / 3)
    assert out["ce_loss_recovered"] == pytest.approx(0.8)
    assert RunningStats(2).compute() == {"n_tokens": 0}
    assert math.isnan(RunningStats(2).fvu())


def test_firing_tracker_counts_tokens_since_last_fire():
    tracker = FiringTracker(3)
    tracker.update(torch.tensor([1, 0, 0]), 100)
    tracker.update(torch.tensor([0, 2, 0]), 100)
    assert tracker.since_fired.tolist() == [100, 0, 200]
    assert tracker.dead_mask(150).tolist() == [False, False, True]
    again = FiringTracker(3)
    again.load_state_dict(tracker.state_dict())
    assert again.since_fired.tolist() == [100, 0, 200]
