"""The mapper registry: a mapper defined and registered here runs through the transfer fitting
code with no other file changed; old names resolve; the intervention check reads ``linear``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from xsae_cli.align.linear import LinearMap
from xsae_cli.align.mappers import (
    ALIASES,
    MAPPERS,
    canonical,
    default_mappers,
    linear_mappers,
    mapper_names,
    register_mapper,
)
from xsae_cli.align.settings import AlignSettings
from xsae_cli.core.errors import XsaeError


class LeastSquares:
    """Plain least squares through ``torch.linalg.lstsq``: no penalty, no validation rows."""

    name = "lstsq"
    linear = True
    describes = "unpenalised least squares (test mapper)"

    def fit(self, x: torch.Tensor, y: torch.Tensor, x_val: Any = None, y_val: Any = None) -> LinearMap:
        mx, my = x.double().mean(0), y.double().mean(0)
        w = torch.linalg.lstsq(x.double() - mx, y.double() - my).solution
        return LinearMap(w, mx, my, {"rank": int(torch.linalg.matrix_rank(x.double() - mx))})


class Constant:
    """Predicts the training mean: a nonlinear-flagged mapper (no linear part to move directions)."""

    name = "constant"
    linear = False
    describes = "the training mean of the target (test mapper)"

    def fit(self, x: torch.Tensor, y: torch.Tensor, x_val: Any = None, y_val: Any = None) -> Any:
        mean = y.float().mean(0)

        class Fitted:
            def __init__(self) -> None:
                self.info: dict[str, Any] = {"rows": int(x.shape[0])}

            def predict(self, xs: torch.Tensor) -> torch.Tensor:
                return mean.expand(xs.shape[0], -1).clone()

            def direction(self, v: torch.Tensor) -> torch.Tensor:
                return torch.zeros_like(mean)

        return Fitted()


@pytest.fixture()
def registered() -> Iterator[None]:
    register_mapper(LeastSquares, default=False)
    register_mapper(Constant, aliases={"mean": "'mean' is called 'constant' now"}, default=False)
    yield
    for name in ("lstsq", "constant"):
        MAPPERS.pop(name, None)
    ALIASES.pop("mean", None)


def test_a_mapper_registered_here_runs_through_the_transfer_fitting_code(registered: None) -> None:
    from tests.unit.align.test_transfer import _views
    from xsae_cli.align.scoring import score_direction
    from xsae_cli.align.transfer import TransferSpec

    assert "lstsq" in mapper_names() and "lstsq" in linear_mappers() and "lstsq" not in default_mappers()
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    a, b = {}, {}
    for split, rows in {"train": 2000, "val": 400, "test": 800}.items():
        a[split] = torch.randn(rows, 12, generator=g)
        b[split] = 2.0 * a[split] @ q + 0.01 * torch.randn(rows, 12, generator=g)  # a known linear map
    maps: dict[str, Any] = {}
    spec = TransferSpec(a="a", b="b", out=Path("."), settings=AlignSettings(mappers=["lstsq", "mean"]))
    rows = score_direction(_views(a, 0), _views(b, 10), spec, lambda: None, maps)
    by = {(r["space"], r["mapper"]): r for r in rows}
    assert set(by) == {(s, m) for s in ("acts", "codes") for m in ("lstsq", "mean")}
    assert by[("acts", "lstsq")]["test"]["r2"] > 0.999 and abs(by[("acts", "lstsq")]["null"]["r2"]) < 0.05
    assert by[("acts", "lstsq")]["fit"]["test"]["rank"] == 12  # the mapper's own info reaches the report
    assert abs(by[("acts", "mean")]["test"]["r2"]) < 0.01  # the alias ran the registered class
    assert isinstance(maps["lstsq"], LinearMap)


def test_the_intervention_mapper_must_be_linear_by_its_registration(registered: None, tmp_path: Path) -> None:
    from xsae_cli.align.transfer import TransferSpec, run_transfer

    spec = TransferSpec(a="a", b="b", out=tmp_path / "run", settings=AlignSettings(mappers=["ridge", "constant"], intervene_mapper="constant"))
    with pytest.raises(XsaeError, match=r"must be a linear mapper \(procrustes or ridge or lstsq\), got 'constant'"):
        run_transfer(spec)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_old_names_resolve_with_a_note_and_unknown_names_suggest() -> None:
    notes: list[str] = []
    assert canonical("hypernet", notes.append) == "mlp" and "now called 'mlp'" in notes[0]
    assert default_mappers() == ["procrustes", "ridge", "mlp"]  # linear references first
    with pytest.raises(XsaeError, match=r"unknown mapper 'ridg'.*did you mean 'ridge'"):
        canonical("ridg")
    with pytest.raises(ValueError, match="name .* and linear"):
        register_mapper(type("NoFlags", (), {"name": "x"}))
