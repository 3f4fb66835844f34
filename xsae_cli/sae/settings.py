"""The settings of SAE training: ``[sae]`` (``xsae sae train``) and the SAEs other groups train.

:class:`SaeTrainSettings` is how an SAE trains (architecture, width, optimizer, schedule); it is
used by ``[sae]``, ``[align.sae]`` and ``[restore.sae]``, each with its own defaults (align's SAEs
are narrower and shorter-trained, see ``align/settings.py``). :class:`SaeRunSettings` adds where the
activations of ``xsae sae train`` come from and how they are evaluated. Import-light: no torch.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.settings import InvalidSetting, Settings, register_section, setting

TOKEN_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMbB]?)\s*$")
OPTIMIZERS = ("signum", "adam")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
SITES = ("output", "input")
TRACKERS = ("tensorboard", "wandb")


def parse_tokens(text: str | int) -> int:
    """'2M' -> 2_000_000, '500k' -> 500_000, '1.5B' -> 1_500_000_000."""
    if isinstance(text, bool):
        raise TypeError
    if isinstance(text, int):
        return text
    m = TOKEN_RE.match(str(text))
    if not m:
        raise XsaeError(f"bad token count '{text}'", "write e.g. 500k, 2M or 2000000")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def architectures() -> list[str]:
    """The registered SAE architectures (imports the models: only called for a non-default value)."""
    from xsae_cli.sae.models import ARCHITECTURES

    return list(ARCHITECTURES)


ARCH, TRAIN, LOSS, DATA, EVAL = "SAE architecture", "SAE training", "SAE losses", "Activations", "Evaluation"


@dataclass(frozen=True)
class SaeTrainSettings(Settings):
    """How SAEs train: architecture, width, optimizer and schedule (the SAE's own config comes from these)."""

    arch: str = setting("topk", "SAE architecture: relu, topk, batchtopk, jumprelu, gated, matryoshka_batchtopk or another registered one (xsae sae archs).", choices=architectures, panel=ARCH)
    k: int = setting(32, "Active latents per token (topk, batchtopk: on average).", ge=1, panel=ARCH)
    expansion: int = setting(8, "d_sae = expansion x d_in.", ge=1, panel=ARCH)
    d_sae: int | None = setting(None, "Number of latents (overrides --expansion).", ge=1, panel=ARCH)
    normalize_activations: str = setting("none", "Input scaling: none, expected_average_only_in, constant_norm_rescale or layer_norm.", choices=NORMALIZATIONS, panel=ARCH)
    optimizer: str = setting("signum", "signum (schedule-free, sparsify's default) or adam.", choices=OPTIMIZERS, panel=TRAIN)
    lr: float | None = setting(None, "Learning rate (default: adam 3e-4; signum 5e-3 / sqrt(d_sae / 2**14), as sparsify).", gt=0, panel=TRAIN, example="3e-4")
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam's betas.", ge=0, lt=1, panel=TRAIN, example="0.9,0.999")
    warmup_fraction: float = setting(0.02, "Fraction of the steps with a linear learning-rate warm-up.", ge=0, le=1, panel=TRAIN)
    decay_fraction: float = setting(0.2, "Adam: fraction of the steps at the end with a linear decay to zero.", ge=0, le=1, panel=TRAIN)
    batch_size: int = setting(4096, "Tokens per step.", ge=1, panel=TRAIN)
    tokens: int = setting(2_000_000, "Training tokens, e.g. 500k or 2M.", ge=1, parse=parse_tokens, panel=TRAIN, example="2M", resume="grow")
    checkpoint_every: int = setting(200, "Steps between checkpoints.", ge=1, panel=TRAIN, resume="free")
    keep_checkpoints: int = setting(2, "Checkpoints kept in the run folder (older ones are removed).", ge=1, panel=TRAIN, resume="free")
    log_every: int = setting(10, "Steps between rows of train_log.jsonl.", ge=1, panel=TRAIN, resume="free")
    init_b_dec: str = setting("geometric_median", "Where b_dec starts: geometric_median, mean or zeros of a first batch.", choices=B_DEC_INITS, panel=TRAIN)
    dead_tokens_threshold: int = setting(1_000_000, "Tokens without firing after which a latent counts as dead (feeds AuxK).", ge=1, panel=TRAIN)
    log_with: str | None = setting(None, "Also log to tensorboard or wandb (through accelerate's trackers).", choices=TRACKERS, panel=TRAIN, resume="free")
    l1_coefficient: float = setting(5.0, "relu: weight of the decoder-norm-weighted L1 penalty.", ge=0, panel=LOSS)
    l0_coefficient: float = setting(1e-3, "jumprelu: weight of the L0 penalty.", ge=0, panel=LOSS)
    jumprelu_bandwidth: float = setting(1e-3, "jumprelu: width of the straight-through estimator's kernel.", gt=0, panel=LOSS)
    jumprelu_init_threshold: float = setting(1e-3, "jumprelu: initial threshold.", ge=0, panel=LOSS)
    aux_k: int | None = setting(None, "topk/batchtopk: dead latents in the AuxK loss (default d_in // 2).", ge=1, panel=LOSS)
    aux_k_coefficient: float = setting(1 / 32, "topk/batchtopk: weight of the AuxK loss.", ge=0, panel=LOSS)
    batchtopk_threshold_lr: float = setting(0.01, "batchtopk: EMA rate of the inference threshold.", gt=0, le=1, panel=LOSS)
    gated_l1_coefficient: float | None = setting(None, "gated: weight of the L1 penalty on the gate (default 1.0, SAELens's).", ge=0, panel=LOSS)
    matryoshka_widths: tuple[int, ...] | None = setting(
        None, "matryoshka_batchtopk: nested prefix widths, strictly increasing, at most d_sae (d_sae is added as the last level).", ge=1, panel=ARCH, example="512,2048,8192"
    )
    bf16_encoder: bool | None = setting(None, "Run the training encoder matmul in bf16 (default: auto, where it is fast and costs no FVU; inference is always exact).", panel=TRAIN)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup_fraction + self.decay_fraction > 1:
            raise InvalidSetting("decay_fraction", self.decay_fraction, f"plus warmup_fraction {self.warmup_fraction} must be at most 1", "0.2")
        if self.gated_l1_coefficient is not None:
            self.arch_options()  # set for an architecture without it (reads the registry: only when set)
        widths = self.matryoshka_widths
        if widths is not None:
            bad = next(("are not strictly increasing" for a, b in itertools.pairwise(widths) if b <= a), None)
            if bad is None and self.d_sae is not None and widths and widths[-1] > self.d_sae:
                bad = f"exceed d_sae={self.d_sae}"
            if bad:
                raise InvalidSetting("matryoshka_widths", ",".join(map(str, widths)), bad, "512,2048,8192")
            self.arch_options()  # set for an architecture that has no such option (reads the registry: only when set)

    def sae_overrides(self) -> dict[str, Any]:
        """The SaeConfig fields these settings decide (the rest come from the data: d_in, metadata)."""
        return {
            "l1_coefficient": self.l1_coefficient,
            "l0_coefficient": self.l0_coefficient,
            "jumprelu_bandwidth": self.jumprelu_bandwidth,
            "jumprelu_init_threshold": self.jumprelu_init_threshold,
            "aux_k": self.aux_k,
            "aux_k_coefficient": self.aux_k_coefficient,
            "dead_tokens_threshold": self.dead_tokens_threshold,
            "normalize_activations": self.normalize_activations,
            "batchtopk_threshold_lr": self.batchtopk_threshold_lr,
            "bf16_encoder": self.bf16_encoder,
            **self.arch_options(),
        }

    def arch_options(self) -> dict[str, Any]:
        """The fields that are options of this architecture's registration (e.g. matryoshka_widths), when set."""
        from xsae_cli.sae.registry import get_arch, specs

        own = get_arch(self.arch).options
        for spec in specs().values():  # another architecture's option, set: a mistake, not a no-op
            for name in set(spec.options) - set(own):
                if getattr(self, name, None) is not None:
                    raise XsaeError(f"{name} is set but a {self.arch} SAE has no such option (it is {spec.name}'s)", f"drop {name}, or use arch = {spec.name}")
        values = {name: getattr(self, name) for name in own if getattr(self, name, None) is not None}
        return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}  # as cfg.json holds them


