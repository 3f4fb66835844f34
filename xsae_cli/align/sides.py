"""The two models of an alignment run, one :class:`Side` each, and how their layers pair up.

Layers: a bare index names a block of model A; model B's block is the one at the same relative
depth (the same fraction of blocks applied: ``round((a + 1) * n_b / n_a) - 1``). ``a:b`` pairs
them explicitly. Block counts come from the model anatomy (``zoo/anatomy``), from the config alone
before any weights load, so a bad layer costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from xsae_cli.core.errors import XsaeError


def n_blocks(model: Any) -> int:
    """Number of transformer blocks (zoo/anatomy: the config's count, else the main ModuleList's)."""
    from xsae_cli.zoo.anatomy import count_blocks

    value = count_blocks(model)
    if value is not None:
        return value
    raise XsaeError(f"cannot tell how many blocks {type(model).__name__} has", "pair layers of a transformer with a num_hidden_layers config entry")


def blocks_of(name: str) -> int:
    """Blocks of a model from its config file alone (layer checks should not wait for a weight load)."""
    from xsae_cli.zoo.anatomy import config_blocks
    from xsae_cli.zoo.registry import resolve_entry

    value = config_blocks(resolve_entry(name).config)
    if value is not None:
        return value
    raise XsaeError(f"cannot tell how many blocks {name} has from its config", "pair layers of a transformer with a num_hidden_layers config entry")


def matched_depth(layer_a: int, n_a: int, n_b: int) -> int:
    """B's block after which the same fraction of blocks has run as after A's block ``layer_a``."""
    return min(n_b - 1, max(0, math.floor((layer_a + 1) * n_b / n_a + 0.5) - 1))


def parse_layers(specs: list[str], names: tuple[str, str], n_a: int, n_b: int) -> list[tuple[int, int]]:
    """``["5", "6", "7"]`` or ``["5:1", "15:3"]`` -> [(layer_a, layer_b), ...], checked against both depths."""
    out: list[tuple[int, int]] = []
    if not specs:
        raise XsaeError("no layers given", "pass e.g. --layers 5,6,7 (A's blocks; B at the same relative depth) or --layers 5:1,15:3")
    for raw in specs:
        text = str(raw).strip()
        parts = text.split(":")
        if len(parts) > 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
            raise XsaeError(f"bad layer '{text}'", "write a block index of model A (5) or an explicit pair a:b (5:1)")
        la = int(parts[0])
        if not 0 <= la < n_a:
            raise XsaeError(f"layer {la} is out of range for {names[0]} ({n_a} blocks)", f"pick layers of {names[0]} in 0..{n_a - 1}")
        if len(parts) == 2:
            lb = int(parts[1])
            if not 0 <= lb < n_b:
                raise XsaeError(f"layer {lb} is out of range for {names[1]} ({n_b} blocks)", f"pick layers of {names[1]} in 0..{n_b - 1}")
        else:
            lb = matched_depth(la, n_a, n_b)
        if (la, lb) not in out:
            out.append((la, lb))
    return out


@dataclass
class Side:
    """One model of the pair: ``key`` is "a" or "b"; ``hooks`` maps each of its paired blocks to its module path."""

    key: str
    name: str
    model: Any
    tokenizer: Any
    blocks: int
    hooks: dict[int, str] = field(default_factory=dict)
    width: int = 0

    @property
    def hook_list(self) -> list[str]:
        """Its hooked modules, once each, in pairing order."""
        return list(dict.fromkeys(self.hooks.values()))

    def layer_of(self, hook: str) -> int:
        return next(layer for layer, h in self.hooks.items() if h == hook)

    def contexts(self, split: Any) -> Any:
        """This side's tokenised windows of a pairing split."""
        return getattr(split, self.key)


def load_sides(spec: Any, layer_pairs: list[tuple[int, int]]) -> tuple[Side, Side, Any]:
    """Both models on the run's device, their hooks resolved; (A, B, device)."""
    from xsae_cli.align.pairing import check_fast
    from xsae_cli.core.hardware import resolve_device, resolve_dtype
    from xsae_cli.data.activations import resolve_module_name
    from xsae_cli.zoo.registry import resolve_entry
    from xsae_cli.zoo.sources import load_model

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    out = []
    for key, name, layers in (("a", spec.a, [la for la, _ in layer_pairs]), ("b", spec.b, [lb for _, lb in layer_pairs])):
        model, tok = load_model(resolve_entry(name), device=device, dtype=dtype, trust_remote_code=spec.trust_remote_code)
        check_fast(tok, name)
        side = Side(key, name, model, tok, n_blocks(model))
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and spec.settings.context_size > limit:
            raise XsaeError(f"context size {spec.settings.context_size} is longer than {name} accepts ({limit} positions)", f"pass --context-size {limit} or less")
        side.hooks = {layer: resolve_module_name(model, str(layer)) for layer in layers}
        out.append(side)
    return out[0], out[1], device


def _tokenizer(resolved: Any, name: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    from xsae_cli.zoo.sources import quiet_transformers

    folder = resolved.model_dir
    if folder is None:
        raise XsaeError(f"{name} has no model folder with a tokenizer", "add an HF folder (config.json and tokenizer files)")
    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(folder, **({"trust_remote_code": True} if trust_remote_code else {}))
    except (OSError, ValueError) as exc:
        raise XsaeError(f"{name} has no usable tokenizer: {str(exc).splitlines()[0]}", "add a folder with tokenizer files") from exc
    # transformers builds an empty tokenizer for a folder with a config but no tokenizer files: it
    # turns every text into no tokens, and the pairing silently finds 0 pairs.
    if not tok("The quick brown fox jumps over the lazy dog.", add_special_tokens=False).get("input_ids"):
        raise XsaeError(f"{name}'s tokenizer in {folder} turns text into no tokens (no tokenizer files there?)", "add the model's tokenizer files (tokenizer.json, or vocab and merges) to the folder")
    return tok
