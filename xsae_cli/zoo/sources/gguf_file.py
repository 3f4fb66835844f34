"""A GGUF file (llama.cpp's format), dequantised once into a cached safetensors folder.

transformers + ``gguf`` do the dequantisation (~13 s for SmolLM2-135M); the cached folder then
loads in ~1 s and streams like any HF folder, under HF tensor names. With ``prepare=False`` the
file is streamed as stored: GGUF names (``blk.N.attn_q.weight``), each tensor dequantised to
float32 from a memory-mapped reader.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xsae_cli.core.config import xsae_cache
from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import atomic_dir, atomic_write_json
from xsae_cli.zoo.sources import (
    ResolvedModel,
    ResolveOptions,
    Source,
    TensorInfo,
    quiet_transformers,
    read_config,
    register_source,
)


class GGUFFile(Source):
    kind = "gguf"
    describes = "a .gguf file"
    suffixes = (".gguf",)

    def resolve(self, text: str, path: Path, options: ResolveOptions) -> ResolvedModel:
        check_gguf(path)
        target = gguf_cache_dir(path)
        if not (target / "config.json").exists():
            if not options.prepare:
                return ResolvedModel(self.kind, text, path, (path,), None, {"converted": str(target)})
            convert_gguf(path, target)
        files = tuple(sorted(target.glob("*.safetensors")))
        return ResolvedModel(self.kind, text, path, files, read_config(target), {"converted": str(target), "gguf_file": str(path)})

    def read_index(self, file: Path) -> list[TensorInfo]:
        return [TensorInfo(name, tuple(int(s) for s in reversed(list(t.shape))), "float32", file.name, int(t.n_bytes)) for name, t in gguf_tensors(file)]

    def read_weights(self, file: Path) -> Iterator[tuple[str, Any]]:
        """GGUF tensors under their GGUF names, dequantised to float32."""
        import gguf
        import numpy as np
        import torch

        for name, t in gguf_tensors(file):
            data = gguf.quants.dequantize(t.data, t.tensor_type)
            yield name, torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))

    def model_dir(self, resolved: ResolvedModel) -> Path | None:
        return Path(resolved.extra["converted"])

    def identity_files(self, resolved: ResolvedModel) -> tuple[Path, ...]:
        return (resolved.path,)  # the GGUF's own bytes, not the conversion's

    def catalogue_extra(self, resolved: ResolvedModel) -> dict[str, Any]:
        return {"converted": resolved.extra.get("converted")}


register_source(GGUFFile())


def check_gguf(path: Path) -> Any:
    """Refuse a file that is not a complete GGUF before transformers gives an opaque error; return its reader."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise XsaeError(f"corrupt GGUF file {path}: it does not start with the GGUF magic bytes", "re-download it")
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/IndexError/struct errors on damaged files
        raise XsaeError(f"corrupt or truncated GGUF file {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", "re-download it") from exc
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise XsaeError(f"corrupt or truncated GGUF file {path}: its tensors need {end} bytes but the file has {size}", "re-download it")
    return reader


def gguf_tensors(path: Path) -> list[tuple[str, Any]]:
    return [(t.name, t) for t in check_gguf(path).tensors]


def gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return xsae_cache() / "gguf" / f"{path.stem}-{key}"


def convert_gguf(path: Path, target: Path) -> Path:
    """Dequantise a GGUF model into an HF safetensors folder, atomically.

    ``save_pretrained`` refuses a model loaded from GGUF, so the model is rebuilt from its
    config and state dict first. The tokenizer (and its chat template) comes along.
    """
    from xsae_cli.core.console import status

    with status(f"converting {path.name} from GGUF to safetensors (once; cached in {target})"):
        return _convert(path, target)


def _convert(path: Path, target: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    quiet_transformers()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:
        raise XsaeError(
            f"transformers cannot load GGUF file {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", "check that its architecture is supported by transformers' GGUF loader"
        ) from exc
    config = AutoConfig.for_model(**loaded.config.to_dict())
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict())
    with atomic_dir(target, force=True) as tmp:
        rebuilt.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "xsae_source.json", {"gguf_file": str(path.resolve()), "size": path.stat().st_size})
    return target
