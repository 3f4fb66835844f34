"""The lineage benchmark's baselines, scored on the same members in the same run as SANE.

- per-tensor quantile statistics (:func:`quantile_features`): 9 quantiles, mean and std of every
  tensor, compared between models by name (no shared name: infinitely far). Blind to permutations
  by construction, so it is the bar on every function-preserving type;
- a randomly initialised encoder of the checkpoint's shape (:func:`random_encoder`, gains of 1):
  what the architecture and the tokenisation give before any training.
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
RANDOM_ENCODER_SEED = 12345


def quantile_features(state_iter: Any) -> dict[str, np.ndarray]:
    """Per-tensor quantiles plus mean and std: the statistics baseline."""
    import torch

    q = torch.tensor(QUANTILES, dtype=torch.float32)
    feats = {}
    for name, t in state_iter:
        if not t.is_floating_point() or t.numel() < 2:
            continue
        x = t.reshape(-1).float()
        if x.numel() > 1_000_000:
            x = x[torch.arange(1_000_000, dtype=torch.int64) * (x.numel() - 1) // 999_999]  # exact ints: float linspace overshoots at 28M
        feats[name] = np.concatenate([torch.quantile(x, q).numpy(), [float(x.mean()), float(x.std())]])
    return feats


def quantile_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Mean over shared tensors of ||a - b|| / ||b||; no shared tensor -> inf."""
    shared = [n for n in a if n in b and a[n].shape == b[n].shape]
    if not shared:
        return float("inf")
    return float(np.mean([np.linalg.norm(a[n] - b[n]) / (np.linalg.norm(b[n]) + 1e-12) for n in shared]))


def quantile_matrix(feats: list[dict[str, np.ndarray]]) -> np.ndarray:
    """:func:`quantile_distance` for all pairs, vectorised within groups of identical tensor tables."""
    n = len(feats)
    out = np.full((n, n), np.inf)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, f in enumerate(feats):
        groups.setdefault(tuple(sorted(f)), []).append(i)
    for names, idx in groups.items():
        if not names:
            continue
        arr = np.stack([np.stack([feats[i][k] for k in names]) for i in idx])  # [m, T, F]
        diff = np.linalg.norm(arr[:, None] - arr[None, :], axis=-1)  # [m, m, T]
        norm = np.linalg.norm(arr, axis=-1)[None, :, :] + 1e-12
        out[np.ix_(idx, idx)] = (diff / norm).mean(-1)
    return out


RAW_SAMPLE = 1 << 16  # floats kept per tensor (evenly spaced) by the raw cosine baseline


def raw_features(state_iter: Any, sample: int = RAW_SAMPLE) -> dict[str, np.ndarray]:
    """Each float tensor flattened (at most ``sample`` evenly spaced entries): the raw-weights baseline."""
    feats = {}
    for name, t in state_iter:
        if not t.is_floating_point() or t.numel() < 2:
            continue
        x = t.reshape(-1)
        if x.numel() > sample:
            import torch

            x = x[torch.arange(sample, dtype=torch.int64) * (x.numel() - 1) // (sample - 1)]
        feats[name] = x.float().numpy().astype(np.float32)
    return feats


def raw_cosine_matrix(feats: list[dict[str, np.ndarray]]) -> np.ndarray:
    """1 - cosine of the concatenated weights two models share (same name and shape), as stored:
    what a function-preserving permutation or rotation defeats; no shared tensor -> infinitely far."""
    n = len(feats)
    out = np.full((n, n), np.inf)
    for i in range(n):
        for j in range(i, n):
            shared = [k for k in feats[i] if k in feats[j] and feats[i][k].shape == feats[j][k].shape]
            if not shared:
                continue
            a = np.concatenate([feats[i][k] for k in shared]).astype(np.float64)
            b = np.concatenate([feats[j][k] for k in shared]).astype(np.float64)
            out[i, j] = out[j, i] = 1.0 - float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    return out


def random_encoder(model_cfg: dict[str, Any], seed: int = RANDOM_ENCODER_SEED) -> Any:
    """A SANE autoencoder of the checkpoint's shape, randomly initialised from ``seed`` (the torch
    global seed is set, as training would)."""
    import torch

    from xsae_cli.sane.model import SaneAutoencoder, SaneModelConfig

    torch.manual_seed(seed)
    return SaneAutoencoder(SaneModelConfig(**model_cfg)).eval()
