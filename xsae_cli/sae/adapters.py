"""SAEs through a model as PEFT adapters: inject, take training steps, export and read adapter folders.

The services on top of the tuner (:mod:`xsae_cli.sae.peft`), for code that trains or ships SAEs
through the model rather than on a cache of activations:

- :func:`inject_saes` puts SAEs on modules of a model (``{module path: SAE}`` trained ones, or
  fresh ones made from :class:`~xsae_cli.sae.settings.SaeTrainSettings`), in ``splice`` mode (the
  module's hidden state is replaced by the reconstruction) or ``observe`` mode (left unchanged);
  the base model's weights are frozen, as PEFT freezes them for any adapter.
- :func:`training_outputs` runs one forward with the SAEs in training mode and returns each SAE's
  :class:`~xsae_cli.sae.base.TrainOutput` (loss with its graph, reconstruction, firing counts);
  the forward stops after the last adapted module, so the rest of the model and its head never
  run. This is the step of "train through the model" (``sae train --via adapter``).
- :func:`export_peft` / :func:`export_peft_from` write a PEFT adapter folder
  (``adapter_config.json`` + ``adapter_model.safetensors``, through PEFT's own config writer and
  state-dict naming) that ``PeftSaeModel.from_pretrained(model, folder)`` and plain
  ``peft.PeftModel.from_pretrained`` load; :func:`load_peft_saes` reads one back without the model.

SAEs with the same settings and width become one adapter with several target modules; others
become further adapters, saved in sub-folders as PEFT saves several adapters (``<name>/``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from xsae_cli.core.errors import XsaeError

if TYPE_CHECKING:
    from xsae_cli.sae.base import SparseAutoencoder, TrainOutput
    from xsae_cli.sae.peft import PeftSaeModel, SaeAdapterConfig
    from xsae_cli.sae.settings import SaeTrainSettings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_STATE_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------------------------
# Adapter configs
# ----------------------------------------------------------------------------------------------


def _plain(sae: SparseAutoencoder) -> SparseAutoencoder:
    """The SAE with a fitted input scale folded into its weights (an adapter config holds no factor)."""
    if sae.cfg.normalize_activations != "expected_average_only_in":
        return sae
    folded = copy.deepcopy(sae)
    folded.fold_normalization()
    return folded


def _sae_kwargs(sae: SparseAutoencoder) -> dict[str, Any]:
    """Everything of the SAE's config that the adapter config does not hold in its own fields."""
    from xsae_cli.sae.peft import _sae_config_extra_fields

    cfg = sae.cfg
    kwargs = {name: getattr(cfg, name) for name in sorted(_sae_config_extra_fields()) if name != "options"}
    kwargs.update(cfg.options)
    return kwargs


def _config_for(sae: SparseAutoencoder, targets: Sequence[str], mode: str) -> SaeAdapterConfig:
    from xsae_cli.sae.peft import sae_adapter_config_class

    cfg = sae.cfg
    base = (cfg.metadata or {}).get("model_name")
    return sae_adapter_config_class(cfg.arch)(
        k=cfg.k if sae.spec.uses_k else None,
        num_latents=int(cfg.d_sae),
        mode=mode,
        target_modules=list(targets),
        dtype=str(cfg.dtype).replace("torch.", ""),
        apply_b_dec_to_input=bool(cfg.apply_b_dec_to_input),
        sae_kwargs=_sae_kwargs(sae),
        base_model_name_or_path=str(base) if base else None,
    )


def _groups(saes: Mapping[str, SparseAutoencoder], mode: str) -> list[tuple[SaeAdapterConfig, dict[str, SparseAutoencoder]]]:
    """SAEs that one adapter config describes (same settings and d_sae), each with its config."""
    out: dict[Any, dict[str, SparseAutoencoder]] = {}
    for path, sae in saes.items():
        if (sae.cfg.metadata or {}).get("hook_site", "output") != "output":
            raise XsaeError(
                f"the SAE for {path} was trained on the module's {sae.cfg.metadata['hook_site']}, and an SAE adapter reads its output",
                "name the module whose output that is (e.g. the previous block) as the target",
            )
        c = _config_for(sae, [path], mode)
        key = (c.arch, c.k, c.num_latents, c.dtype, c.apply_b_dec_to_input, repr(sorted(c.sae_kwargs.items())), c.base_model_name_or_path)
        out.setdefault(key, {})[path] = sae
    return [(_config_for(next(iter(group.values())), list(group), mode), group) for group in out.values()]


