"""What a model's config says about its shape: blocks, residual width, heads, tying.

One reader for every config spelling the code meets (transformers' ``config.json`` of every
family, a ``PretrainedConfig`` object, the config dict the zoo builds for a GGUF or ``.pt`` file):
``config_value(cfg, "hidden")`` is ``hidden_size``, ``n_embd``, ``d_model`` or ``dim``, whichever
the config has. The head split follows the config's head counts: ``n_kv_heads < n_heads`` is
grouped-query attention (Qwen2, Mistral: 2 of 4), ``n_kv_heads = 1`` multi-query (Gemma, Falcon
``multi_query``); ``head_dim`` is given (Gemma) or ``hidden / heads``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# what -> config keys, first present wins
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "blocks": ("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model", "dim"),
    "heads": ("num_attention_heads", "n_head", "n_heads", "num_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv"),
    "head_dim": ("head_dim",),
    "tied": ("tie_word_embeddings",),
    "model_type": ("model_type",),
}


def config_get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` of a dict or ``config.key`` of an object (a transformers config)."""
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def config_value(config: Any, what: str, default: Any = None) -> Any:
    """The first of :data:`CONFIG_KEYS` ``[what]`` that the config sets (not None)."""
    for key in CONFIG_KEYS[what]:
        value = config_get(config, key)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class Shape:
    """Residual width, head split and tying of a model, from its config (no weight is read)."""

    model_type: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def read(cls, config: Any, tied_default: bool = True) -> Shape:
        """``tied_default``: what a config without ``tie_word_embeddings`` means for its family."""
        d = int(config_value(config, "hidden"))
        heads = int(config_value(config, "heads"))
        kv = config_value(config, "kv_heads") or (1 if config_get(config, "multi_query") else heads)
        hd = config_value(config, "head_dim") or d // heads
        layers = config_value(config, "blocks")
        return cls(str(config_value(config, "model_type", "")), int(layers), d, heads, int(kv), int(hd), bool(config_value(config, "tied", tied_default)))

    @property
    def q_width(self) -> int:
        """Rows of the query projection: every query head's ``head_dim`` coordinates."""
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Rows of a key or value projection (fewer than the query's under GQA/MQA)."""
        return self.n_kv_heads * self.head_dim

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads
