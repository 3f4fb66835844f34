"""SAE files on disk: SAELens's layout (native) and sparsify's layout, read and written exactly.

Why two layouts and why SAELens's is the native one: an SAE trained by xsae should open in the tools
people already use. SAELens (``SAE.load_from_disk``) reads a folder holding ``cfg.json`` and
``sae_weights.safetensors``; sparsify (``SparseCoder.load_from_disk``) reads a folder per hook point
holding ``cfg.json`` and ``sae.safetensors``. Both are written here so that the other library's loader
gives the same reconstruction as ours (checked in ``tests/unit/sae/test_interop.py``), and both are read
so that their SAEs work in xsae.

Each architecture's registration (:mod:`xsae_cli.sae.registry`) says what its files look like,
so nothing here names an architecture. For the built-in ones (SAELens 6.x names):

========== ===================== ============================================================
xsae       SAELens ``architecture``  notes
========== ===================== ============================================================
relu       ``standard``
topk       ``topk``              ``k`` in cfg; sparsify ``activation="topk"`` as well
jumprelu   ``jumprelu``          ``threshold [d_sae]``
batchtopk  ``jumprelu``          as SAELens saves a trained BatchTopK: its inference rule *is*
                                 a JumpReLU with the learned global threshold
gated      ``gated``             ``b_enc`` written as SAELens's ``b_gate``; ``r_mag``, ``b_mag``
matryoshka ``jumprelu``          ``matryoshka_batchtopk``: as batchtopk; SAELens's training
_batchtopk                       checkpoints (``matryoshka_batchtopk``, flat widths) are read
========== ===================== ============================================================

Whatever SAELens's schema cannot hold (xsae's arch when it differs, k of a BatchTopK, training
coefficients) is kept under the namespaced key ``"xsae"`` of ``cfg.json``; SAELens ignores unknown
keys, so a round trip through xsae loses nothing and SAELens's loader is not disturbed. In sparsify's
layout the same record goes to a sidecar ``xsae.json`` (sparsify's loader would warn about an extra
key on every load).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import (
    atomic_dir,
    atomic_write_json,
    load_safetensors,
    read_json,
    save_safetensors,
)
from xsae_cli.sae.registry import (
    arch_names,
    from_saelens,
    from_sparsify,
    get_arch,
    saelens_names,
    sparsify_names,
    specs,
)

if TYPE_CHECKING:
    import torch

    from xsae_cli.sae.models import SaeConfig, SparseAutoencoder

#: ``peft``: a PEFT adapter folder (:mod:`xsae_cli.sae.adapters`) that ``PeftSaeModel.from_pretrained`` loads.
FORMATS = ("saelens", "sparsify", "peft")

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
#: Sidecar beside sparsify's files with what only xsae needs. Not a key in sparsify's cfg.json:
#: sparsify's loader would log "Dropping extra args" on every load.
SPARSIFY_XSAE = "xsae.json"

#: Key of ``cfg.json`` that holds what only xsae needs; ignored by SAELens and sparsify.
XSAE_KEY = "xsae"
XSAE_FORMAT_VERSION = 1

#: Written as ``metadata.sae_lens_version`` when the SAE did not come from SAELens: it names the
#: *layout* (SAELens >= 6), and without it SAELens treats the file as a pre-6.0 config and drops
#: the nested metadata.
SAELENS_LAYOUT_VERSION = "6.0.0"

#: Metadata keys SAELens reads at the top level of pre-6.0 configs.
_LEGACY_METADATA_KEYS = ("model_name", "hook_name", "hook_head_index", "context_size", "prepend_bos", "dataset_path", "model_from_pretrained_kwargs")

#: SAELens normalisations that are identity at inference time (SAELens folds the factor before saving).
_SAELENS_INFERENCE_IDENTITY_NORMS = ("none", "expected_average_only_in")
#: Normalisations computed per token at run time, by SAELens and by xsae alike.
_PER_TOKEN_NORMS = ("constant_norm_rescale", "layer_norm")


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def save_sae(
    sae: SparseAutoencoder,
    path: str | os.PathLike[str],
    *,
    format: str = "saelens",
    force: bool = False,
    hook: str | None = None,
) -> Path:
    """Write ``sae`` in SAELens's layout (default), sparsify's, or as a PEFT adapter; return the folder written.

    The folder is built under a temporary name and moved into place when complete, so an
    interrupted save never leaves half an SAE that a later load would trust. An existing non-empty
    folder is refused unless ``force``.

    ``format="sparsify"`` writes ``path/<hook>/`` (sparsify keeps one folder per hook point under a
    run folder), with ``hook`` taken from the argument or else from ``metadata["hook_name"]``;
    other hooks already under ``path`` are left alone. ``format="peft"`` writes an adapter folder
    whose target module is ``hook`` or else the SAE's ``hook_module`` / ``hook_name`` metadata.
    """
    fmt = _check_format(format)
    path = Path(path)
    if fmt == "peft":
        from xsae_cli.sae.adapters import _target_of, export_peft

        export_peft({hook or _target_of(path.name, sae): sae}, path, force=force)
        return path
    if fmt == "saelens":
        cfg_json, tensors = _to_saelens(sae)
        with atomic_dir(path, force=force) as tmp:
            save_safetensors(tensors, tmp / SAELENS_WEIGHTS, metadata={"format": "pt"})
            atomic_write_json(tmp / SAELENS_CFG, cfg_json)
        return path
    hook = hook or (sae.cfg.metadata or {}).get("hook_name")
    if not hook:
        raise XsaeError(
            "sparsify's layout needs a hook name for the SAE's folder, and the SAE's metadata has no hook_name",
            "pass hook=... (--hook on the command line)",
        )
    _check_hook_folder_name(hook)
    cfg_json, extra, tensors = _to_sparsify(sae)
    target = path / hook
    with atomic_dir(target, force=force) as tmp:
        save_safetensors(tensors, tmp / SPARSIFY_WEIGHTS, metadata={"format": "pt"})
        atomic_write_json(tmp / SPARSIFY_CFG, cfg_json)
        atomic_write_json(tmp / SPARSIFY_XSAE, extra)
    return target


def detect_format(path: str | os.PathLike[str]) -> str:
    """Say which layout ``path`` holds: ``"saelens"``, ``"sparsify"`` or ``"peft"`` (an adapter folder).

    A run folder of hook folders counts as the layout of its hook folders (``"sparsify"`` when
    it mixes both). A path to one of the files inside a folder is accepted too. Anything else is
    an :class:`XsaeError` that names the files that were expected.
    """
    folder = _folder_of(path)
    kind = _folder_kind(folder)
    if kind is not None:
        return kind
    kinds = {k for _, _, k in _hook_folders(folder)}
    if len(kinds) == 1:
        return kinds.pop()
    if kinds:
        return "sparsify" if "sparsify" in kinds else "saelens"
    raise _nothing_found(folder)


def load_sae(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load one SAE from a SAELens folder, a sparsify hook folder, or a run folder with one hook.

    The layout is detected from the files present. A run folder holding several hook folders is an
    error that lists them: pick one, or use :func:`load_sae_dir` to load them all.
    """
    folder = _folder_of(path)
    kind = _folder_kind(folder)
    if kind is not None:
        return _load_folder(folder, kind, device)
    hooks = _hook_folders(folder)
    if len(hooks) == 1:
        _, sub, kind = hooks[0]
        return _load_folder(sub, kind, device)
    if hooks:
        names = ", ".join(name for name, _, _ in hooks)
        raise XsaeError(
            f"{folder} holds {len(hooks)} SAEs ({names})",
            f"point at one of them, e.g. {folder / hooks[0][0]}, or load them all with load_sae_dir",
        )
    raise _nothing_found(folder)


