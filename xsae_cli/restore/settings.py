"""``[restore]`` (training the restoration model), ``[restore.predict]``, ``[restore.evaluate]`` and
``[restore.sae]`` (SAEs on its residual stream). Import-light (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

from xsae_cli.core.settings import InvalidSetting, Settings, register_section, setting
from xsae_cli.sae.settings import SaeTrainSettings

PRESETS = ("tiny", "seed")  # restore/model.py PRESETS holds their shapes
MIXED = ("no", "fp16", "bf16")
VIAS = ("direct", "transformer-lens")
MAX_SEQ = 16384  # characters per window: attention is quadratic in it, so larger is refused, not attempted


@dataclass(frozen=True)
class RestoreTrainSettings(Settings):
    """Training the restoration model on simulated damage (masked spans)."""

    preset: str = setting("tiny", "tiny (tests, demo) or seed (the original 37M-parameter model).", choices=PRESETS)
    corpus: list[str] = setting(["builtin"], "builtin, .atf, .txt, .jsonl or .parquet files, or folders.")
    steps: int = setting(2000, "Optimizer steps.", ge=1, resume="grow")
    batch_size: int = setting(16, "Windows per step.", ge=1)
    seq_len: int = setting(0, "Characters per training window (0: the preset's max_position).", ge=0, le=MAX_SEQ)
    lr: float = setting(1e-3, "Peak learning rate (AdamW, warm-up then cosine).", gt=0)
    weight_decay: float = setting(0.01, "AdamW weight decay.", ge=0)
    warmup_steps: int = setting(50, "Linear warm-up steps (at most a tenth of the run).", ge=0)
    mask_ratio: tuple[float, float] = setting((0.15, 0.25), "Fraction of each window masked: lowest, highest.", gt=0, lt=1, example="0.15,0.25")
    span: tuple[int, int] = setting((1, 10), "Lengths of a masked span: shortest, longest.", ge=1, le=1000, example="1,10")
    held_out_fraction: float = setting(0.05, "Fraction of documents held out.", ge=0, lt=1)
    checkpoint_every: int = setting(200, "Steps between checkpoints.", ge=1, resume="free")
    keep_checkpoints: int = setting(2, "Checkpoints kept.", ge=1, resume="free")
    log_every: int = setting(10, "Steps between log rows.", ge=1, resume="free")
    mixed_precision: str = setting("no", "no, fp16 (CUDA) or bf16, through accelerate.", choices=MIXED)
    seed: int = setting(0, "Random seed (from [hardware] seed).", cli=False)
    device: str = setting("auto", "Device (from [hardware] device).", cli=False, resume="free")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.span[0] > self.span[1]:
            raise InvalidSetting("span", self.span, "must be (shortest, longest) with shortest <= longest", "1,10")
        if self.mask_ratio[0] > self.mask_ratio[1]:
            raise InvalidSetting("mask_ratio", self.mask_ratio, "must be (lowest, highest) with lowest <= highest", "0.15,0.25")


@dataclass(frozen=True)
class PredictSettings(Settings):
    """Beam search over each gap's characters."""

    beam: int = setting(8, "Beams kept per gap length.", ge=1, le=1024)
    top: int = setting(5, "Restorations shown per gap.", ge=1, le=1000)
    min_len: int = setting(1, "Shortest restoration tried for [...].", ge=1, le=1000)
    max_len: int = setting(10, "Longest restoration tried for [...].", ge=1, le=1000)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_len > self.max_len:
            raise InvalidSetting("max_len", self.max_len, f"must be at least min_len ({self.min_len})", str(self.min_len))


@dataclass(frozen=True)
class EvaluateSettings(Settings):
    """Held-out masked-span accuracy next to a character n-gram."""

    windows: int = setting(200, "Held-out windows to mask and score.", ge=1, le=1_000_000)
    order: int = setting(6, "Order of the character n-gram baseline.", ge=1, le=32)


@dataclass(frozen=True)
class RestoreSaeSettings(SaeTrainSettings):
    """An SAE on the residual stream after one block, samples streamed through the model."""

    layer: int = setting(-1, "Block whose output (residual stream) is hooked, 0-based (-1: the middle one).", ge=-1)
    max_samples: int = setting(200, "Corpus windows streamed through the model.", ge=1)
    epochs: int = setting(50, "Passes over the samples.", ge=1, resume="grow")
    batch_samples: int = setting(4, "Samples per forward pass of the model.", ge=1)
    seq_len: int | None = setting(None, "Characters per sample (default: the model's training windows).", ge=1, le=MAX_SEQ)
    via: str = setting("direct", "direct (hook the original model, stop after the block) or transformer-lens (run_with_cache, for comparison).", choices=VIAS)
    corpus: list[str] | None = setting(None, "Text to sample (default: the model's training corpus, else builtin).")
    top_n: int = setting(8, "Top contexts kept per latent in features.json.", ge=1, cli=False, resume="free")
    summary_samples: int = setting(64, "Samples scanned for features.json.", ge=1, cli=False, resume="free")


_MOVED = {"beam": "restore.predict.beam", "top": "restore.predict.top", "max_gap": "restore.predict.max_len"}
_MOVED.update({k: f"restore.sae.{k}" for k in ("layer", "arch", "k", "expansion", "epochs", "max_samples")})
_MOVED["sae_batch_size"] = "restore.sae.batch_size"
register_section("restore", RestoreTrainSettings, fixed=("seed", "device"), renamed=_MOVED)
register_section("restore.predict", PredictSettings)
register_section("restore.evaluate", EvaluateSettings)
# tokens: the SAE trains `epochs` passes over the samples, so the service sets it.
register_section("restore.sae", RestoreSaeSettings, fixed=("tokens",), batch_size=1024, dead_tokens_threshold=100_000)