@dataclass(frozen=True)
class SaeRunSettings(SaeTrainSettings):
    """``xsae sae train``: how SAEs train, plus where their activations come from and how they are scored."""

    corpus: str = setting("builtin", "builtin, a .txt/.jsonl/.parquet file, or a datasets folder.", panel=DATA)
    text_field: str = setting("text", "The text column of a .jsonl/.parquet/datasets corpus.", panel=DATA)
    context_size: int = setting(128, "Tokens per context.", ge=2, le=65536, panel=DATA)
    pack: bool = setting(True, "Pack documents into full contexts (--no-pack: one document per context).", panel=DATA)
    held_out_fraction: float = setting(0.05, "Fraction of the documents held out for evaluation.", ge=0, lt=1, panel=DATA)
    site: str = setting("output", "Hook the module's output or input.", choices=SITES, panel=DATA)
    drop_special: bool = setting(True, "Drop BOS/EOS/separator positions (attention-sink outliers).", panel=DATA)
    outlier_factor: float | None = setting(None, "Also drop tokens whose norm exceeds this x the median.", gt=1, panel=DATA)
    batch_contexts: int = setting(8, "Contexts per forward pass of the model.", ge=1, panel=DATA, resume="free")
    cache: bool | None = setting(None, "Cache the harvest on disk (--no-cache: stream; default: stream under a launcher, cache alone).", panel=DATA, resume="free")
    cache_dtype: str = setting(
        "auto", "Dtype of a cached harvest ('auto': the model's, bf16 for a bf16 model: half of float32's disk).", choices=("auto", "bfloat16", "float16", "float32"), panel=DATA
    )
    device_map: str | None = setting(
        None, "'auto': spread a model too large for one GPU over all visible GPUs (accelerate).", choices=("auto", "balanced", "balanced_low_0", "sequential"), panel=DATA, resume="free"
    )
    eval_tokens: int = setting(32768, "Held-out tokens for the reconstruction metrics.", ge=1, parse=parse_tokens, panel=EVAL, resume="free")
    eval_contexts: int = setting(16, "Held-out contexts for CE loss recovered and KL.", ge=1, panel=EVAL, resume="free")


@dataclass(frozen=True)
class FeatureSettings(Settings):
    """``xsae sae features``: how much held-out text is scanned for each latent's top contexts."""

    contexts: int = setting(128, "Held-out contexts to scan.", ge=1)
    top: int = setting(8, "Top-activating contexts kept per latent.", ge=1, le=1000)


register_section("sae", SaeRunSettings, renamed={})
register_section("sae.features", FeatureSettings)
