"""The restoration model as a TransformerLens ``HookedTransformer``, checked number for number.

TransformerLens's config must say what the published converter left out: attention is
``bidirectional`` (its default is causal), ``d_mlp`` is the model's ``d_ff`` (not 4 * d_model),
rotary pairs are the two halves of each head (``rotary_adjacent_pairs=False``, the rotate-half
form), LayerNorm eps 1e-5, exact GELU (``act_fn="gelu"``; ``gelu_new`` is the tanh one), and every
bias is carried (zeros where a checkpoint has no attention biases).

Saved as ``tl_config.json`` (the keyword arguments of ``HookedTransformerConfig``) and
``tl_model.safetensors`` (the state dict), never as a pickled module: unpickling one runs code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from xsae_cli.core.errors import XsaeError

TL_CONFIG = "tl_config.json"
TL_WEIGHTS = "tl_model.safetensors"
TL_FORMAT = "xsae-restoration-transformer-lens"
TOLERANCE = 1e-4


def tl_config_kwargs(cfg: Any) -> dict[str, Any]:
    return {
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "d_head": cfg.head_dim,
        "d_mlp": cfg.d_ff,
        "d_vocab": cfg.vocab_size,
        "d_vocab_out": cfg.vocab_size,
        "n_ctx": cfg.max_position,
        "act_fn": "gelu",
        "normalization_type": "LN",
        "eps": 1e-5,
        "positional_embedding_type": "rotary",
        "rotary_dim": cfg.head_dim,
        "rotary_base": cfg.rotary_base,
        "rotary_adjacent_pairs": False,
        "attention_dir": "bidirectional",
        "default_prepend_bos": False,
        "original_architecture": "RestorationModel",
        "model_name": "restoration",
    }


def _quiet_tl() -> Any:
    import logging

    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    return HookedTransformer, HookedTransformerConfig


def build_hooked(kwargs: dict[str, Any], device: Any = "cpu") -> Any:
    import contextlib
    import sys

    HookedTransformer, HookedTransformerConfig = _quiet_tl()
    cfg = HookedTransformerConfig(**kwargs, device=str(device), dtype=torch.float32)
    import warnings

    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():  # it prints "Moving model to device"
        # 3.x deprecates HookedTransformer in favour of TransformerBridge, which wraps HF models only.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*HookedTransformer is deprecated.*")
        return HookedTransformer(cfg, move_to_device=True).eval()


def padding_hooks(attention_mask: torch.Tensor, n_layers: int) -> list[tuple[str, Any]]:
    """Forward hooks that mask padding keys the way the original model does (additive -1e9).

    HookedTransformer applies ``attention_mask`` only through its causal mask, so with
    ``attention_dir="bidirectional"`` padding would be attended; these hooks restore the original's
    behaviour. Right padding keeps positions 0..n-1, so RoPE needs nothing more.
    """
    additive = (1.0 - attention_mask[:, None, None, :].float()) * -1e9

    def hook(scores: torch.Tensor, hook: Any = None) -> torch.Tensor:
        return scores + additive.to(scores.device, scores.dtype)

    return [(f"blocks.{i}.attn.hook_attn_scores", hook) for i in range(n_layers)]


def tl_logits(tl: Any, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    if attention_mask is None:
        return tl(ids)
    return tl.run_with_hooks(ids, fwd_hooks=padding_hooks(attention_mask, tl.cfg.n_layers))


def tl_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Map RestorationModel weights onto TransformerLens names and layouts."""
    cfg = model.config
    n, h, d = cfg.n_heads, cfg.head_dim, cfg.d_model
    sd: dict[str, torch.Tensor] = {"embed.W_E": model.embed.weight.detach()}
    zeros = torch.zeros(n, h)
    for i, layer in enumerate(model.layers):
        a = layer.attn
        p = f"blocks.{i}"
        sd[f"{p}.ln1.w"], sd[f"{p}.ln1.b"] = layer.ln1.weight.detach(), layer.ln1.bias.detach()
        sd[f"{p}.ln2.w"], sd[f"{p}.ln2.b"] = layer.ln2.weight.detach(), layer.ln2.bias.detach()
        for name, proj in (("Q", a.q_proj), ("K", a.k_proj), ("V", a.v_proj)):
            # nn.Linear weight [out=(n h), in=d] -> W_[n, d, h]
            sd[f"{p}.attn.W_{name}"] = proj.weight.detach().view(n, h, d).transpose(1, 2)
            sd[f"{p}.attn.b_{name}"] = proj.bias.detach().view(n, h) if proj.bias is not None else zeros
        sd[f"{p}.attn.W_O"] = a.out_proj.weight.detach().view(d, n, h).permute(1, 2, 0)  # [n, h, d]
        sd[f"{p}.attn.b_O"] = a.out_proj.bias.detach() if a.out_proj.bias is not None else torch.zeros(d)
        sd[f"{p}.mlp.W_in"] = layer.ff[0].weight.detach().t()
        sd[f"{p}.mlp.b_in"] = layer.ff[0].bias.detach()
        sd[f"{p}.mlp.W_out"] = layer.ff[2].weight.detach().t()
        sd[f"{p}.mlp.b_out"] = layer.ff[2].bias.detach()
    sd["ln_final.w"], sd["ln_final.b"] = model.final_ln.weight.detach(), model.final_ln.bias.detach()
    sd["unembed.W_U"] = model.head.weight.detach().t()
    sd["unembed.b_U"] = model.head.bias.detach()
    return {k: v.contiguous().float() for k, v in sd.items()}