def adapter_config_from_settings(settings: SaeTrainSettings, hooks: Sequence[str], *, mode: str = "splice", seed: int = 0) -> SaeAdapterConfig:
    """The adapter config of fresh SAEs trained with ``settings`` on ``hooks`` (module paths);
    ``seed`` makes their initial weights (as the trainer's seed does)."""
    from xsae_cli.sae.peft import _sae_config_extra_fields, sae_adapter_config_class
    from xsae_cli.sae.train import sae_config_for

    probe = sae_config_for(settings, max(1, settings.k), {})  # the SaeConfig the trainer would make
    kwargs = {name: getattr(probe, name) for name in sorted(_sae_config_extra_fields()) if name != "options"}
    kwargs.update(probe.options)
    size = {"num_latents": settings.d_sae} if settings.d_sae else {"expansion_factor": float(settings.expansion)}
    return sae_adapter_config_class(settings.arch)(
        k=probe.k,
        mode=mode,
        target_modules=list(hooks),
        sae_kwargs=kwargs,
        init_seed=int(seed),
        **size,
    )


# ----------------------------------------------------------------------------------------------
# Injection and training steps
# ----------------------------------------------------------------------------------------------


def inject_saes(
    model: nn.Module,
    saes: Mapping[str, SparseAutoencoder] | Sequence[str],
    *,
    settings: SaeTrainSettings | None = None,
    mode: str = "splice",
    adapter_name: str = "default",
    seed: int = 0,
) -> PeftSaeModel:
    """``model`` as a :class:`PeftSaeModel` with SAEs on the given modules, base weights frozen.

    ``saes``: ``{module path: trained SAE}`` (the SAEs themselves are used, moved to each module's
    device), or a list of module paths with ``settings`` for fresh SAEs (created at once where the
    module's type gives the width, else at the first forward). Paths may be written as anywhere
    in xsae (``model.layers.3``, ``layers.3``, ``3``). Several groups of differently-shaped SAEs
    become adapters ``adapter_name``, ``adapter_name_1``, ... all active together.
    """
    from xsae_cli.data.activations import resolve_module_name
    from xsae_cli.sae.peft import MODES, get_peft_sae_model

    if mode not in MODES:
        raise XsaeError(f"unknown SAE adapter mode '{mode}'", f"use one of {', '.join(MODES)}")
    if isinstance(saes, Mapping):
        if not saes:
            raise XsaeError("no SAEs to inject", "pass {module path: SAE}")
        resolved = {resolve_module_name(model, path): _plain(sae) for path, sae in saes.items()}
        groups = _groups(resolved, mode)
    else:
        if settings is None:
            raise XsaeError("fresh SAEs need training settings", "pass settings=SaeTrainSettings(...), or {module path: SAE}")
        paths = [resolve_module_name(model, path) for path in saes]
        if not paths:
            raise XsaeError("no module paths to put SAEs on", "pass at least one, e.g. model.layers.6")
        groups = [(adapter_config_from_settings(settings, paths, mode=mode, seed=seed), {})]
    names = [adapter_name if i == 0 else f"{adapter_name}_{i}" for i in range(len(groups))]
    peft_model: PeftSaeModel | None = None
    for name, (config, group) in zip(names, groups):
        low_mem = bool(group)  # given SAEs replace the placeholders: no random init to pay for
        if peft_model is None:
            peft_model = get_peft_sae_model(model, config, adapter_name=name, low_cpu_mem_usage=low_mem)
        else:
            peft_model.add_adapter(name, config, low_cpu_mem_usage=low_mem)
        layers = peft_model.sae_layers()
        for path, sae in group.items():
            layer = layers[path]
            device = layer._base_device()
            layer.xsae_sae[name] = sae.to(device) if device is not None else sae
            layer.xsae_sae[name].requires_grad_(True)
            layer.xsae_pending.pop(name, None)
    assert peft_model is not None
    peft_model.set_adapter(names if len(names) > 1 else names[0])
    for p in peft_model.get_base_model().parameters():  # frozen base (PEFT's rule), trainable SAEs
        p.requires_grad_(False)
    for layer in peft_model.sae_layers().values():
        for name in names:
            if name in layer.xsae_sae:
                layer.xsae_sae[name].requires_grad_(True)
    return peft_model


