"""The ordered blocks of a model, read from its tensor names, its loaded modules or its config.

Three sources answer "how many blocks, where are they, which block does this tensor belong to",
and the tests hold them equal where they overlap (for every family of the test zoo, and for
families no code here names: Phi, GPT-J, OPT, Falcon, StableLM):

- **names** (:meth:`Blocks.from_names`): a block is ``<stack>.<keyword>.<N>`` with a keyword of
  :data:`BLOCK_KEYWORDS` (``model.layers.3``, ``transformer.h.3``, ``encoder.layer.3``,
  ``blk.3`` in GGUF files). Stacks (the text before the keyword: ``encoder.`` / ``decoder.``) are
  laid end to end in order of first appearance, so an encoder-decoder model of 6 + 6 blocks has
  12, and a stack holds ``max N + 1`` blocks (a model saved in part keeps its block numbers);
- **a loaded module** (:meth:`Blocks.from_module`): the longest ``nn.ModuleList`` is the main
  stack (what a bare block number ``"6"`` names when a hook is placed);
- **the config** (:func:`config_blocks`): ``num_hidden_layers`` and its other spellings.

Only names and keywords go in, so this works for any architecture that numbers its blocks; the
per-family roles of the tensors inside a block are :mod:`roles`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

from xsae_cli.zoo.anatomy.shape import config_value

# Path segments that are followed by a block number; longest first when matched.
BLOCK_KEYWORDS: tuple[str, ...] = ("layers", "layer", "h", "blocks", "block", "blk", "mixer", "rwkv")


@lru_cache(maxsize=64)
def block_pattern(keywords: tuple[str, ...] = BLOCK_KEYWORDS) -> re.Pattern[str]:
    """``(?:^|\\.)(?:kw1|kw2...)\\.(N)`` followed by a dot or the end of the name."""
    words = "|".join(re.escape(w) for w in sorted(keywords, key=len, reverse=True))
    return re.compile(rf"(?:^|\.)(?:{words})\.(\d+)(?=\.|$)")


def block_index(name: str, keywords: tuple[str, ...] = BLOCK_KEYWORDS) -> int | None:
    """The block number written in ``name`` (within its stack), or None outside blocks."""
    m = block_pattern(tuple(keywords)).search(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Blocks:
    """Ordered blocks: ``paths[i]`` is block ``i``'s module path; ``stacks`` are ``(key, count)``
    in order, where ``key`` is the text before the block keyword (``""`` for a one-stack model)."""

    paths: tuple[str, ...]
    stacks: tuple[tuple[str, int], ...] = ()
    keywords: tuple[str, ...] = BLOCK_KEYWORDS

    @property
    def n_blocks(self) -> int:
        return len(self.paths)

    @cached_property
    def _offsets(self) -> dict[str, int]:
        out, total = {}, 0
        for key, count in self.stacks:
            out[key] = total
            total += count
        return out

    def locate(self, name: str) -> tuple[str, int] | None:
        """``(stack key, number within the stack)`` of a tensor or module name, or None."""
        m = block_pattern(self.keywords).search(name)
        return (name[: m.start()], int(m.group(1))) if m else None

    def index(self, name: str) -> int | None:
        """The global block index of a tensor or module name (stacks end to end), or None.

        Parsed with the keywords where the name's stack is known; otherwise (blocks read from a
        module, whose stack may use any name) the block whose path is a prefix of ``name``."""
        where = self.locate(name)
        offsets = self._offsets
        if where is not None and where[0] in offsets:
            return offsets[where[0]] + where[1]
        if not self.stacks:
            by_path = self._by_path
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                hit = by_path.get(".".join(parts[:cut]))
                if hit is not None:
                    return hit
        return None

    @cached_property
    def _by_path(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.paths)}

    def depth(self, name: str) -> float | None:
        """``(index + 0.5) / n_blocks``: where in the network a block's tensor sits, in (0, 1)."""
        i = self.index(name)
        return None if i is None else (i + 0.5) / self.n_blocks

    @classmethod
    def from_names(cls, names: Iterable[str], keywords: Iterable[str] = BLOCK_KEYWORDS) -> Blocks:
        keywords = tuple(keywords)
        pat = block_pattern(keywords)
        top: dict[str, int] = {}
        path_of: dict[tuple[str, int], str] = {}
        for n in names:
            m = pat.search(n)
            if not m:
                continue
            key, idx = n[: m.start()], int(m.group(1))
            top[key] = max(top.get(key, -1), idx)
            path_of.setdefault((key, idx), n[: m.end()].lstrip("."))
        paths: list[str] = []
        for key, hi in top.items():
            for i in range(hi + 1):  # a missing block keeps its place (a model saved in part)
                paths.append(path_of.get((key, i)) or _sibling_path(path_of, key, i))
        return cls(tuple(paths), tuple((k, hi + 1) for k, hi in top.items()), keywords)

    @classmethod
    def from_module(cls, model: Any) -> Blocks:
        """The main stack of a loaded model: its longest ``nn.ModuleList`` (empty when it has none)."""
        found = module_blocks(model)
        if found is None:
            return cls(())
        path, blocks = found
        return cls(tuple(f"{path}.{i}" if path else str(i) for i in range(len(blocks))))


def _sibling_path(path_of: dict[tuple[str, int], str], key: str, i: int) -> str:
    """The path block ``i`` of stack ``key`` would have, from a block of the stack that is there."""
    k, j = next((k, j) for (k, j) in path_of if k == key)
    known = path_of[(k, j)]
    return known[: len(known) - len(str(j))] + str(i)


def module_blocks(model: Any) -> tuple[str, Any] | None:
    """``(path, ModuleList)`` of a loaded model's main stack of blocks: its longest ``nn.ModuleList``
    (the first of equal length). Derived from the module tree alone: no name is assumed."""
    from torch import nn

    best: tuple[str, Any] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    return best


def config_blocks(config: Any) -> int | None:
    """Blocks the config declares (``num_hidden_layers``, ``n_layer``, ``n_layers``, ``num_layers``)."""
    value = config_value(config, "blocks")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