def to_hooked_transformer(model: Any, device: Any = "cpu") -> Any:
    tl = build_hooked(tl_config_kwargs(model.config), device)
    state = tl_state_dict(model)
    # Buffers TransformerLens computes itself (rotary tables, masks) keep their own values.
    missing = [k for k in tl.state_dict() if k not in state and not _derived(k)]
    if missing:
        raise RuntimeError(f"TransformerLens expects weights the converter does not fill: {missing[:5]}")
    tl.load_state_dict(state, strict=False)
    return tl.eval()


def _derived(name: str) -> bool:
    return name.endswith(("rotary_sin", "rotary_cos", "mask", "IGNORE"))


@torch.no_grad()
def max_logit_diff(model: Any, tl: Any, *, n: int = 2, seq_len: int | None = None, seed: int = 0, padded: bool = True) -> float:
    """Max |logits_original - logits_TL| over random token ids (and, with ``padded``, right padding)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    lengths = sorted({min(cfg.max_position, seq_len or 64), cfg.max_position if cfg.max_position <= 256 else 128})
    device = next(tl.parameters()).device
    model = model.to(device).eval()
    for length in lengths:
        ids = torch.randint(0, cfg.vocab_size, (n, length), generator=g).to(device)
        worst = max(worst, float((model(ids).float() - tl(ids).float()).abs().max()))
        if padded and length > 4:
            mask = torch.ones(n, length, dtype=torch.long, device=device)
            mask[0, length // 2 :] = 0
            a = model(ids, mask).float()
            b = tl_logits(tl, ids, mask).float()
            keep = mask.bool()
            worst = max(worst, float((a[keep] - b[keep]).abs().max()))
    return worst


def convert(
    checkpoint: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, force: bool = False, vocab: Any = None, device: Any = "cpu", tolerance: float = TOLERANCE
) -> dict[str, Any]:
    """Convert, check the logits on random inputs, and save config + state dict to ``out``."""
    from xsae_cli.core.hardware import package_versions
    from xsae_cli.core.io import (
        atomic_dir,
        atomic_write_json,
        refuse_overwrite,
        save_safetensors,
    )
    from xsae_cli.restore.model import load_restoration

    loaded = load_restoration(checkpoint, vocab=vocab, device="cpu")
    src = Path(checkpoint)
    if out:
        target = Path(out)
    else:
        target = src / "transformer_lens" if src.is_dir() else src.with_name(src.stem + "-transformer-lens")
    refuse_overwrite(target, force)
    tl = to_hooked_transformer(loaded.model.float(), device)
    diff = max_logit_diff(loaded.model.float(), tl)
    report = {
        "source": str(checkpoint),
        "out": str(target),
        "max_abs_logit_diff": diff,
        "tolerance": tolerance,
        "dtype": "float32",
        "n_params": loaded.model.n_params(),
        "config": tl_config_kwargs(loaded.model.config),
        "versions": package_versions(),
    }
    if not diff <= tolerance:
        raise XsaeError(f"the TransformerLens model differs from the original by {diff:.3g} in the logits (tolerance {tolerance:g})", "nothing was written; report this with the checkpoint's config")
    with atomic_dir(target, force=force) as tmp:
        save_safetensors(tl.state_dict(), tmp / TL_WEIGHTS, metadata={"format": "pt"})
        atomic_write_json(tmp / TL_CONFIG, {"format": TL_FORMAT, "config": report["config"], "source": str(checkpoint), "max_abs_logit_diff": diff, "versions": report["versions"]})
        loaded.vocab.save(tmp / "vocab.json")
    return report


def load_converted(folder: str | os.PathLike[str], device: Any = "cpu") -> Any:
    """Rebuild the HookedTransformer from ``tl_config.json`` + ``tl_model.safetensors``."""
    from xsae_cli.core.io import load_safetensors, read_json

    folder = Path(folder)
    meta = read_json(folder / TL_CONFIG, "TransformerLens config")
    if not isinstance(meta, dict) or meta.get("format") != TL_FORMAT:
        raise XsaeError(f"{folder / TL_CONFIG} was not written by `xsae restore convert`", "convert the checkpoint again")
    tl = build_hooked(meta["config"], device)
    tl.load_state_dict(load_safetensors(folder / TL_WEIGHTS, device=str(device)), strict=True)
    return tl.eval()