def training_outputs(
    model: PeftSaeModel,
    forward: Callable[[], Any],
    *,
    adapter_name: str | None = None,
    keep: torch.Tensor | None = None,
    dead: Mapping[str, torch.Tensor] | None = None,
    stop: bool = True,
) -> dict[str, TrainOutput]:
    """One training forward of an adapter's SAEs: ``{module path: TrainOutput}``.

    ``forward`` runs the model on a batch (e.g. ``lambda: model(input_ids=ids)``). Each SAE of the
    adapter takes its training forward on the module's hidden state, restricted to the token
    positions where ``keep`` (``[batch, tokens]``) is True (pad, BOS and special tokens are left
    out, as the activation store leaves them out); ``dead`` gives each module's dead-latent mask
    (AuxK). In ``splice`` mode the kept positions continue through the model as the training
    reconstruction, so a later SAE sees what the earlier one made. With ``stop`` the forward
    ends right after the last adapted module ran. Backpropagate ``sum(o.loss for o in outputs)``.
    """
    from xsae_cli.data.hooks import HiddenCapture

    name = adapter_name or model.active_adapter
    layers = {path: layer for path, layer in model.sae_layers().items() if name in layer.xsae_mode}
    if not layers:
        raise XsaeError(f"adapter '{name}' sits on no module", f"loaded adapters: {', '.join(model.peft_config)}")
    for path, layer in layers.items():
        layer.xsae_train[name] = {"keep": keep, "dead": (dead or {}).get(path)}
    try:
        if stop:
            with HiddenCapture(model, dict(layers)):
                forward()
        else:
            forward()
        outputs = {path: layer.xsae_outputs.pop(name) for path, layer in layers.items() if name in layer.xsae_outputs}
    finally:
        for layer in layers.values():
            layer.xsae_train.pop(name, None)
            layer.xsae_outputs.pop(name, None)
    missing = [path for path in layers if path not in outputs]
    if missing:
        raise XsaeError(f"module {missing[0]} did not run in the forward", "adapt modules that the model's forward uses")
    return outputs


# ----------------------------------------------------------------------------------------------
# Adapter folders
# ----------------------------------------------------------------------------------------------


def _skeleton(widths: Mapping[str, int]) -> nn.Module:
    """A module tree with a width-``d_in`` placeholder (a meta ``Linear``) at every path: what the
    tuner needs to name and size the adapters, without the model."""
    root = nn.Module()
    for path in sorted(widths, key=lambda p: p.count(".")):
        parent = root
        parts = path.split(".")
        for part in parts[:-1]:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        leaf = nn.Linear(int(widths[path]), int(widths[path]), device="meta")
        old = parent._modules.get(parts[-1])
        if old is not None:  # a placeholder that other paths already hang under
            for sub, module in old._modules.items():
                leaf.add_module(sub, module)
        parent.add_module(parts[-1], leaf)
    return root


def _target_of(name: str, sae: SparseAutoencoder) -> str:
    """The module path an SAE reads: its ``hook_module`` metadata, else ``hook_name``, else ``name``."""
    meta = sae.cfg.metadata or {}
    return str(meta.get("hook_module") or meta.get("hook_name") or name)


