"""What a user names (folder, file, hub id) -> a model xsae can index, stream or run: the source registry.

Each kind of source is one module in this package holding one :class:`Source` subclass and its
registration line, ``register_source(MySource())``, the way SAELens registers an SAE class and
PEFT a tuner. The registry is the only place that knows formats: ``zoo``, ``sane`` and ``sae``
reach weights through :func:`resolve`, :func:`load_model` and :mod:`zoo.weights`
(``tensor_index``, ``iter_weights``), never by a file suffix. Built in (one module each):

- ``hf_dir`` (:mod:`.hf_folder`): a Hugging Face model folder (single or sharded safetensors, or
  ``pytorch_model.bin``), or a folder holding one file another source reads;
- ``hub`` (:mod:`.hub`): a hub id, downloaded into the HF cache when online;
- ``safetensors`` (:mod:`.safetensors_file`): one ``.safetensors`` file;
- ``gguf`` (:mod:`.gguf_file`): a GGUF file, dequantised once through transformers + ``gguf`` into a
  cached safetensors folder (later loads take ~1 s instead of ~13 s for SmolLM2-135M);
- ``pt`` (:mod:`.torch_checkpoint`): a PyTorch checkpoint (a state dict or ``{"model_state_dict",
  "config", ...}``), always read with ``weights_only=True``.

A source validates what it resolves before anything is catalogued or loaded (every bad file is
one :class:`XsaeError` line naming the file), gives the tensor index from headers alone where
the format allows, and streams tensors one at a time, memory-mapped where it can, so peak
memory is about one tensor whatever the model's size.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.plugins import load_package_modules
from xsae_cli.zoo.weights import TensorInfo


@dataclass(frozen=True)
class ResolvedModel:
    """A model's local files, as its source found them. ``weight_files`` are what it streams from."""

    kind: str
    source: str
    path: Path
    weight_files: tuple[Path, ...]
    config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def handler(self) -> Source:
        """The registered source that resolved (and reads) this model."""
        return source_kind(self.kind)

    @property
    def model_dir(self) -> Path | None:
        """A folder ``transformers`` can load, when there is one."""
        return self.handler.model_dir(self)


@dataclass(frozen=True)
class ResolveOptions:
    """What :func:`resolve` was asked: ``prepare`` allows one-time work such as a GGUF conversion."""

    offline: bool = False
    revision: str = "main"
    prepare: bool = True


class Source:
    """One way of naming a model. Subclass it, set ``kind``/``describes``/``suffixes``, register it.

    Sources that read a single file implement :meth:`read_index` and :meth:`read_weights` for one
    file; the defaults of :meth:`tensor_index` and :meth:`iter_weights` then read every weight file
    through whichever registered source reads that file, so a folder of shards needs no reader of
    its own. A source whose files ``transformers`` can load returns that folder from
    :meth:`model_dir`, and :meth:`load_model` runs it.
    """

    kind: str = ""
    describes: str = ""  # for help and errors: "a .safetensors file"
    suffixes: tuple[str, ...] = ()  # file name endings it reads (lowercase)

    # ------------------------------------------------------------------ naming and resolving

    def matches(self, text: str, path: Path) -> bool:
        """Does this source read what the user named (``text``, as a ``path``)?"""
        return bool(self.suffixes) and path.is_file() and path.name.lower().endswith(self.suffixes)

    def resolve(self, text: str, path: Path, options: ResolveOptions) -> ResolvedModel:
        """Find (and validate) the files behind ``text``; cheap: headers only."""
        self.read_index(path)
        return ResolvedModel(self.kind, text, path, (path,))

    # ------------------------------------------------------------------ reading

    def read_index(self, file: Path) -> list[TensorInfo]:
        """Tensors of one file this source reads, from its header where the format allows."""
        raise NotImplementedError(f"{type(self).__name__} reads no single files")

    def read_weights(self, file: Path) -> Iterator[tuple[str, Any]]:
        """``(name, tensor)`` of one file, one tensor at a time."""
        raise NotImplementedError(f"{type(self).__name__} reads no single files")

    def tensor_index(self, resolved: ResolvedModel) -> list[TensorInfo]:
        return [t for f in resolved.weight_files for t in file_reader(f).read_index(f)]

    def iter_weights(self, resolved: ResolvedModel) -> Iterator[tuple[str, Any]]:
        for f in resolved.weight_files:
            yield from file_reader(f).read_weights(f)

    # ------------------------------------------------------------------ describing and running

    def model_dir(self, resolved: ResolvedModel) -> Path | None:
        return None

    def config(self, resolved: ResolvedModel) -> dict[str, Any] | None:
        """The model's config (``config.json``, or what the checkpoint carries)."""
        return resolved.config

    def identity_files(self, resolved: ResolvedModel) -> tuple[Path, ...]:
        """The files whose bytes are the model's identity (sha256) and its size on disk."""
        return resolved.weight_files

    def catalogue_path(self, resolved: ResolvedModel) -> str:
        """What the catalogue stores to resolve this model again (with ``kind``)."""
        return str(resolved.path.resolve())

    def catalogue_extra(self, resolved: ResolvedModel) -> dict[str, Any]:
        return {}

    def load_model(self, resolved: ResolvedModel, **kwargs: Any) -> tuple[Any, Any]:
        """A runnable model and tokenizer (see :func:`load_model` for the arguments)."""
        from xsae_cli.zoo.sources.hf_folder import load_hf_folder

        return load_hf_folder(resolved, **kwargs)


