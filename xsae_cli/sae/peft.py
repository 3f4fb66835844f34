"""Sparse autoencoders as PEFT adapters: inject, run, save and load them the way PEFT users expect.

Why PEFT: people who already place LoRA adapters with ``target_modules=[...]`` and move them around
with ``save_pretrained`` / ``from_pretrained`` get SAEs with the same gestures, several per model,
on any module (a Linear, a LayerNorm, a whole decoder block that returns a tuple). This module
registers one PEFT method, ``XSAE`` (prefix ``xsae_``), in PEFT's own method tables (no patching of
PEFT: see :class:`XsaePeftType`), so PEFT's own functions (``inject_adapter_in_model``,
``PeftModel.from_pretrained``, ``get_peft_model_state_dict``) handle it.

Pieces, in PEFT's pattern (``LoraConfig`` / ``LoraModel`` / ``LoraLayer``):

- :class:`SaeAdapterConfig` (a ``PeftConfig``) and one subclass per registered architecture,
  made from the registry (:func:`sae_adapter_config_class`): ``TopKSaeConfig``, ``ReluSaeConfig``,
  ``BatchTopKSaeConfig``, ``JumpReluSaeConfig``, and one for any architecture registered later.
  One PEFT type covers them all because PEFT refuses to mix adapter types in one model; the
  ``arch`` field picks the subclass again when a config is loaded.
- :class:`SaeLayer` wraps the targeted module; the SAE of each adapter is a
  :class:`~xsae_cli.sae.models.SparseAutoencoder` made by ``create_sae``.
- :class:`SaeTuner` (a ``BaseTuner``) finds the targets and swaps in the wrappers.
- :class:`PeftSaeModel` (a ``PeftModel``) and :func:`get_peft_sae_model`.

Two modes per adapter: ``splice`` replaces the module's output (the hidden-state tensor, first
element when the module returns a tuple) by the SAE's reconstruction; ``observe`` leaves the output
untouched and records the codes on the wrapper (``layer.xsae_codes[adapter]``,
:meth:`PeftSaeModel.get_codes`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from peft import PeftModel
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from xsae_cli.core.errors import XsaeError
from xsae_cli.data.hooks import hidden_of, replace_hidden
from xsae_cli.sae.registry import arch_names, check_arch, get_arch, specs

if TYPE_CHECKING:
    from pathlib import Path

    from xsae_cli.sae.models import SparseAutoencoder

PREFIX = "xsae_"
MODES = ("splice", "observe")
DEFAULT_EXPANSION = 8
DEFAULT_K = 32


# ----------------------------------------------------------------------------------------------
# Registration with PEFT
# ----------------------------------------------------------------------------------------------


class XsaePeftType(str, enum.Enum):
    """xsae's PEFT method type, ``"XSAE"``.

    PEFT's ``register_peft_method`` (0.15 to 0.21) accepts only members of its own closed
    ``PeftType`` enum, which lists the methods that live inside PEFT; there is no public way to
    add one. PEFT reads a config's ``peft_type`` as a string everywhere (``PeftType`` is a ``str``
    enum, the method tables are looked up with plain strings such as ``"LORA"``, and since
    huggingface/peft#2634 a ``peft_type`` of another enum or a ``str`` is supported), so a member
    of this ``str`` enum, whose name and value are both ``"XSAE"``, hashes, compares and serialises
    as the string "XSAE" and PEFT needs no patching.
    """

    XSAE = "XSAE"


PEFT_TYPE = XsaePeftType.XSAE


def _register() -> None:
    """Register config, tuner and prefix with PEFT (idempotent: importing twice is harmless).

    Fills the same three public tables ``register_peft_method`` fills, with the same checks
    (unique type and prefix, the tuner's prefix equal to the registered one), for a type outside
    ``PeftType`` (see :class:`XsaePeftType`).
    """
    from peft import mapping

    # PEFT types these tables as keyed by PeftType; they are plain dicts looked up by string.
    tables: list[tuple[dict[Any, Any], Any]] = [
        (cast(dict, mapping.PEFT_TYPE_TO_CONFIG_MAPPING), SaeAdapterConfig),
        (cast(dict, mapping.PEFT_TYPE_TO_TUNER_MAPPING), SaeTuner),
        (cast(dict, mapping.PEFT_TYPE_TO_PREFIX_MAPPING), PREFIX),
    ]
    if all(table.get(PEFT_TYPE) == value for table, value in tables):
        return
    for table, value in tables:
        held = table.get(PEFT_TYPE)  # this module reloaded: same names, new classes, replaced below
        if held is not None and held != value and getattr(held, "__qualname__", held) != getattr(value, "__qualname__", value):
            raise RuntimeError(f"another PEFT method is registered as {PEFT_TYPE.value} ({held!r})")
    owner = next((t for t, p in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == PREFIX and t != PEFT_TYPE), None)
    if owner is not None:
        raise RuntimeError(f"the PEFT prefix {PREFIX!r} is already used by {owner}")
    assert SaeTuner.prefix == PREFIX
    for table, value in tables:
        table[PEFT_TYPE] = value


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


@dataclass
class SaeAdapterConfig(PeftConfig):
    """Configuration of an SAE adapter, for any registered architecture (``arch``).

    Size: ``num_latents`` (d_sae) or ``expansion_factor`` (d_sae = factor x d_in; 8 when neither is
    given). ``k`` (architectures that use it) defaults to 32. ``d_in`` is inferred from each target
    (Linear.out_features, Embedding.embedding_dim, LayerNorm/RMSNorm normalized_shape, else the
    first forward's output); set it to fix it. :func:`sae_adapter_config_class` gives the
    per-architecture subclass (``TopKSaeConfig``, ...), whose ``arch`` is fixed.
    """

    arch: str = field(default="topk", metadata={"help": "SAE architecture: any registered one (xsae_cli.sae.registry)"})
    k: int | None = field(default=None, metadata={"help": "active latents per token (topk) or on average (batchtopk): architectures that use k"})
    num_latents: int | None = field(default=None, metadata={"help": "d_sae, the number of latents"})
    expansion_factor: float | None = field(default=None, metadata={"help": "d_sae = expansion_factor x d_in when num_latents is not set"})
    d_in: int | None = field(default=None, metadata={"help": "width of the hidden state; inferred from the target when None"})
    mode: str = field(default="splice", metadata={"help": "'splice': output replaced by the reconstruction; 'observe': output unchanged, codes recorded"})
    target_modules: list[str] | set[str] | str | None = field(
        default=None,
        metadata={"help": "module names (exact or suffix match) or a regex, as in LoraConfig; any nn.Module type"},
    )
    exclude_modules: list[str] | set[str] | str | None = field(default=None, metadata={"help": "module names or a regex to leave out"})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "only these layer indices (as in LoraConfig)"})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "name of the layer list, e.g. 'layers' (as in LoraConfig)"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "extra modules trained and saved with the adapter (PEFT's modules_to_save)"})
    dtype: str = field(default="float32", metadata={"help": "dtype of the SAE's weights, whatever the model's dtype"})
    apply_b_dec_to_input: bool = field(default=True, metadata={"help": "subtract b_dec before encoding (SAELens's convention)"})
    init_seed: int | None = field(default=None, metadata={"help": "seed for the SAE's initial weights"})
    sae_kwargs: dict = field(default_factory=dict, metadata={"help": "other SaeConfig fields or architecture options (l1_coefficient, jumprelu_bandwidth, aux_k, ...)"})

    # Set (without annotation, so not a dataclass field) by the per-architecture subclasses.
    _expected_arch = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _register()
        self.peft_type = PEFT_TYPE
        expected = type(self)._expected_arch
        if expected is not None and self.arch != expected:
            raise XsaeError(f"{type(self).__name__} is for arch '{expected}', got arch='{self.arch}'", f"use {_config_name(self.arch)} for {self.arch}")
        spec = get_arch(self.arch)
        if self.mode not in MODES:
            raise XsaeError(f"unknown SAE adapter mode '{self.mode}'", f"use one of {', '.join(MODES)}")
        if spec.uses_k and self.k is None:
            self.k = DEFAULT_K
        if self.num_latents is not None and self.expansion_factor is not None:
            raise XsaeError("both num_latents and expansion_factor are set", "set only one of them")
        if self.num_latents is not None and (not isinstance(self.num_latents, int) or self.num_latents <= 0):
            raise XsaeError(f"num_latents must be a positive integer, got {self.num_latents!r}", "set num_latents to d_sae")
        if self.expansion_factor is not None and not self.expansion_factor > 0:
            raise XsaeError(f"expansion_factor must be positive, got {self.expansion_factor!r}", "e.g. expansion_factor=8")
        if spec.uses_k and self.num_latents is not None and isinstance(self.k, int) and self.k > self.num_latents:
            raise XsaeError(f"k={self.k} is larger than num_latents={self.num_latents}", "lower k or raise num_latents")
        check_arch(self.arch, k=self.k if spec.uses_k else None)
        if self.d_in is not None and (not isinstance(self.d_in, int) or self.d_in <= 0):
            raise XsaeError(f"d_in must be a positive integer, got {self.d_in!r}", "leave it unset to infer it from the target")
        valid = _sae_config_extra_fields() | set(spec.options)
        bad = sorted(set(self.sae_kwargs) - valid)
        if bad:
            raise XsaeError(f"unknown SAE settings in sae_kwargs: {', '.join(bad)}", f"valid: {', '.join(sorted(valid))}")
        # PEFT stores list targets as a set (LoraConfig does the same); saving turns it back into a list.
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> SaeAdapterConfig:
        """Rebuild the per-architecture subclass from a saved ``adapter_config.json``.

        PEFT maps one PEFT type to one config class; the ``arch`` field says which subclass wrote
        the file. Keys this version does not know (a newer xsae) are dropped with a warning, as
        PEFT does for its own configs.
        """
        arch = kwargs.get("arch", "")
        target = sae_adapter_config_class(arch) if arch in arch_names() else cls
        known = {f.name for f in dataclasses.fields(target) if f.init}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            warnings.warn(f"ignoring unknown keys {unknown} in the SAE adapter config (written by a newer xsae?)", stacklevel=2)
        return target(**{k: v for k, v in kwargs.items() if k in known})

    def sae_size(self, d_in: int) -> int:
        """d_sae for a target of width ``d_in``."""
        if self.num_latents is not None:
            return int(self.num_latents)
        factor = self.expansion_factor if self.expansion_factor is not None else DEFAULT_EXPANSION
        return max(1, math.ceil(factor * d_in))


_CONFIG_CLASSES: dict[str, type[SaeAdapterConfig]] = {}
_CONFIG_HINT = "use SaeAdapterConfig(arch=...) or its per-architecture subclass, e.g. TopKSaeConfig"


def _config_name(arch: str) -> str:
    return f"{get_arch(arch).title}SaeConfig"


def sae_adapter_config_class(arch: str) -> type[SaeAdapterConfig]:
    """The adapter config class of one architecture (``TopKSaeConfig`` for ``topk``): ``arch`` fixed.

    Made from the registry on first use, so every registered architecture has one, under the
    name ``<class name without Sae>SaeConfig``, importable from this module.
    """
    spec = get_arch(arch)
    made = _CONFIG_CLASSES.get(arch)
    if made is not None:
        return made
    name = _config_name(arch)
    doc = f"{spec.title} SAE adapter (``arch='{arch}'``): {(spec.cls.__doc__ or '').strip().splitlines()[0] if spec.cls.__doc__ else ''}"
    made = dataclasses.make_dataclass(name, [("arch", str, field(default=arch))], bases=(SaeAdapterConfig,), namespace={"_expected_arch": arch, "__doc__": doc})
    made.__module__ = __name__
    _CONFIG_CLASSES[arch] = made
    return made


def __getattr__(name: str) -> Any:
    """``TopKSaeConfig``, ``ReluSaeConfig``... for every registered architecture."""
    if name.endswith("SaeConfig"):
        for arch, spec in specs().items():
            if f"{spec.title}SaeConfig" == name:
                return sae_adapter_config_class(arch)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _sae_config_extra_fields() -> set[str]:
    """SaeConfig fields that ``sae_kwargs`` may set (the others come from the adapter config)."""
    from xsae_cli.sae.models import SaeConfig

    return {f.name for f in dataclasses.fields(SaeConfig)} - {"arch", "d_in", "d_sae", "k", "dtype", "apply_b_dec_to_input", "metadata"}


# ----------------------------------------------------------------------------------------------
# The layer wrapper
# ----------------------------------------------------------------------------------------------


def _infer_d_in(module: nn.Module) -> int | None:
    """Width of the module's output when its type says it; None means 'learn it at first forward'."""
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    if isinstance(module, nn.Embedding):
        return int(module.embedding_dim)
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if len(shape) == 1:
            return int(shape[0])
    nf = getattr(module, "nf", None)  # transformers' Conv1D (GPT-2)
    if isinstance(nf, int):
        return nf
    return None


class SaeLayer(nn.Module, BaseTunerLayer):
    """Wraps a module; each adapter runs its SAE on the module's output.

    ``xsae_sae`` (a ModuleDict) holds one SparseAutoencoder per adapter; ``xsae_codes`` the last
    codes each adapter computed (detached). An adapter whose d_in is not known from the module's type is
    created at the first forward (or, when loading, from the checkpoint's shapes).
    """

    adapter_layer_names = ("xsae_sae",)
    other_param_names = ("xsae_mode", "xsae_pending", "xsae_codes", "xsae_configs", "xsae_train", "xsae_outputs")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SaeAdapterConfig, module_name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.xsae_sae = nn.ModuleDict()
        self.xsae_mode: dict[str, str] = {}
        self.xsae_pending: dict[str, SaeAdapterConfig] = {}
        self.xsae_codes: dict[str, torch.Tensor] = {}
        self.xsae_configs: dict[str, SaeAdapterConfig] = {}
        # Set for one forward by xsae_cli.sae.adapters.training_outputs: adapters whose SAE takes a
        # training step here ({"keep": token mask or None, "dead": dead-latent mask or None}), and
        # their TrainOutputs (losses with their graphs; the caller pops them right after).
        self.xsae_train: dict[str, dict[str, Any]] = {}
        self.xsae_outputs: dict[str, Any] = {}
        self.module_name = module_name
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def __getattr__(self, name: str) -> Any:
        """Fall back to the wrapped module, so code reading e.g. ``block.attention_type`` still works."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)

    # -- adapters ---------------------------------------------------------------------------

    def update_layer(self, adapter_name: str, config: SaeAdapterConfig) -> None:
        """Add an adapter; its SAE is created now when d_in is known, else at the first forward."""
        self.xsae_mode[adapter_name] = config.mode
        self.xsae_configs[adapter_name] = config
        d_in = config.d_in or _infer_d_in(self.get_base_layer())
        if d_in is None:
            self.xsae_pending[adapter_name] = config
            return
        self._create_sae(adapter_name, d_in, config.sae_size(d_in), device=self._base_device())

    def _create_sae(self, adapter_name: str, d_in: int, d_sae: int, device: Any = None) -> SparseAutoencoder:
        from xsae_cli.sae.models import SaeConfig, create_sae

        config = self.xsae_configs[adapter_name]
        uses_k = get_arch(config.arch).uses_k
        if uses_k and config.k is not None and config.k > d_sae:
            raise XsaeError(f"k={config.k} is larger than d_sae={d_sae} for {self.module_name or 'the target'}", "lower k or raise num_latents")
        metadata = {"hook_name": self.module_name, "peft_adapter": adapter_name}
        if config.base_model_name_or_path:
            metadata["model_name"] = config.base_model_name_or_path
        sae_cfg = SaeConfig.from_dict(
            {  # from_dict: sae_kwargs may hold options of the architecture
                "arch": config.arch,
                "d_in": int(d_in),
                "d_sae": int(d_sae),
                "k": config.k if uses_k else None,
                "dtype": config.dtype,
                "apply_b_dec_to_input": config.apply_b_dec_to_input,
                "metadata": metadata,
                **config.sae_kwargs,
            }
        )
        # Initialised on the CPU (create_sae's rule: same weights on every device), then moved; under
        # PEFT's low_cpu_mem_usage the parameters are on the meta device and are assigned at load.
        sae = create_sae(sae_cfg, seed=config.init_seed)
        if device is not None and not any(p.device.type == "meta" for p in sae.parameters()):
            sae = sae.to(device)
        trainable = adapter_name in self.active_adapters and not config.inference_mode
        sae.requires_grad_(trainable)
        self.xsae_sae[adapter_name] = sae
        self.xsae_pending.pop(adapter_name, None)
        return sae

    def _base_device(self) -> torch.device | None:
        base = self.get_base_layer()
        for tensor in list(base.parameters()) + list(base.buffers()):
            if tensor.device.type != "meta":
                return tensor.device
        return None

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move only the device: the SAE keeps its own dtype (PEFT's version would cast it to the model's)."""
        target = device or self._base_device()
        if target is None or adapter_name not in self.xsae_sae:
            return
        sae = self.xsae_sae[adapter_name]
        if any(p.device.type == "meta" for p in sae.parameters()):
            return
        self.xsae_sae[adapter_name] = sae.to(target)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise XsaeError("an SAE adapter cannot be merged into the model's weights (it is not linear)", "use unload() to remove it, or keep it as an adapter")

    def unmerge(self) -> None:
        return None

    # -- forward ----------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.base_layer(*args, **kwargs)
        active = [a for a in self.active_adapters if a in self.xsae_mode]
        if self.disable_adapters or not active:
            return output
        hidden = hidden_of(output, self.module_name or type(self.base_layer).__name__)
        spliced = False
        for name in active:
            sae = cast("SparseAutoencoder", self.xsae_sae[name]) if name in self.xsae_sae else None  # ModuleDict has no get()
            if sae is None:
                d_in = int(hidden.shape[-1])
                sae = self._create_sae(name, d_in, self.xsae_configs[name].sae_size(d_in), device=hidden.device)
            if hidden.shape[-1] != sae.cfg.d_in:
                raise XsaeError(
                    f"{self.module_name or 'the target'} outputs width {hidden.shape[-1]} but adapter '{name}' has d_in={sae.cfg.d_in}",
                    "set d_in in the adapter config to the hidden-state width, or target another module",
                )
            x = hidden.to(sae.W_enc.dtype)
            if name in self.xsae_train:
                new = self._training_step(name, sae, x)
                if self.xsae_mode[name] == "splice":
                    hidden, spliced = new.to(hidden.dtype), True
                continue
            codes = sae.encode(x)
            # Detached: a tensor holding an autograd graph on a module would keep the graph alive
            # between steps and break copy.deepcopy of the model. Train through splice, or call the
            # SAE on the hidden state, when gradients are wanted.
            self.xsae_codes[name] = codes.detach()
            if self.xsae_mode[name] == "splice":
                hidden = sae.decode(codes).to(hidden.dtype)
                spliced = True
        return replace_hidden(output, hidden) if spliced else output

    def _training_step(self, name: str, sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
        """The SAE's training forward on this hidden state (kept tokens only); returns the hidden
        state with the kept rows replaced by the training reconstruction (gradients flow to both)."""
        plan = self.xsae_train[name]
        flat = x.reshape(-1, x.shape[-1])
        keep = plan.get("keep")
        rows = flat if keep is None else flat[keep.reshape(-1).to(flat.device)]
        out = sae.training_forward(rows, plan.get("dead"))
        self.xsae_outputs[name] = out
        if keep is None:
            return out.x_hat.reshape(x.shape)
        index = keep.reshape(-1).to(flat.device).nonzero().squeeze(1)
        return flat.index_put((index,), out.x_hat.to(flat.dtype)).reshape(x.shape)

    def __repr__(self) -> str:
        rep = super().__repr__()
        return "xsae." + rep


def _sae_identity(config: SaeAdapterConfig) -> tuple:
    """What decides an adapter's SAE (its weights' meaning); mode and bookkeeping may change."""
    return (config.arch, config.k, config.num_latents, config.expansion_factor, config.d_in, config.dtype, config.apply_b_dec_to_input, sorted(config.sae_kwargs.items()))


def _describe(config: SaeAdapterConfig) -> str:
    size = f"num_latents={config.num_latents}" if config.num_latents is not None else f"expansion_factor={config.expansion_factor or DEFAULT_EXPANSION}"
    k = f", k={config.k}" if config.k is not None else ""
    return f"{config.arch}, {size}{k}"


# ----------------------------------------------------------------------------------------------
# The tuner
# ----------------------------------------------------------------------------------------------


class SaeTuner(BaseTuner):
    """PEFT tuner that wraps every targeted module in an :class:`SaeLayer`."""

    prefix: str = PREFIX
    tuner_layer_cls = SaeLayer
    target_module_mapping: dict[str, list[str]] = {}  # noqa: RUF012 - an instance attribute in BaseTuner

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        if getattr(peft_config, "target_modules", None) is None:
            raise XsaeError("the SAE adapter config has no target_modules", "set target_modules=[...] to the modules whose output the SAE reads")
        return peft_config

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        if not isinstance(config, SaeAdapterConfig):
            raise XsaeError(f"an SAE model takes SAE adapter configs, got {type(config).__name__}", _CONFIG_HINT)
        super()._check_new_adapter_config(config)

    def _create_and_replace(  # type: ignore[override]  # PEFT's signature has changed across releases; this takes what it passes
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        assert isinstance(peft_config, SaeAdapterConfig), "checked by _check_new_adapter_config"
        if isinstance(target, SaeLayer):
            if adapter_name in target.xsae_mode:
                # The model was adapted before (inject_adapter_in_model, then get_peft_sae_model): keep
                # the SAE it has, which may have been trained since, instead of re-initialising it.
                old = target.xsae_configs[adapter_name]
                if _sae_identity(old) != _sae_identity(peft_config):
                    raise XsaeError(
                        f"adapter '{adapter_name}' already sits on {current_key} with another SAE ({_describe(old)}, not {_describe(peft_config)})",
                        "pass the config it was injected with, or use another adapter_name",
                    )
                target.xsae_configs[adapter_name] = peft_config
                target.xsae_mode[adapter_name] = peft_config.mode
                return
            target.update_layer(adapter_name, peft_config)
            return
        new_module = SaeLayer(target, adapter_name, peft_config, module_name=current_key)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Swap in the wrapper; unlike PEFT's version this works for modules without a ``weight``
        (a decoder block, an activation), and the SAE keeps its own dtype."""
        setattr(parent, child_name, new_module)
        device = new_module._base_device() if isinstance(new_module, SaeLayer) else None
        if isinstance(new_module, SaeLayer) and device is not None:
            for name, sae in new_module.xsae_sae.items():
                if not any(p.device.type == "meta" for p in sae.parameters()):
                    new_module.xsae_sae[name] = sae.to(device)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # The SAE's dtype is part of its config (SaeConfig.dtype); PEFT's autocast would change it
        # behind the config's back, so saved files and the config would disagree.
        return None

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Create the SAEs still waiting for their first forward from the checkpoint's shapes.

        A target whose width is not known from its type (a decoder block) gets its SAE lazily; when
        loading, PEFT would otherwise find no parameters to put the saved weights into.
        """
        prefix = "base_model.model."
        for name, module in model.named_modules():
            if not isinstance(module, SaeLayer) or adapter_name not in module.xsae_pending:
                continue
            bare = name.removeprefix(prefix)
            for base in (f"{name}.xsae_sae.", f"{prefix}{bare}.xsae_sae.", f"{bare}.xsae_sae."):
                b_dec, b_enc = state_dict.get(base + "b_dec"), state_dict.get(base + "b_enc")
                if b_dec is not None and b_enc is not None:
                    module._create_sae(adapter_name, int(b_dec.shape[-1]), int(b_enc.shape[-1]), device=module._base_device())
                    break
        return super()._remap_adapter_state_dict_for_load(model=model, config=config, adapter_name=adapter_name, state_dict=state_dict)


# ----------------------------------------------------------------------------------------------
# PeftModel
# ----------------------------------------------------------------------------------------------


class PeftSaeModel(PeftModel):
    """A ``PeftModel`` whose adapters are SAEs; adds access to codes and SAEs.

    ``PeftSaeModel.from_pretrained(model, path, adapter_name=...)`` is PEFT's own loader; plain
    ``peft.PeftModel.from_pretrained`` also works once this module is imported.
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> None:
        _register()
        if not isinstance(peft_config, SaeAdapterConfig):
            raise XsaeError(f"PeftSaeModel takes SAE adapter configs, got {type(peft_config).__name__}", _CONFIG_HINT)
        super().__init__(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter, or several at once (PEFT's PeftModel takes only one name).

        Active adapters run in the given order on each shared target: observe adapters read the
        hidden state as it is at their turn, splice adapters replace it for the ones after them.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise XsaeError(f"no adapter named {', '.join(missing)}", f"loaded adapters: {', '.join(self.peft_config)}")
        self.active_adapter = names[0]
        cast(Any, self.base_model).set_adapter(names if len(names) > 1 else names[0], inference_mode=inference_mode)

    def sae_layers(self) -> dict[str, SaeLayer]:
        """``{module path in the base model: wrapper}``."""
        out = {}
        for name, module in cast(Any, self.base_model).model.named_modules():
            if isinstance(module, SaeLayer):
                out[name] = module
        return out

    def get_saes(self, adapter_name: str | None = None) -> dict[str, SparseAutoencoder]:
        """``{module path: SparseAutoencoder}`` of one adapter (default: the active one)."""
        adapter_name = adapter_name or self.active_adapter
        return {name: cast("SparseAutoencoder", layer.xsae_sae[adapter_name]) for name, layer in self.sae_layers().items() if adapter_name in layer.xsae_sae}

    def get_codes(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """``{module path: codes [..., d_sae]}`` from the last forward, for one adapter (default: active)."""
        adapter_name = adapter_name or self.active_adapter
        return {name: layer.xsae_codes[adapter_name] for name, layer in self.sae_layers().items() if adapter_name in layer.xsae_codes}

    def export_saes(self, path: str | Path, adapter_name: str | None = None, *, format: str = "saelens", force: bool = False) -> dict[str, Path]:
        """Write each SAE of an adapter to ``path/<module path>/`` in SAELens's (or sparsify's) layout."""
        from pathlib import Path as _Path

        from xsae_cli.sae.formats import save_sae

        root = _Path(path)
        out = {}
        for name, sae in self.get_saes(adapter_name).items():
            if format == "sparsify":
                out[name] = save_sae(sae, root, format="sparsify", force=force, hook=name)
            else:
                out[name] = save_sae(sae, root / name, format=format, force=force)
        return out


def get_peft_sae_model(
    model: nn.Module,
    peft_config: SaeAdapterConfig,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
    low_cpu_mem_usage: bool = False,
) -> PeftSaeModel:
    """Wrap ``model`` as a :class:`PeftSaeModel` (``peft.get_peft_model`` for SAEs).

    A model already adapted with ``inject_adapter_in_model`` keeps its SAEs and their weights: it
    is wrapped as it is (PEFT's ``get_peft_model`` would warn and re-inject). Its other adapters
    stay registered, so ``save_pretrained`` writes all of them.
    """
    _register()
    if isinstance(model, PeftModel):
        raise XsaeError("the model is already a PeftModel", "call model.add_adapter(name, config) to add another SAE adapter")
    if not isinstance(peft_config, SaeAdapterConfig):
        raise XsaeError(f"get_peft_sae_model takes an SAE adapter config, got {type(peft_config).__name__}", _CONFIG_HINT)
    previous = model.__dict__.pop("peft_config", None)
    others: dict[str, PeftConfig] = {}
    if isinstance(previous, dict):
        others = {name: cfg for name, cfg in previous.items() if name != adapter_name}
    if peft_config.base_model_name_or_path is None:
        peft_config.base_model_name_or_path = model.__dict__.get("name_or_path", None) or None
    peft_model = PeftSaeModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage)
    for name, cfg in others.items():
        if any(name in layer.xsae_mode for layer in peft_model.sae_layers().values()):
            peft_model.peft_config[name] = cfg
    return peft_model


_register()

__all__ = [
    "PeftSaeModel",
    "SaeAdapterConfig",
    "SaeLayer",
    "SaeTuner",
    "XsaePeftType",
    "get_peft_sae_model",
    "sae_adapter_config_class",
]
# The per-architecture config classes (TopKSaeConfig, ...) come from __getattr__, from the registry.
