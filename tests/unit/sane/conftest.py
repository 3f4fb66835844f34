"""SANE unit-test fixtures: one CPU thread (the test machine is shared) and tokenised tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sane_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sane-cache")


@pytest.fixture(scope="session")
def tiny_models(demo_zoo: Path, sane_cache: Path) -> list:
    """The five tiny demo models' weights as stored, tokenised once per session into a private
    cache (the cache and window mechanics are the same for every view; views have their own tests)."""
    from xsae_cli.sane.dataset import TokenizedModel, model_source, tokenize_to_cache
    from xsae_cli.sane.tokenizer import CoordScheme
    from xsae_cli.zoo.demo import TINY

    return [TokenizedModel(tokenize_to_cache(model_source(n), scheme=CoordScheme(view="weights"), cache_dir=sane_cache), n) for n in TINY]
