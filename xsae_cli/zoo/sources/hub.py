"""A Hugging Face hub id (``org/name``): downloaded into the HF cache when online, then an HF folder.

Only weights xsae can read without code are fetched (safetensors, configs, tokenizer files);
offline (``HF_HUB_OFFLINE=1`` or ``[zoo] offline``) a model not in the cache is one clear error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from xsae_cli.core.errors import XsaeError
from xsae_cli.zoo.sources import ResolvedModel, ResolveOptions, register_source
from xsae_cli.zoo.sources.hf_folder import HFFolder

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class HubRepo(HFFolder):
    kind = "hub"
    describes = "a hub id (org/name)"

    def matches(self, text: str, path: Path) -> bool:
        return not path.exists() and bool(HUB_ID.match(text)) and not text.startswith((".", "/", "~"))

    def resolve(self, text: str, path: Path, options: ResolveOptions) -> ResolvedModel:
        offline = options.offline or os.environ.get("HF_HUB_OFFLINE") == "1"
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(
                text,
                revision=options.revision,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.jinja"],
                local_files_only=offline,
            )
        except Exception as exc:
            name = type(exc).__name__
            if offline or "LocalEntryNotFound" in name or "Connection" in name or "Offline" in name or "Timeout" in name:
                raise XsaeError(
                    f"cannot download hub model '{text}': no network (or offline mode) and it is not in the Hugging Face cache",
                    f"download it on a machine with network (huggingface-cli download {text} --local-dir DIR) and run `xsae zoo add DIR`",
                ) from exc
            if "RepositoryNotFound" in name or "GatedRepo" in name or "RevisionNotFound" in name:
                raise XsaeError(f"hub model '{text}' (revision {options.revision}) not found or not accessible", "check the id, the revision and your HF token") from exc
            raise
        local = super().resolve(text, Path(folder), options)
        return ResolvedModel(self.kind, text, Path(folder), local.weight_files, local.config)

    def catalogue_path(self, resolved: ResolvedModel) -> str:
        return resolved.source  # the id: the snapshot folder changes with the revision


register_source(HubRepo())
