"""Resolve what a user names (folder, file, hub id) into local files xsae can stream or run.

Kinds:
- ``hf_dir``: a Hugging Face model folder (single or sharded safetensors, or pytorch_model.bin);
- ``safetensors``: one ``.safetensors`` file;
- ``gguf``: a GGUF file, dequantised once through transformers + ``gguf`` into a cached
  safetensors folder (later loads take ~1 s instead of ~13 s for SmolLM2-135M);
- ``pt``: a PyTorch checkpoint (a state dict or ``{"model_state_dict", "config", ...}``), always
  read with ``weights_only=True``;
- ``hub``: a hub id, downloaded into the HF cache when online.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xsae_cli.core.config import xsae_cache
from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import atomic_dir, atomic_write_json, check_safetensors

KINDS = ("hf_dir", "safetensors", "gguf", "pt", "hub")
PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ResolvedModel:
    """A model's local files. ``weight_files`` are what :mod:`weights` streams from."""

    kind: str
    source: str
    path: Path
    weight_files: tuple[Path, ...]
    config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_dir(self) -> Path | None:
        """A folder ``transformers`` can load, when there is one."""
        if self.kind in ("hf_dir", "hub"):
            return self.path
        if self.kind == "gguf":
            return Path(self.extra["converted"])
        return None


def resolve(
    source: str | os.PathLike[str],
    *,
    offline: bool = False,
    revision: str = "main",
    convert_gguf: bool = True,
) -> ResolvedModel:
    """Find the files behind ``source``; GGUF files are converted (once) to safetensors."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            return _resolve_dir(path, text, convert_gguf)
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            check_safetensors(path)
            return ResolvedModel("safetensors", text, path, (path,))
        if suffix == ".gguf":
            return _resolve_gguf(path, text, convert_gguf)
        if suffix in PT_SUFFIXES:
            return ResolvedModel("pt", text, path, (path,))
        raise XsaeError(
            f"don't know how to read {path}",
            "give an HF model folder, a .safetensors, .gguf or .pt/.pth/.bin file, or a hub id like org/name",
        )
    if HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return _resolve_hub(text, offline=offline, revision=revision)
    raise XsaeError(f"model path not found: {text}", "check the path, or give a hub id like org/name")


def _resolve_dir(path: Path, text: str, convert_gguf: bool) -> ResolvedModel:
    config = _read_config(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise XsaeError(f"corrupt shard index {index}", "re-download the model folder") from exc
        files = tuple(path / s for s in shards)
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise XsaeError(f"{path} is missing shards listed in its index: {', '.join(missing)}", "re-download the model folder")
        for f in files:
            check_safetensors(f)
        return ResolvedModel("hf_dir", text, path, files, config)
    single = sorted(path.glob("*.safetensors"))
    if single:
        for f in single:
            check_safetensors(f)
        return ResolvedModel("hf_dir", text, path, tuple(single), config)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return ResolvedModel("hf_dir", text, path, tuple(bins), config)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _resolve_gguf(ggufs[0], text, convert_gguf)
    if len(ggufs) > 1:
        raise XsaeError(f"{path} holds several GGUF files: {', '.join(g.name for g in ggufs)}", "add one of them by its file path")
    raise XsaeError(
        f"{path} holds no model weights",
        "expected model.safetensors, model.safetensors.index.json, pytorch_model.bin or a .gguf file",
    )


def _read_config(path: Path) -> dict[str, Any] | None:
    cfg = path / "config.json"
    if not cfg.exists():
        return None
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise XsaeError(f"corrupt {cfg}: {exc}", "re-download the model folder") from exc


def file_sha256(paths: list[Path] | tuple[Path, ...], chunk: int = 8 << 20) -> str:
    """sha256 over the bytes of ``paths`` in order: the identity of a model's weights."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def check_gguf(path: Path) -> None:
    """Refuse a file that is not a readable GGUF before transformers gives an opaque error."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise XsaeError(f"corrupt GGUF file {path}: it does not start with the GGUF magic bytes", "re-download it")
    try:
        import gguf

        gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/IndexError/struct errors on damaged files
        raise XsaeError(f"corrupt or truncated GGUF file {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", "re-download it") from exc


def gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return xsae_cache() / "gguf" / f"{path.stem}-{key}"


def _resolve_gguf(path: Path, text: str, convert: bool) -> ResolvedModel:
    check_gguf(path)
    target = gguf_cache_dir(path)
    if not (target / "config.json").exists():
        if not convert:
            return ResolvedModel("gguf", text, path, (path,), None, {"converted": str(target)})
        convert_gguf(path, target)
    files = tuple(sorted(target.glob("*.safetensors")))
    return ResolvedModel("gguf", text, path, files, _read_config(target), {"converted": str(target), "gguf_file": str(path)})


def convert_gguf(path: Path, target: Path) -> Path:
    """Dequantise a GGUF model into an HF safetensors folder, atomically.

    ``save_pretrained`` refuses a model loaded from GGUF, so the model is rebuilt from its
    config and state dict first. The tokenizer (and its chat template) comes along.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from xsae_cli.core.console import info

    info(f"converting {path.name} from GGUF to safetensors (once; cached in {target})")
    folder, name = str(path.parent), path.name
    quiet_transformers()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:
        raise XsaeError(f"transformers cannot load GGUF file {path}: {str(exc).splitlines()[0]}", "check that its architecture is supported by transformers' GGUF loader") from exc
    config = AutoConfig.for_model(**loaded.config.to_dict())
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict())
    with atomic_dir(target, force=True) as tmp:
        rebuilt.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "xsae_source.json", {"gguf_file": str(path.resolve()), "size": path.stat().st_size})
    return target


