"""One model anatomy: blocks, shape and tensor roles, for the zoo, the activation store, align's
layer pairing, the SANE views and the lineage transforms.

- :mod:`blocks`: how many blocks, their module paths, tensor name -> block index and depth; from
  tensor names, a loaded module or the config (and the tests hold the three equal);
- :mod:`shape`: the config readers (residual width, head counts with GQA/MQA, head size, tying);
- :mod:`roles`: per-family tensor roles (embedding, head, norms, q/k/v/o with their head axes,
  MLP in/gate/out), the fast path a derived anatomy is tested against;
- :mod:`derive`: the same roles derived from a loaded module and one probe forward pass, for
  every family no rule names (:meth:`Anatomy.from_config` builds the model from its config).

:class:`Anatomy` joins a shape and its family's roles; everything that permutes, rescales or reads
a model by role takes one (the lineage transforms still call it ``Arch``). A derived anatomy
replaces ``rules`` (any :class:`roles.RoleRules`), nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from xsae_cli.core.errors import XsaeError
from xsae_cli.zoo.anatomy.blocks import (
    BLOCK_KEYWORDS,
    Blocks,
    block_index,
    block_pattern,
    config_blocks,
    module_blocks,
)
from xsae_cli.zoo.anatomy.roles import (
    EMBEDDINGS,
    HEADS_KV,
    HEADS_Q,
    MLP,
    QKV,
    QKV_CAT,
    QKV_GROUPED,
    QKV_HEADS,
    READERS,
    RESID,
    WRITERS,
    FamilyRules,
    RoleRules,
    TensorRole,
    family_rules,
    known_families,
    register_family,
)
from xsae_cli.zoo.anatomy.shape import CONFIG_KEYS, Shape, config_get, config_value

__all__ = [
    "BLOCK_KEYWORDS",
    "CONFIG_KEYS",
    "EMBEDDINGS",
    "HEADS_KV",
    "HEADS_Q",
    "MLP",
    "QKV",
    "QKV_CAT",
    "QKV_GROUPED",
    "QKV_HEADS",
    "READERS",
    "RESID",
    "WRITERS",
    "Anatomy",
    "Blocks",
    "FamilyRules",
    "RoleRules",
    "Shape",
    "TensorRole",
    "anatomy_of",
    "block_index",
    "block_pattern",
    "config_blocks",
    "config_get",
    "config_value",
    "count_blocks",
    "family_rules",
    "known_families",
    "module_blocks",
    "register_family",
]


@dataclass(frozen=True)
class Anatomy(Shape):
    """A model's shape (from its config) and the roles of its tensors."""

    rules: RoleRules | None = field(default=None, compare=False, repr=False)  # None: the family's written-out rules

    @property
    def roles(self) -> RoleRules:
        rules: RoleRules | None = self.rules or family_rules(self.model_type)
        if rules is None:
            raise XsaeError(f"no tensor roles are known for model type '{self.model_type}'", f"known: {', '.join(known_families())}")
        return rules

    @classmethod
    def from_config(cls, config: Any, rules: RoleRules | None = None, derive: bool = True) -> Anatomy:
        """The anatomy of a config (dict or transformers config): its family's written-out roles
        (or ``rules``), else (``derive``) roles derived from the model the config builds."""
        mt = config_get(config, "model_type")
        rules = rules or family_rules(mt)
        if rules is None:
            if not derive:
                raise XsaeError(f"no tensor roles are known for model type '{mt}'", f"known: {', '.join(known_families())}")
            from xsae_cli.zoo.anatomy.derive import derived_from_config

            derived, shape = derived_from_config(config)
            return cls.from_derived(derived, shape)
        s = Shape.read(config, tied_default=rules.tied_default)
        return cls(s.model_type, s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.tied, rules)

    @classmethod
    def from_derived(cls, rules: RoleRules, s: Shape) -> Anatomy:
        return cls(s.model_type, s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.tied, rules)

    @classmethod
    def from_module(cls, model: Any) -> Anatomy:
        """The derived anatomy of a loaded model (any ``nn.Module`` with an input embedding)."""
        from xsae_cli.zoo.anatomy.derive import derive

        rules, shape = derive(model)
        return cls.from_derived(rules, shape)

    @property
    def post_ln(self) -> bool:
        return self.roles.post_ln

    def role(self, name: str) -> TensorRole:
        return self.roles.role(name)

    def block(self, name: str) -> int | None:
        return self.role(name).block

    def norm_readers(self, names: Iterable[str]) -> list[tuple[str, list[str], bool, bool]]:
        return self.roles.norm_readers(self.n_layers, self.tied, names)

    def attention_prefixes(self, names: Iterable[str]) -> list[str]:
        return self.roles.attention_prefixes(names)


def anatomy_of(resolved: Any) -> tuple[Anatomy | None, str]:
    """The :class:`Anatomy` of a resolved zoo model (from the config.json the zoo read), or None and why not."""
    config = getattr(resolved, "config", None)
    if not config:
        return None, "no config.json"
    try:
        return Anatomy.from_config(config), ""
    except (XsaeError, TypeError, ValueError, KeyError) as e:
        return None, str(e).split("\n")[0]


def count_blocks(model: Any) -> int | None:
    """Blocks of a loaded model: its config's count, else its main ``ModuleList``'s length."""
    n = config_blocks(getattr(model, "config", None))
    if n is None:
        found = module_blocks(model)
        n = len(found[1]) if found is not None and len(found[1]) else None
    return n
