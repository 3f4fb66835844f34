"""The protocol's pieces: layer pairing, count checks, and one direction scored on known ground truth."""

from __future__ import annotations

import pytest
import torch

from xsae_cli.align.scoring import Views, score_direction, similarity
from xsae_cli.align.settings import AlignSettings, MlpMapperSettings
from xsae_cli.align.sides import Side, matched_depth, parse_layers
from xsae_cli.align.stages import Pairing, check_counts
from xsae_cli.align.transfer import TransferSpec
from xsae_cli.core.errors import XsaeError
from xsae_cli.sae.models import SaeConfig, create_sae


def test_layers_pair_by_relative_depth_or_explicitly() -> None:
    names = ("smollm2-135m", "minilm-l6")
    # 30 vs 6 blocks: after block 5 of A, 6/30 = 20% of A has run; B's nearest is 1 block (index 0).
    assert parse_layers(["5", "6", "7"], names, 30, 6) == [(5, 0), (6, 0), (7, 1)]
    assert parse_layers(["29", "14"], names, 30, 6) == [(29, 5), (14, 2)]
    assert parse_layers(["5:3", "5:3", "0:0"], names, 30, 6) == [(5, 3), (0, 0)]
    assert matched_depth(0, 6, 30) == 4 and matched_depth(5, 6, 30) == 29
    with pytest.raises(XsaeError, match=r"layer 31 is out of range for smollm2-135m \(30 blocks\).*0\.\.29"):
        parse_layers(["31"], names, 30, 6)
    with pytest.raises(XsaeError, match=r"layer 6 is out of range for minilm-l6 \(6 blocks\).*0\.\.5"):
        parse_layers(["5:6"], names, 30, 6)
    with pytest.raises(XsaeError, match="bad layer"):
        parse_layers(["five"], names, 30, 6)


class _Split:
    def __init__(self, n: int) -> None:
        self.n_pairs = n


class _Corpus:
    def __init__(self, train: int, val: int, test: int) -> None:
        self.splits = {"train": _Split(train), "val": _Split(val), "test": _Split(test)}


def test_too_few_pairs_is_an_error_with_the_counts() -> None:
    a, b = Side("a", "a", None, None, 1, width=576), Side("b", "b", None, None, 1, width=384)
    with pytest.raises(XsaeError, match=r"too few paired tokens: train 900, val 300, test 400 .* 576 \(a\) and 384 \(b\).*1,152 train"):
        check_counts(Pairing(_Corpus(900, 300, 400), {}, {}), a, b)
    check_counts(Pairing(_Corpus(1200, 80, 300), {}, {}), a, b)  # enough


def _views(acts: dict[str, torch.Tensor], seed: int, k: int = 4) -> Views:
    from xsae_cli.align.scoring import _views as build

    d = acts["train"].shape[1]
    saes = []
    for s in (seed, seed + 1):  # untrained SAEs stand in for two seeds: the plumbing is what is tested
        sae = create_sae(SaeConfig(arch="topk", d_in=d, d_sae=4 * d, k=k), seed=s)
        saes.append(sae.eval())
    return build(acts, saes[0], saes[1])


def test_one_direction_on_a_known_rotation() -> None:
    g = torch.Generator().manual_seed(0)
    n = {"train": 3000, "val": 600, "test": 1000}
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    a, b = {}, {}
    for split, rows in n.items():
        x = torch.randn(rows, 16, generator=g) * torch.linspace(2.0, 0.5, 16)
        a[split] = x
        b[split] = 3.0 * x @ q + 0.05 * torch.randn(rows, 16, generator=g) + 1.0  # B = rotation of A + noise
    va, vb = _views(a, 0), _views(b, 10)
    spec = TransferSpec(a="a", b="b", out=None, settings=AlignSettings(mappers=["procrustes", "ridge", "mlp"]), mlp=MlpMapperSettings(hidden=32, max_epochs=4, batch_size=64, lr=3e-3))  # type: ignore[arg-type]
    maps: dict = {}
    rows = score_direction(va, vb, spec, lambda: None, maps)
    by = {(r["space"], r["mapper"]): r for r in rows}
    assert set(by) == {(s, m) for s in ("acts", "codes") for m in ("procrustes", "ridge", "mlp")}
    for mapper in ("procrustes", "ridge"):
        row = by[("acts", mapper)]
        assert row["test"]["r2"] > 0.99 and row["test"]["cosine"] > 0.99
        assert abs(row["null"]["r2"]) < 0.02 and abs(row["null"]["cosine"]) < 0.05  # shuffled pairs: nothing
        assert abs(row["mean"]["r2"]) < 0.01 and row["mean"]["cosine"] == 0.0
        assert row["test"]["latent_r"] > row["null"]["latent_r"] + 0.5
        assert row["test"]["f1"] > row["null"]["f1"] and row["test"]["matched"] > row["null"]["matched"]
        assert "ceiling" not in row and row["sae_ref"]["r2"] is not None
        # The upper bound (fit on the test pairs) is the in-sample optimum: nothing fit elsewhere beats it.
        assert row["upper"]["r2"] >= row["test"]["r2"] - 1e-6 and row["upper"]["r2"] > 0.99
    assert by[("acts", "ridge")]["fit"]["test"]["alpha"] > 0
    assert by[("acts", "mlp")]["test"]["r2"] > by[("acts", "mlp")]["null"]["r2"] + 0.3
    assert set(maps) == {"procrustes", "ridge", "mlp"}  # the fitted activation maps, for interventions
    sim = similarity(va, vb, seed=0)
    assert sim["cka_acts"]["test"] > 0.99 and sim["cka_acts"]["null"] < 0.05
    assert sim["svcca_acts"]["test"] > 0.99 and abs(sim["svcca_acts"]["null"]) < 0.1


def test_a_model_paired_with_itself_gets_four_different_saes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With one seed per SAE index, A and B were the same SAE when A == B and every code row read 1.000."""
    from xsae_cli.align.stages import Harvest, sae_seed, train_all_saes
    from xsae_cli.sae.settings import SaeTrainSettings

    assert len({sae_seed(0, side, w) for side in "ab" for w in (1, 2)}) == 4
    rows = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    sides = (Side("a", "m", None, None, 2, {0: "h.0"}, 8), Side("b", "m", None, None, 2, {0: "h.0"}, 8))
    spec = TransferSpec(a="m", b="m", out=tmp_path, sae=SaeTrainSettings(k=2, expansion=2, tokens=1024, batch_size=256, log_every=1))
    data = Harvest({}, {"a": {"h.0": rows}, "b": {"h.0": rows.clone()}}, {})
    saes = train_all_saes(spec, sides, data, {}, tmp_path, "cpu")
    weights = [saes.of(side, w)["h.0"].W_enc.detach() for side in sides for w in (1, 2)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(weights[i], weights[j]), (i, j)  # same data, four different SAEs
