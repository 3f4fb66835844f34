"""A Hugging Face model folder: ``config.json`` beside single or sharded safetensors or ``pytorch_model*.bin``.

Also the one place that runs a model through ``transformers``, for every source with a loadable
folder: the checks before a load turn what transformers would refuse (a config that asks for
remote code, weights whose unpickling needs code) or silently accept (config shapes that disagree
with the weights, which transformers would re-initialise at random) into one line naming the file
or the tensor, before any activation is computed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from xsae_cli.core.errors import XsaeError
from xsae_cli.zoo.sources import (
    ResolvedModel,
    ResolveOptions,
    Source,
    file_reader,
    read_config,
    register_source,
    sources,
)
from xsae_cli.zoo.weights import tensor_index

INDEX = "model.safetensors.index.json"


class HFFolder(Source):
    kind = "hf_dir"
    describes = "an HF model folder"

    def matches(self, text: str, path: Path) -> bool:
        return path.is_dir()

    def resolve(self, text: str, path: Path, options: ResolveOptions) -> ResolvedModel:
        config = read_config(path)
        files = weight_files(path)
        if files is None:
            return self._single_file(text, path, options)
        for f in files:
            file_reader(f).read_index(f)  # every header checked now: nothing bad gets catalogued
        return ResolvedModel(self.kind, text, path, files, config)

    def _single_file(self, text: str, path: Path, options: ResolveOptions) -> ResolvedModel:
        """A folder holding one file another source reads (a GGUF download, say) is that file."""
        others = [s for s in sources() if s is not self and s.suffixes]
        found = sorted(f for f in path.iterdir() if any(s.matches(str(f), f) for s in others))
        if len(found) == 1:
            reader = next(s for s in others if s.matches(str(found[0]), found[0]))
            return reader.resolve(text, found[0], options)
        if found:
            raise XsaeError(f"{path} holds several model files: {', '.join(f.name for f in found)}", "add one of them by its file path")
        raise XsaeError(f"{path} holds no model weights", f"expected model.safetensors, {INDEX}, pytorch_model.bin or one file of: {', '.join(x for s in others for x in s.suffixes)}")

    def model_dir(self, resolved: ResolvedModel) -> Path | None:
        return resolved.path


def weight_files(folder: Path) -> tuple[Path, ...] | None:
    """The weight files transformers would load from ``folder`` (safetensors first), or None."""
    index = folder / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise XsaeError(f"corrupt shard index {index}: {exc}", "re-download the model folder") from exc
        bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s]
        if bad:
            raise XsaeError(f"{index} names shard files outside its folder: {', '.join(map(str, bad))}", "re-download the model folder")
        files = tuple(folder / s for s in shards)
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise XsaeError(f"{folder} is missing shards listed in its index: {', '.join(missing)}", "re-download the model folder")
        return files
    single = tuple(sorted(folder.glob("*.safetensors")))
    if single:
        return single
    bins = tuple(sorted(folder.glob("pytorch_model*.bin")))
    return bins or None


register_source(HFFolder())


# ---------------------------------------------------------------------------------- running


def load_hf_folder(
    resolved: ResolvedModel,
    *,
    device: Any = "cpu",
    dtype: Any = None,
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
    device_map: str | None = None,
) -> tuple[Any, Any]:
    """Load a runnable transformers model (and tokenizer) from the model's folder.

    Causal LMs load with their LM head (needed for CE-loss and logit-lens metrics); encoders
    such as BERT load as the base model. ``device_map="auto"`` lets accelerate spread a model
    that no single GPU holds over every visible GPU (then CPU RAM), layer by layer.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from xsae_cli.zoo.sources import quiet_transformers

    folder = resolved.model_dir
    config = resolved.handler.config(resolved)
    if folder is None or config is None:
        raise XsaeError(
            f"{resolved.source} has weights but no model config, so it cannot be run",
            "stream its weights with `xsae zoo weights`, or add the HF folder that holds its config.json",
        )
    check_remote_code(folder, config, trust_remote_code)
    tensor_index(resolved)  # every weight file readable without running code, before transformers opens it
    quiet_transformers()
    archs = config.get("architectures") or []
    cls = AutoModelForCausalLM if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else AutoModel
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32, "ignore_mismatched_sizes": True, "output_loading_info": True}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model, loading = cast("tuple[Any, dict[str, Any]]", cls.from_pretrained(folder, **kwargs))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise XsaeError(f"transformers cannot load {folder}: {first}", "check config.json against the weights, or re-download the model folder") from exc
    check_loading(folder, loading, model)
    if not device_map:
        model = model.to(device)
    model.eval()
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **({"trust_remote_code": True} if trust_remote_code else {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise XsaeError(f"{resolved.source} has no usable tokenizer: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", "add a folder with tokenizer files") from exc
    return model, tokenizer


def check_remote_code(folder: Path, config: dict[str, Any], trust_remote_code: bool) -> None:
    """Refuse a config that only custom code can build, unless the user allowed remote code.

    transformers would otherwise ask on the terminal (or fail with a paragraph). A config with
    ``auto_map`` whose ``model_type`` transformers knows loads with the built-in class, as
    transformers itself does without the flag.
    """
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if trust_remote_code or model_type in CONFIG_MAPPING:
        return
    if config.get("auto_map"):
        raise XsaeError(
            f"{folder / 'config.json'} asks for remote code (auto_map, model_type '{model_type}'): running it would execute Python from the model folder",
            "if you trust that code, set trust_remote_code = true under [zoo] in xsae.toml (or XSAE_ZOO_TRUST_REMOTE_CODE=true)",
        )
    raise XsaeError(
        f"{folder / 'config.json'} has model_type {model_type!r}, which this transformers does not know",
        "upgrade transformers, or check the model folder",
    )


#: Tensors the config builds but the weights lack start at random. A head or pooler the
#: checkpoint never had (BERT's pooler: 0.65 % of MiniLM) is a warning; more than this share of
#: the parameters (whole blocks: a config with more layers than the weights) cannot be right.
MISSING_SHARE = 0.01


def check_loading(folder: Path, loading: dict[str, Any], model: Any) -> None:
    """Refuse weights whose shapes disagree with what ``config.json`` builds (transformers would
    re-initialise those tensors at random), or that lack a large share of what it builds."""
    mismatched = sorted(loading.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    if mismatched:
        name, ckpt, built = mismatched[0][0], list(mismatched[0][1]), list(mismatched[0][2])
        more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise XsaeError(
            f"{folder}: config.json disagrees with the weights: tensor {name} is {ckpt} in the weights but the config builds {built}{more}",
            "fix config.json (or re-download the model folder)",
        )
    missing = sorted(loading.get("missing_keys") or [])
    if not missing:
        return
    state = model.state_dict()
    share = sum(state[k].numel() for k in missing if k in state) / max(1, sum(t.numel() for t in state.values()))
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    text = f"{folder}: config.json builds tensor {missing[0]}{more}, which the weights do not hold ({share:.1%} of the parameters start at random)"
    if share > MISSING_SHARE:
        raise XsaeError(text, "fix config.json (or re-download the model folder)")
    from rich.markup import escape

    from xsae_cli.core.console import warn

    warn(escape(text))