def quiet_transformers() -> None:
    """Silence transformers' own tqdm bars and info logs: xsae draws its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _resolve_hub(repo_id: str, *, offline: bool, revision: str) -> ResolvedModel:
    offline = offline or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.jinja"],
            local_files_only=offline,
        )
    except Exception as exc:
        name = type(exc).__name__
        if offline or "LocalEntryNotFound" in name or "Connection" in name or "Offline" in name or "Timeout" in name:
            raise XsaeError(
                f"cannot download hub model '{repo_id}': no network (or offline mode) and it is not in the Hugging Face cache",
                f"download it on a machine with network (huggingface-cli download {repo_id} --local-dir DIR) and run `xsae zoo add DIR`",
            ) from exc
        if "RepositoryNotFound" in name or "GatedRepo" in name or "RevisionNotFound" in name:
            raise XsaeError(f"hub model '{repo_id}' (revision {revision}) not found or not accessible", "check the id, the revision and your HF token") from exc
        raise
    resolved = _resolve_dir(Path(folder), repo_id, True)
    return ResolvedModel("hub", repo_id, Path(folder), resolved.weight_files, resolved.config)


def load_model(
    resolved: ResolvedModel,
    *,
    device: Any = "cpu",
    dtype: Any = None,
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
    device_map: str | None = None,
) -> tuple[Any, Any]:
    """Load a runnable transformers model (and tokenizer) for activation work.

    Causal LMs load with their LM head (needed for CE-loss and logit-lens metrics); encoders
    such as BERT load as the base model. ``device_map="auto"`` lets accelerate spread a model
    that no single GPU holds over every visible GPU (then CPU RAM), layer by layer.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    folder = resolved.model_dir
    if folder is None or resolved.config is None:
        raise XsaeError(
            f"{resolved.source} has weights but no model config, so it cannot be run",
            "stream its weights with `xsae zoo weights`, or add the HF folder that holds its config.json",
        )
    quiet_transformers()
    archs = resolved.config.get("architectures") or []
    cls = AutoModelForCausalLM if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else AutoModel
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if device_map:
        model = cls.from_pretrained(folder, device_map=device_map, **kwargs)
    else:
        model = cls.from_pretrained(folder, **kwargs).to(device)
    model.eval()
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **({"trust_remote_code": True} if trust_remote_code else {}))
        except (OSError, ValueError) as exc:
            raise XsaeError(f"{resolved.source} has no usable tokenizer: {str(exc).splitlines()[0]}", "add a folder with tokenizer files") from exc
    return model, tokenizer
