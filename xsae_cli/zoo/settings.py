"""``[zoo]``: where models come from. Import-light (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from xsae_cli.core.settings import Settings, register_section, setting


@dataclass(frozen=True)
class ZooSettings(Settings):
    """How models are found and loaded."""

    trust_remote_code: bool = setting(False, "Allow a model's own Python code (transformers' trust_remote_code); only for sources you trust.")
    offline: bool = setting(False, "Never contact the model hub (HF_HUB_OFFLINE=1 does the same).")
    revision: str = setting("main", "Hub revision (branch, tag or commit) of hub ids.")


register_section("zoo", ZooSettings)
