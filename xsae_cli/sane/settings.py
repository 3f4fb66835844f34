"""``[sane]`` (training the SANE autoencoder), ``[sane.embed]`` and ``[sane.calibrate]``.

:class:`SaneTrainSettings` is what ``sane/train.py`` trains with and holds the autoencoder's
shape (``model_config()``); the original Universal SANE's flags map onto it one to one
(``--epochs --batch-size --window-size --save-every --mixed-precision``). Import-light (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xsae_cli.core.settings import InvalidSetting, Settings, register_section, setting
from xsae_cli.sane import LINEAGE_FAMILIES, LINEAGE_REAL

MIXED = ("no", "fp16", "bf16")
MODEL, TRAIN = "SANE autoencoder", "SANE training"


def view_names() -> list[str]:
    """The registered SANE views (``sane/views/``: one file each)."""
    from xsae_cli.sane.views import views

    return list(views())


@dataclass(frozen=True)
class SaneTrainSettings(Settings):
    """What is tokenised, the autoencoder's shape and how it trains."""

    view: str = setting(
        "circuits",
        "What is tokenised from each model: a registered view (circuits: token-space circuits, free of weight-space symmetries; canonical: weights with symmetries sorted away; weights: as stored).",
        choices=view_names,
        panel=MODEL,
    )
    chunk_size: int = setting(64, "Floats per chunk.", ge=2, le=4096, panel=MODEL)
    strict: bool = setting(False, "Refuse (exit 2) a model the view cannot read (e.g. an anatomy that cannot be derived) instead of falling back to the next view.", panel=MODEL)
    layer_keywords: list[str] = setting(
        ["layers", "layer", "h", "blocks", "block", "blk", "mixer", "rwkv"], "Name segments followed by a block number (depth coordinates of tensors).", cli=False, panel=MODEL
    )
    latent_dim: int = setting(16, "Per-chunk latent size (must be < chunk size).", ge=1, panel=MODEL)
    d_model: int = setting(128, "Transformer width.", ge=8, le=8192, panel=MODEL)
    epochs: int = setting(10, "Training epochs.", ge=1, panel=TRAIN, resume="grow")
    batch_size: int = setting(4, "Windows per step (each gives two views; at least 2 for the contrastive loss).", ge=2, panel=TRAIN)
    window_size: int = setting(1024, "Chunks per window.", ge=1, le=1 << 20, panel=TRAIN)
    lr: float = setting(3e-4, "AdamW learning rate.", gt=0, panel=TRAIN)
    weight_decay: float = setting(0.01, "AdamW weight decay.", ge=0, panel=TRAIN)
    steps_per_epoch: int = setting(0, "Steps per epoch (0: cover the zoo once, capped by max_steps_per_epoch).", ge=0, panel=TRAIN)
    max_steps_per_epoch: int = setting(100, "Cap on the automatic steps per epoch.", ge=1, panel=TRAIN)
    mask_prob: float = setting(0.15, "Fraction of chunks masked in the reconstruction objective.", ge=0, lt=1, panel=TRAIN)
    noise: float = setting(0.05, "Noise added to the second view (relative).", ge=0, panel=TRAIN)
    temperature: float = setting(0.1, "NT-Xent temperature.", gt=0, panel=TRAIN)
    contrast_weight: float = setting(0.5, "Weight of the contrastive loss.", ge=0, panel=TRAIN)
    lineage_views: float = setting(0.0, "P(second view = same window of another model of the lineage), when a lineage is given.", ge=0, le=1, panel=TRAIN)
    save_every: int = setting(1, "Epochs between checkpoints.", ge=1, panel=TRAIN, resume="free")
    keep: int = setting(0, "Checkpoints kept (0: all).", ge=0, panel=TRAIN, resume="free")
    mixed_precision: str = setting("no", "no, fp16 or bf16 (through accelerate).", choices=MIXED, panel=TRAIN)
    seed: int = setting(0, "Random seed (from [hardware] seed).", cli=False)
    device: str = setting("auto", "Device (from [hardware] device).", cli=False, resume="free")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latent_dim >= self.chunk_size:
            raise InvalidSetting("latent_dim", self.latent_dim, f"must be smaller than chunk_size ({self.chunk_size}): the per-chunk latent is a bottleneck", str(self.chunk_size // 4))

    def model_config(self) -> Any:
        from xsae_cli.sane.model import SaneModelConfig

        cfg = SaneModelConfig(chunk_size=self.chunk_size, latent_dim=self.latent_dim, d_model=self.d_model)
        cfg.validate()
        return cfg


@dataclass(frozen=True)
class EmbedSettings(Settings):
    """Embedding models with a trained checkpoint."""

    window_size: int | None = setting(None, "Chunks per window (default: the checkpoint's).", ge=1, le=1 << 20)
    batch_size: int = setting(8, "Windows per forward pass.", ge=1)
    max_windows: int | None = setting(None, "Cap windows per model (evenly spaced; the JSON records the fraction of chunks seen). Default: cover the whole model.", ge=1)
    format: str = setting("xsae", "model_embeddings.json layout: xsae (vectors with provenance) or plain (the original Universal SANE's {model name: [floats]} map).", choices=("xsae", "plain"))


@dataclass(frozen=True)
class CalibrateSettings(Settings):
    """Fitting per-kind pooling gains on known lineages."""

    max_windows: int = setting(32, "Windows per model (evenly spaced) when fitting.", ge=1)


@dataclass(frozen=True)
class LineageSettings(Settings):
    """``xsae sane evaluate``: the lineage benchmark's zoo, folds and SANE training budget."""

    families: tuple[str, ...] = setting(
        LINEAGE_FAMILIES, "Tiny families used as random-initialised bases (a test-zoo name, or hf:<transformers model_type> for any family transformers builds from a config).", panel="Lineage zoo"
    )
    holdout_families: tuple[str, ...] = setting((), "Families (of --families) whose members SANE never trains on; scored per held-out family.", panel="Lineage zoo")
    seeds: int = setting(3, "Random-initialised bases per family (2 or more: one base per family makes lineage trivial).", ge=2, panel="Lineage zoo")
    real: tuple[str, ...] = setting(LINEAGE_REAL, "Real demo models used as bases ('' for none).", panel="Lineage zoo")
    real_layers: int = setting(3, "Evenly spaced blocks of a real base that are written out and compared.", ge=1, panel="Lineage zoo")
    folds: int = setting(2, "1: hold out permutations, norm rescaling and the hard types only; 2: every type held out once.", ge=1, le=2)
    epochs: int = setting(3, "Training epochs per fold.", ge=1)
    steps_per_epoch: int = setting(40, "SANE training steps per epoch.", ge=1)
    batch_size: int = setting(8, "Windows per SANE training step.", ge=2)
    window_size: int = setting(256, "Chunks per window.", ge=1)
    max_windows: int = setting(32, "Windows per model when embedding (evenly spaced; tiny models fit whole).", ge=1)
    d_model: int = setting(64, "SANE transformer width.", ge=8)
    latent_dim: int = setting(16, "Per-chunk latent size.", ge=1)
    lr: float = setting(1e-3, "SANE learning rate.", gt=0)
    lineage_views: float = setting(0.5, "P(second view = same window of another model of the lineage).", ge=0, le=1)
    fit_gains: bool = setting(True, "Fit per-kind pooling gains on the training models' lineages (sane/calibrate.py).")
    tiny_ft: tuple[int, int, float] = setting((20, 200, 1e-3), "Tiny models' fine-tunes: short steps, long steps, lr.", cli=False)
    real_ft: tuple[int, int, float] = setting((4, 16, 5e-5), "Real models' fine-tunes: short steps, long steps, lr.", cli=False)
    ft_batch: tuple[int, int] = setting((4, 32), "Tiny models' fine-tune batch: sequences, tokens (real models use 2, 64).", cli=False)
    seed: int = setting(0, "Random seed (from [hardware] seed).", cli=False)
    train_seed: int = setting(0, "SANE's training seed only: the zoo, its transforms and the baselines stay as they are.")
    view: str = setting("circuits", "What SANE and the random encoder read (a registered view).", choices=view_names)


register_section("sane", SaneTrainSettings, fixed=("seed", "device"))
register_section("sane.evaluate", LineageSettings, fixed=("seed",))
register_section("sane.embed", EmbedSettings)
register_section("sane.calibrate", CalibrateSettings)