def export_peft(
    saes: Mapping[str, SparseAutoencoder],
    dst: str | Path,
    *,
    force: bool = False,
    adapter_name: str = "default",
    mode: str = "splice",
) -> dict[str, Path]:
    """Write ``{module path: SAE}`` as a PEFT adapter folder; ``{adapter name: folder}``.

    The folder loads with ``PeftSaeModel.from_pretrained(model, dst)`` on the model the SAEs were
    trained on (its module paths are the adapter's ``target_modules``); further adapters (SAEs of
    other shapes) go to ``dst/<adapter name>/`` and load with ``model.load_adapter``.
    """
    from peft.utils import get_peft_model_state_dict

    from xsae_cli.core.io import atomic_dir, save_safetensors
    from xsae_cli.sae.peft import get_peft_sae_model

    if not saes:
        raise XsaeError("no SAEs to export", "point at an SAE folder or a run folder")
    plain = {path: _plain(sae) for path, sae in saes.items()}
    groups = _groups(plain, mode)
    names = [adapter_name if i == 0 else f"{adapter_name}_{i}" for i in range(len(groups))]
    written: dict[str, Path] = {}
    dst = Path(dst)
    with atomic_dir(dst, force=force) as tmp:
        for name, (config, group) in zip(names, groups):
            skeleton = _skeleton({path: sae.cfg.d_in for path, sae in group.items()})
            peft_model = get_peft_sae_model(skeleton, config, adapter_name=name, low_cpu_mem_usage=True)
            layers = peft_model.sae_layers()
            for path, sae in group.items():
                layers[path].xsae_sae[name] = sae
            # save_embedding_layers=False: the adapter touches no embedding, and "auto" would look the
            # base model's config up on the Hub.
            state = get_peft_model_state_dict(peft_model, adapter_name=name, save_embedding_layers=False)
            folder = tmp if name == names[0] else tmp / name
            folder.mkdir(parents=True, exist_ok=True)
            saved = dataclasses.replace(config, inference_mode=True)
            saved.save_pretrained(str(folder))
            save_safetensors({k: v.detach().contiguous() for k, v in state.items()}, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
            written[name] = dst if name == names[0] else dst / name
    return written


def export_peft_from(src: str | Path, dst: str | Path, *, force: bool = False, hook: str | None = None) -> dict[str, Path]:
    """An SAE folder or a run folder (SAELens or sparsify layout) -> a PEFT adapter folder.

    Each SAE's target module is its ``hook_module`` / ``hook_name`` metadata; ``hook`` overrides it
    for a single SAE (e.g. the full module path when the SAE was trained with a short one).
    """
    from xsae_cli.sae.formats import load_sae_dir

    saes = load_sae_dir(src)
    if hook is not None:
        if len(saes) != 1:
            raise XsaeError(f"{src} holds {len(saes)} SAEs, so one --hook cannot name their module", "drop --hook: each SAE keeps the module its metadata names")
        (only,) = saes.values()
        return export_peft({hook: only}, dst, force=force)
    return export_peft({_target_of(name, sae): sae for name, sae in saes.items()}, dst, force=force)


def is_peft_adapter(folder: Path) -> bool:
    """Whether ``folder`` holds an xsae SAE adapter (``adapter_config.json`` of type XSAE)."""
    from xsae_cli.core.io import read_json

    cfg = folder / ADAPTER_CONFIG
    if not cfg.is_file():
        return False
    raw = read_json(cfg, "PEFT adapter config")
    return isinstance(raw, dict) and raw.get("peft_type") == "XSAE"


def load_peft_saes(folder: str | Path, *, device: str | torch.device = "cpu") -> dict[str, SparseAutoencoder]:
    """The SAEs of an adapter folder, ``{module path: SAE}``, without the model they adapt."""
    from xsae_cli.core.io import load_safetensors
    from xsae_cli.sae.peft import PeftSaeModel

    folder = Path(folder)
    if not is_peft_adapter(folder):
        raise XsaeError(f"{folder} is not an xsae SAE adapter folder", f"expected {ADAPTER_CONFIG} with peft_type XSAE beside {ADAPTER_WEIGHTS}")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise XsaeError(f"missing adapter weights: {weights}", f"{ADAPTER_CONFIG} is there but its weights are not; copy the complete folder")
    widths = {}
    for key, tensor in load_safetensors(weights).items():
        if key.startswith(_STATE_PREFIX) and key.endswith(".xsae_sae.b_dec"):
            widths[key[len(_STATE_PREFIX) : -len(".xsae_sae.b_dec")]] = int(tensor.shape[-1])
    if not widths:
        raise XsaeError(f"{weights} holds no SAE weights", "re-export the adapter")
    model = PeftSaeModel.from_pretrained(_skeleton(widths), str(folder), low_cpu_mem_usage=True)
    out = {path: sae.to(device) for path, sae in model.get_saes().items()}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and is_peft_adapter(p)):  # PEFT's further adapters
        for path, sae in load_peft_saes(sub, device=device).items():
            out[path if path not in out else f"{path}@{sub.name}"] = sae
    return out