def load_sae_dir(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> dict[str, SparseAutoencoder]:
    """Load every SAE under ``path``: ``{hook folder name: SAE}``.

    ``path`` may also be a single SAE folder, which gives a one-entry dict keyed by its hook name
    (from its metadata) or else by the folder's name.
    """
    folder = _folder_of(path)
    kind = _folder_kind(folder)
    if kind == "peft":
        from xsae_cli.sae.adapters import load_peft_saes

        return load_peft_saes(folder, device=device)
    if kind is not None:
        sae = _load_folder(folder, kind, device)
        name = (sae.cfg.metadata or {}).get("hook_name") or folder.name
        return {str(name): sae}
    hooks = _hook_folders(folder)
    if not hooks:
        raise _nothing_found(folder)
    return {name: _load_folder(sub, kind, device) for name, sub, kind in hooks}


def export_sae(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    format: str = "saelens",
    force: bool = False,
    *,
    hook: str | None = None,
) -> Path:
    """Convert SAE files from one layout to another (either direction); return ``dst``.

    A run folder with several hooks is exported whole: in sparsify's layout the hooks go under
    ``dst/<hook>/`` as sparsify expects; in SAELens's layout each goes to ``dst/<hook>/``.
    """
    fmt = _check_format(format)
    if fmt == "peft":
        from xsae_cli.sae.adapters import export_peft_from

        export_peft_from(Path(src), Path(dst), force=force, hook=hook)
        return Path(dst)
    saes = load_sae_dir(src)
    dst = Path(dst)
    if len(saes) == 1 and _folder_kind(_folder_of(src)) is not None:
        ((name, sae),) = saes.items()
        if fmt == "sparsify":
            save_sae(sae, dst, format=fmt, force=force, hook=hook or (sae.cfg.metadata or {}).get("hook_name") or name)
        else:
            save_sae(sae, dst, format=fmt, force=force)
        return dst
    if hook is not None:
        raise XsaeError(f"{src} holds several SAEs, so one hook= name cannot apply", "drop hook=, each SAE keeps its folder name")
    for name, sae in saes.items():
        if fmt == "sparsify":
            save_sae(sae, dst, format=fmt, force=force, hook=name)
        else:
            save_sae(sae, dst / name, format=fmt, force=force)
    return dst


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _config_fields(cfg: SaeConfig) -> dict[str, Any]:
    """SaeConfig as a JSON-able dict without metadata (which SAELens stores in its own place)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name == "metadata":
            continue
        out[f.name] = _jsonable(getattr(cfg, f.name))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _prepared(sae: SparseAutoencoder, fmt: str) -> SparseAutoencoder:
    """The SAE as the files will describe it.

    ``expected_average_only_in`` scales inputs by a fitted factor at run time, which SAELens's
    inference SAEs do not do (SAELens folds it before saving) and sparsify cannot express: it is
    folded into the weights, on a copy, so the caller's SAE is unchanged. The per-token modes
    (``constant_norm_rescale``, ``layer_norm``) run at inference in SAELens too and are kept;
    sparsify has no such modes and refuses them.
    """
    norm = getattr(sae.cfg, "normalize_activations", "none") or "none"
    if norm == "none":
        return sae
    if norm in _PER_TOKEN_NORMS:
        if fmt == "saelens":
            return sae
        raise XsaeError(
            f"sparsify has no input normalisation, and this SAE normalises each token ({norm})",
            "save it in SAELens's layout (format='saelens'), which keeps that setting",
        )
    folded = copy.deepcopy(sae)
    folded.fold_normalization()
    return folded


def _weights(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """The four base tensors and the extra ones the architecture's registration declares."""
    return {name: getattr(sae, name).detach() for name in sae.spec.tensor_shapes(sae.cfg)}


def _to_saelens(sae: SparseAutoencoder) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    sae = _prepared(sae, "saelens")
    cfg = sae.cfg
    spec = get_arch(cfg.arch)
    tensors = _weights(sae)
    metadata = {k: _jsonable(v) for k, v in dict(cfg.metadata or {}).items()}
    added = [key for key in ("model_name", "hook_name", "context_size", "prepend_bos", "sae_lens_version") if key not in metadata]
    for key in ("model_name", "hook_name", "context_size", "prepend_bos"):
        metadata.setdefault(key, None)
    metadata.setdefault("sae_lens_version", SAELENS_LAYOUT_VERSION)
    reshape = metadata.pop("reshape_activations", "none") or "none"
    cfg_json: dict[str, Any] = {
        "architecture": spec.saelens,
        "d_in": int(cfg.d_in),
        "d_sae": int(cfg.d_sae),
        "dtype": _dtype_name(cfg.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": cfg.normalize_activations or "none",
        "reshape_activations": reshape,
    }
    if spec.saelens_cfg is not None:
        cfg_json.update(spec.saelens_cfg(cfg))
    if spec.saelens_export is not None:
        tensors = spec.saelens_export(cfg, tensors)
    cfg_json["metadata"] = metadata
    # added_metadata: keys written only because SAELens expects them; dropped again on load so
    # that a round trip gives back the same metadata.
    cfg_json[XSAE_KEY] = {"format_version": XSAE_FORMAT_VERSION, "arch": spec.name, "config": _config_fields(cfg), "added_metadata": added}
    return cfg_json, tensors


def _to_sparsify(sae: SparseAutoencoder) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    import torch

    sae = _prepared(sae, "sparsify")
    cfg = sae.cfg
    spec = get_arch(cfg.arch)
    if spec.sparsify is None:
        held = ", ".join(s.title for s in specs().values() if s.sparsify) or "no"
        raise XsaeError(
            f"sparsify stores only {held} SAEs, and this one is {spec.name}",
            "save it in SAELens's layout (format='saelens'), or train an architecture sparsify stores",
        )
    w = _weights(sae)
    dtype = w["W_enc"].dtype
    W_enc, b_enc, W_dec, b_dec = (w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if not cfg.apply_b_dec_to_input:
        # sparsify always encodes (x - b_dec); fold b_dec into the encoder bias (in float32) so that
        # W_e (x - b_dec) + b_e' == W_enc^T x + b_enc.
        b_enc = (b_enc.float() + b_dec.float() @ W_enc.float()).to(dtype)
    norms = W_dec.float().norm(dim=-1)
    unit_decoder = bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-4))
    d_in, d_sae = int(cfg.d_in), int(cfg.d_sae)
    assert cfg.k is not None, "sparsify's layouts are for architectures that keep k latents"
    cfg_json: dict[str, Any] = {
        "activation": spec.sparsify,
        "expansion_factor": max(1, d_sae // d_in),
        "normalize_decoder": unit_decoder,
        "num_latents": d_sae,
        "k": int(cfg.k),  # sparsify's activations all keep k latents per token
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d_in,
    }
    config = _config_fields(cfg)
    config["apply_b_dec_to_input"] = True  # the files hold the folded form
    config["normalize_activations"] = "none"
    extra = {
        "format_version": XSAE_FORMAT_VERSION,
        "arch": spec.name,
        "config": config,
        "metadata": {k: _jsonable(v) for k, v in dict(cfg.metadata or {}).items()},
    }
    tensors = {
        "encoder.weight": W_enc.T.contiguous(),  # nn.Linear(d_in, d_sae).weight: [d_sae, d_in]
        "encoder.bias": b_enc,
        "W_dec": W_dec,  # sparsify's W_dec is [d_sae, d_in], the same orientation as SAELens's
        "b_dec": b_dec,
    }
    return cfg_json, extra, tensors


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _load_folder(folder: Path, kind: str, device: Any) -> SparseAutoencoder:
    if kind == "saelens":
        return _load_saelens(folder, device)
    if kind == "peft":
        from xsae_cli.sae.adapters import load_peft_saes

        saes = load_peft_saes(folder, device=device)
        if len(saes) != 1:
            raise XsaeError(f"the adapter {folder} holds {len(saes)} SAEs ({', '.join(saes)})", "load them all with load_sae_dir")
        return next(iter(saes.values()))
    return _load_sparsify(folder, device)


def _read_layout(folder: Path, cfg_name: str, weights_name: str, what: str) -> tuple[Path, Path, dict, dict]:
    """A layout's cfg.json (must be an object) and its weights file beside it, both checked."""
    cfg_path, weights_path = folder / cfg_name, folder / weights_name
    raw = read_json(cfg_path, f"{what} config")
    if not isinstance(raw, dict):
        raise XsaeError(f"{cfg_path} is not a JSON object", "re-create it or point at the right folder")
    _require(weights_path, f"{what} weights ({weights_name} beside {cfg_name})")
    return cfg_path, weights_path, raw, load_safetensors(weights_path)


def _load_saelens(folder: Path, device: Any) -> SparseAutoencoder:
    cfg_path, weights_path, raw, tensors = _read_layout(folder, SAELENS_CFG, SAELENS_WEIGHTS, "SAELens")

    metadata = dict(raw.get("metadata") or {})
    if not metadata:  # pre-6.0 SAELens configs keep these at the top level
        metadata = {k: raw[k] for k in _LEGACY_METADATA_KEYS if k in raw}
        for old, new in (("hook_point", "hook_name"),):
            if old in raw and new not in metadata:
                metadata[new] = raw[old]
    if raw.get("reshape_activations", "none") not in (None, "none"):
        metadata["reshape_activations"] = raw["reshape_activations"]

    architecture = raw.get("architecture")
    if architecture is None:
        architecture = "topk" if raw.get("activation_fn", raw.get("activation_fn_str")) == "topk" else "standard"
    spec = from_saelens(architecture)
    if spec is None:
        raise XsaeError(
            f"unknown SAE architecture '{architecture}' in {cfg_path}",
            f"xsae reads SAELens architectures {', '.join(saelens_names())} (xsae archs {', '.join(arch_names())})",
        )
    extra = raw.get(XSAE_KEY) if isinstance(raw.get(XSAE_KEY), dict) else None
    fields: dict[str, Any] = {}
    if extra:
        fields = dict(extra.get("config") or {})
        spec = get_arch(extra.get("arch", fields.get("arch", spec.name)), where=str(cfg_path))
        for key in extra.get("added_metadata") or ():
            metadata.pop(key, None)
        if architecture not in (spec.saelens, *spec.saelens_read):
            raise XsaeError(
                f"{cfg_path} says architecture '{architecture}' but its xsae record says arch '{spec.name}' (saved as '{spec.saelens}')",
                "the file was edited by hand; fix one of the two",
            )

    d_in, d_sae = _int_field(raw, "d_in", cfg_path), _int_field(raw, "d_sae", cfg_path)
    norm = raw.get("normalize_activations", "none")
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    norm = norm or "none"
    if norm not in _SAELENS_INFERENCE_IDENTITY_NORMS + _PER_TOKEN_NORMS:
        raise XsaeError(
            f"{cfg_path} normalises activations with '{norm}', which xsae does not implement",
            f"xsae reads normalize_activations {', '.join(_SAELENS_INFERENCE_IDENTITY_NORMS + _PER_TOKEN_NORMS)}",
        )
    norm = norm if norm in _PER_TOKEN_NORMS else "none"  # SAELens's inference SAE ignores expected_average_only_in
    if "scaling_factor" in tensors:
        import torch

        if not torch.allclose(tensors["scaling_factor"], torch.ones_like(tensors["scaling_factor"])):
            raise XsaeError(f"{weights_path} holds a fine-tuning scaling_factor, which xsae does not support", "fold it into W_dec with SAELens first")
        del tensors["scaling_factor"]

    k = raw.get("k")
    if k is None and isinstance(raw.get("activation_fn_kwargs"), dict):
        k = raw["activation_fn_kwargs"].get("k")
    fields.update(
        arch=spec.name,
        d_in=d_in,
        d_sae=d_sae,
        dtype=_dtype_name(raw.get("dtype", fields.get("dtype", "float32"))),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        normalize_activations=norm,
    )
    if norm == "none":
        fields["norm_scaling_factor"] = None
    options = dict(fields.get("options") or {})
    options.update({name: raw[name] for name in spec.options if name not in options and name in raw})  # SAELens keeps them flat
    if options:
        fields["options"] = options
    if spec.uses_k and fields.get("k") is None:
        if k is None:
            raise XsaeError(f"{cfg_path} describes a {spec.name} SAE without k", 'add "k": <active latents> to cfg.json')
        fields["k"] = math.ceil(float(k))

    if spec.saelens_import is not None:
        tensors = spec.saelens_import(raw, tensors)
    cfg = _make_config(fields, metadata, cfg_path)
    required = spec.tensor_shapes(cfg)
    _check_shapes(tensors, required, weights_path, cfg_path)
    if raw.get("rescale_acts_by_decoder_norm"):
        tensors = _fold_decoder_norm(tensors)
    return _build(cfg, {k: tensors[k] for k in required}, device, weights_path)


def _load_sparsify(folder: Path, device: Any) -> SparseAutoencoder:
    cfg_path, weights_path, raw, tensors = _read_layout(folder, SPARSIFY_CFG, SPARSIFY_WEIGHTS, "sparsify")

    activation = raw.get("activation", "topk")
    spec = from_sparsify(activation)
    if spec is None:
        raise XsaeError(
            f"unknown SAE architecture: sparsify activation '{activation}' in {cfg_path}",
            f"xsae reads sparsify's {', '.join(repr(n) for n in sparsify_names())} activation (xsae archs {', '.join(arch_names())})",
        )
    if raw.get("transcode"):
        raise XsaeError(f"{cfg_path} describes a transcoder (transcode=true), not an autoencoder", "xsae loads sparse autoencoders only")
    if raw.get("skip_connection") or "W_skip" in tensors:
        raise XsaeError(f"{cfg_path} has a skip connection (W_skip), which xsae's SAEs do not have", "load it with sparsify itself")
    d_in = _int_field(raw, "d_in", cfg_path)
    d_sae = int(raw.get("num_latents") or 0) or d_in * int(raw.get("expansion_factor", 32))
    k = int(raw.get("k", 32))
    missing = [n for n in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if n not in tensors]
    if missing:
        raise XsaeError(f"{weights_path} lacks {', '.join(missing)}", "sparsify files hold encoder.weight, encoder.bias, W_dec and b_dec; re-create it")
    mapped = {
        "W_enc": tensors["encoder.weight"].T,
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    extra = None
    if (folder / SPARSIFY_XSAE).is_file():
        extra = read_json(folder / SPARSIFY_XSAE, "xsae sidecar")
    if not isinstance(extra, dict):
        extra = raw.get(XSAE_KEY) if isinstance(raw.get(XSAE_KEY), dict) else None
    fields = dict((extra or {}).get("config") or {})
    metadata = dict((extra or {}).get("metadata") or {})
    if not metadata:
        metadata = {"hook_name": folder.name}
        root_cfg = folder.parent / "config.json"
        if root_cfg.is_file():
            try:
                model = read_json(root_cfg).get("model")
            except (XsaeError, AttributeError):
                model = None
            if model:
                metadata["model_name"] = model
    fields.update(
        arch=spec.name,
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        apply_b_dec_to_input=True,
        normalize_activations="none",
        dtype=_dtype_name(mapped["W_enc"].dtype),
    )
    cfg = _make_config(fields, metadata, cfg_path)
    _check_shapes(mapped, spec.tensor_shapes(cfg), weights_path, cfg_path, names={"W_enc": "encoder.weight (transposed)", "b_enc": "encoder.bias"})
    return _build(cfg, {k: v.contiguous() for k, v in mapped.items()}, device, weights_path)


def _fold_decoder_norm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAELens TopK with ``rescale_acts_by_decoder_norm`` == plain TopK with the norms folded in.

    It ranks ``pre * |W_dec_i|`` and decodes ``acts / |W_dec_i| @ W_dec``; scaling encoder columns
    and bias by the norms and the decoder rows by their inverse gives the same codes and output.
    """
    out = dict(tensors)
    norms = out["W_dec"].norm(dim=-1).clamp(min=1e-8)
    out["W_enc"] = out["W_enc"] * norms
    out["b_enc"] = out["b_enc"] * norms
    out["W_dec"] = out["W_dec"] / norms[:, None]
    return out


def _make_config(fields: dict[str, Any], metadata: dict[str, Any], where: Path) -> SaeConfig:
    from xsae_cli.sae.models import SaeConfig

    known = {f.name for f in dataclasses.fields(SaeConfig)}
    kwargs = {k: v for k, v in fields.items() if k in known and k != "metadata"}
    if "metadata" in known:
        kwargs["metadata"] = dict(metadata)
    try:
        return SaeConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, XsaeError):
            raise
        raise XsaeError(f"{where} does not describe a valid SAE: {exc}", "re-create the file") from exc


def _build(cfg: SaeConfig, tensors: dict[str, torch.Tensor], device: Any, source: Path) -> SparseAutoencoder:
    """Create the SAE without a random init (meta parameters) and assign the file's tensors.

    Skipping the init matters for real SAEs (d_in x d_sae of 10^8 floats); buffers are created for
    real, so state the file does not carry keeps the value ``create_sae`` gives it.
    """
    import torch
    from accelerate import init_empty_weights

    from xsae_cli.sae.models import create_sae

    dtype = getattr(torch, _dtype_name(cfg.dtype))
    with init_empty_weights(include_buffers=False):
        sae = create_sae(cfg)
    # The loaders pass exactly the tensors the registration declares, shape-checked (_check_shapes).
    state = {name: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype).contiguous() for name, value in tensors.items()}
    sae.load_state_dict(state, strict=False, assign=True)
    still_meta = [n for n, p in sae.named_parameters() if p.device.type == "meta"]
    if still_meta:  # a class that makes a parameter its registration does not declare
        raise XsaeError(f"{source} lacks {', '.join(still_meta)} for a {cfg.arch} SAE", f"declare it in the {cfg.arch} registration (tensors=...), or re-create the file")
    return sae.to(device)


# ----------------------------------------------------------------------------------------------
# Checks and discovery
# ----------------------------------------------------------------------------------------------


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise XsaeError(f"unknown SAE file format '{fmt}'", f"use one of {', '.join(FORMATS)}")
    return fmt


def _check_hook_folder_name(hook: str) -> None:
    if hook in ("", ".", "..") or "/" in hook or "\\" in hook or "\0" in hook:
        raise XsaeError(f"hook name '{hook}' cannot be a folder name", "use a module path such as layers.5 or blocks.5.hook_resid_post")


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).replace("torch.", "")
    aliases = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "double": "float64"}
    return aliases.get(name, name)


def _int_field(raw: dict[str, Any], key: str, where: Path) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise XsaeError(f"{where} has no valid '{key}' (got {value!r})", f'set "{key}" to a positive integer')
    return value


def _require(path: Path, what: str) -> None:
    if not path.is_file():
        raise XsaeError(f"missing {what}: {path}", "copy the complete SAE folder, or re-create it")


def _check_shapes(
    tensors: dict[str, torch.Tensor],
    expected: dict[str, list[int]],
    weights_path: Path,
    cfg_path: Path,
    names: dict[str, str] | None = None,
) -> None:
    """Every tensor the architecture needs is in the file with the shape its config implies."""
    names = names or {}
    for key, shape in expected.items():
        if key not in tensors:
            raise XsaeError(f"{weights_path} lacks the tensor {key}", f"the architecture in {cfg_path.name} needs it; re-create the file")
        got = list(tensors[key].shape)
        if got != shape:
            raise XsaeError(
                f"{names.get(key, key)} in {weights_path} has shape {got} but {cfg_path.name} ({_sizes(expected)}) needs {shape}",
                "the config and the weights disagree; re-create the files",
            )


def _sizes(expected: dict[str, list[int]]) -> str:
    d_in, d_sae = expected["W_enc"]
    return f"d_in={d_in}, d_sae={d_sae}"


def _folder_of(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_file() and p.name in (SAELENS_CFG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS):
        return p.parent
    if not p.exists():
        raise XsaeError(f"SAE path not found: {p}", "check the path")
    if p.is_file():
        raise XsaeError(
            f"{p} is a file; an SAE is a folder",
            f"point at the folder holding {SAELENS_CFG} + {SAELENS_WEIGHTS} (SAELens) or {SPARSIFY_CFG} + {SPARSIFY_WEIGHTS} (sparsify)",
        )
    return p


def _folder_kind(folder: Path) -> str | None:
    """``saelens``/``sparsify`` when ``folder`` itself is one SAE, else None.

    A folder with a weights file but no cfg.json (or the other way round) is an error naming the
    missing file: it is clearly meant to be an SAE, and "nothing found" would mislead.
    """
    from xsae_cli.sae.adapters import is_peft_adapter

    if is_peft_adapter(folder):
        return "peft"
    has_cfg = (folder / SAELENS_CFG).is_file()
    if (folder / SAELENS_WEIGHTS).is_file():
        if not has_cfg:
            raise XsaeError(f"missing SAELens config: {folder / SAELENS_CFG}", f"an SAE folder needs {SAELENS_CFG} beside {SAELENS_WEIGHTS}")
        return "saelens"
    if (folder / SPARSIFY_WEIGHTS).is_file():
        if not has_cfg:
            raise XsaeError(f"missing sparsify config: {folder / SPARSIFY_CFG}", f"a sparsify hook folder needs {SPARSIFY_CFG} beside {SPARSIFY_WEIGHTS}")
        return "sparsify"
    if has_cfg:
        raw = read_json(folder / SAELENS_CFG, "SAE config")
        sparsify_like = isinstance(raw, dict) and ("num_latents" in raw or "activation" in raw or "expansion_factor" in raw) and "architecture" not in raw
        expected = SPARSIFY_WEIGHTS if sparsify_like else SAELENS_WEIGHTS
        raise XsaeError(f"missing SAE weights: {folder / expected}", f"{folder / SAELENS_CFG} is there but its weights file is not; copy the complete folder")
    return None


def _hook_folders(folder: Path) -> list[tuple[str, Path, str]]:
    out = []
    for sub in sorted(folder.iterdir(), key=lambda p: _natural_key(p.name)):
        if not sub.is_dir() or sub.name.startswith("."):
            continue
        kind = _folder_kind(sub)
        if kind is not None:
            out.append((sub.name, sub, kind))
    return out


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _nothing_found(folder: Path) -> XsaeError:
    return XsaeError(
        f"no SAE found in {folder}",
        f"expected {SAELENS_CFG} + {SAELENS_WEIGHTS} (SAELens), {SPARSIFY_CFG} + {SPARSIFY_WEIGHTS} (sparsify), a PEFT adapter (adapter_config.json), or hook folders holding them",
    )


__all__ = ["FORMATS", "detect_format", "export_sae", "load_sae", "load_sae_dir", "save_sae"]