# ---------------------------------------------------------------------------------- the registry

SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> Source:
    """Make ``source`` resolvable; the registration line of every source module."""
    if not source.kind:
        raise ValueError(f"{type(source).__name__} has no kind")
    if source.kind in SOURCES and type(SOURCES[source.kind]) is not type(source):
        raise ValueError(f"a source of kind {source.kind!r} is already registered ({type(SOURCES[source.kind]).__name__})")
    SOURCES[source.kind] = source
    return source


def sources() -> list[Source]:
    """Every registered source, in registration order."""
    _load_builtin()
    return list(SOURCES.values())


def source_kind(kind: str) -> Source:
    _load_builtin()
    if kind not in SOURCES:
        raise XsaeError(f"no source reads models of kind '{kind}'", f"known kinds: {', '.join(SOURCES)}; re-add the model with `xsae zoo add`")
    return SOURCES[kind]


def describe_sources() -> str:
    """``an HF model folder, a .safetensors file, ...``: what ``zoo add`` accepts, from the registry."""
    names = [s.describes for s in sources() if s.describes]
    return ", ".join(names[:-1]) + (" or " if len(names) > 1 else "") + names[-1] if names else ""


def file_reader(file: Path) -> Source:
    """The registered source that reads ``file`` on its own (by its name; see :meth:`Source.matches`)."""
    for s in sources():
        if s.matches(str(file), file):
            return s
    raise XsaeError(f"don't know how to read {file}", f"xsae reads {describe_sources()}")


def resolve(
    source: str | os.PathLike[str],
    *,
    offline: bool = False,
    revision: str = "main",
    prepare: bool = True,
    kind: str | None = None,
) -> ResolvedModel:
    """Find the files behind ``source`` through the first registered source that matches it.

    ``kind`` (from the catalogue) names the source to use; ``prepare=False`` skips one-time
    preparation (a GGUF file is then streamed as stored, not converted).
    """
    text = str(source)
    path = Path(text).expanduser()
    options = ResolveOptions(offline=offline, revision=revision, prepare=prepare)
    if kind is not None:
        chosen = source_kind(kind)
        if not chosen.matches(text, path):
            if not path.exists() and kind != "hub":
                raise XsaeError(f"model path not found: {text}", "it was catalogued from there; put it back or re-add it with `xsae zoo add`")
            raise XsaeError(f"{text} is no longer {chosen.describes}", "re-add it with `xsae zoo add --force`")
        return chosen.resolve(text, path, options)
    for s in sources():
        if s.matches(text, path):
            return s.resolve(text, path, options)
    if path.exists():
        raise XsaeError(f"don't know how to read {path}", f"give {describe_sources()}")
    raise XsaeError(f"model path not found: {text}", "check the path, or give a hub id like org/name")


def load_model(resolved: ResolvedModel, **options: Any) -> tuple[Any, Any]:
    """A runnable transformers model (and tokenizer) for activation work, through its source.

    ``options``: ``device``, ``dtype``, ``trust_remote_code``, ``with_tokenizer``, ``device_map``
    (see :func:`hf_folder.load_hf_folder`, what every source with a loadable folder runs).
    Loading takes seconds to minutes: a status line says so."""
    from xsae_cli.core.console import status

    with status(f"loading model {resolved.source}"):
        return resolved.handler.load_model(resolved, **options)


# ---------------------------------------------------------------------------------- shared helpers


def file_sha256(paths: list[Path] | tuple[Path, ...], chunk: int = 8 << 20) -> str:
    """sha256 over the bytes of ``paths`` in order: the identity of a model's weights."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def read_config(folder: Path) -> dict[str, Any] | None:
    """``folder/config.json`` as a dict, or None when there is none."""
    cfg = folder / "config.json"
    if not cfg.exists():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise XsaeError(f"corrupt {cfg}: {exc}", "re-download the model folder") from exc
    if not isinstance(data, dict):
        raise XsaeError(f"corrupt {cfg}: it holds a JSON {type(data).__name__}, not an object", "re-download the model folder")
    return data


def quiet_transformers() -> None:
    """Silence transformers' own tqdm bars and info logs: xsae draws its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_builtin() -> None:
    load_package_modules(__name__, __path__)  # each source module registers itself: none is listed by hand
