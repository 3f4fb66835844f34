"""``[align]``, ``[align.sae]`` and ``[align.mlp]``: the alignment protocol, its SAEs, its MLP mapper.

The SAEs align trains are :class:`~xsae_cli.sae.settings.SaeTrainSettings` with align's defaults
(narrower and shorter than ``xsae sae train``'s: two per model and layer are trained in one run).
Import-light (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

from xsae_cli.core.settings import Settings, register_section, setting
from xsae_cli.sae.settings import SaeTrainSettings

PAIRING, MAPPING, INTERVENE = "Pairing", "Mapping", "Interventions"


def mapper_names() -> list[str]:
    """The registered mappers (``align/mappers/``, one file each) and their accepted old names."""
    from xsae_cli.align.mappers import ALIASES, mapper_names

    return mapper_names() + list(ALIASES)


@dataclass(frozen=True)
class AlignSettings(Settings):
    """`xsae align`: which layers, how much text, which mappers, how hard to intervene."""

    layers: list[str] = setting(["5", "6", "7"], "Blocks of A (B at the same relative depth), or a:b pairs; e.g. 5,6,7 or 5:1,15:3.", panel=PAIRING)
    corpus: str = setting("builtin", "builtin, a .txt/.jsonl/.parquet file, or a datasets folder.", panel=PAIRING)
    text_field: str = setting("text", "The text column of a .jsonl/.parquet/datasets corpus.", panel=PAIRING)
    limit: int | None = setting(None, "Documents read from the corpus (default: all).", ge=1, panel=PAIRING)
    context_size: int = setting(128, "Tokens per window, begin/end tokens included.", ge=4, le=65536, panel=PAIRING)
    val_fraction: float = setting(0.1, "Fraction of the documents for validation (penalties, early stopping).", gt=0, lt=1, panel=PAIRING)
    test_fraction: float = setting(0.2, "Fraction of the documents for the held-out scores.", gt=0, lt=1, panel=PAIRING)
    max_train_pairs: int = setting(30000, "Paired train rows the mappers fit on (subsampled within the train documents).", ge=16, flag="--train-pairs", panel=MAPPING)
    max_test_pairs: int = setting(20000, "Paired test rows scored.", ge=16, flag="--test-pairs", panel=MAPPING)
    mappers: list[str] = setting(["procrustes", "ridge", "mlp"], "Registered mappers fit both ways ('hypernet' is the old name of mlp).", choices=mapper_names, panel=MAPPING)
    match_threshold: float = setting(0.5, "Correlation above which two latents count as a direct match.", gt=0, le=1, panel=MAPPING)
    intervene_latents: int = setting(4, "Latents pushed through the other model per layer and direction (0: none).", ge=0, panel=INTERVENE)
    intervene_contexts: int = setting(8, "Held-out windows the interventions run on.", ge=1, panel=INTERVENE)
    intervene_mapper: str = setting("ridge", "Mapper whose map carries the interventions.", choices=mapper_names, panel=INTERVENE)
    strength: float = setting(0.5, "Pushed vector norm, as a multiple of the layer's median token norm.", gt=0, panel=INTERVENE)
    top_tokens: int = setting(10, "Tokens compared per intervention.", ge=1, panel=INTERVENE)
    batch_contexts: int = setting(8, "Windows per forward pass of a model.", ge=1, panel=PAIRING)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.val_fraction + self.test_fraction >= 1:
            from xsae_cli.core.settings import InvalidSetting

            raise InvalidSetting("test_fraction", self.test_fraction, f"plus val_fraction {self.val_fraction} must leave documents to train on (sum < 1)", "0.2")


@dataclass(frozen=True)
class MlpMapperSettings(Settings):
    """The MLP mapper (3 layers; called `hypernet` before): width, regularisation, early stopping, loss weights."""

    hidden: int = setting(256, "Hidden width of the MLP mapper.", ge=1, flag="--mlp-hidden", panel="MLP mapper", aliases=("--hypernet-hidden",))
    dropout: float = setting(0.1, "Dropout of the MLP mapper.", ge=0, lt=1, flag="--mlp-dropout", panel="MLP mapper")
    lr: float = setting(1e-3, "Learning rate of the MLP mapper.", gt=0, flag="--mlp-lr", panel="MLP mapper")
    weight_decay: float = setting(1e-4, "Weight decay of the MLP mapper.", ge=0, flag="--mlp-weight-decay", panel="MLP mapper")
    batch_size: int = setting(512, "Rows per step of the MLP mapper.", ge=1, flag="--mlp-batch-size", panel="MLP mapper")
    max_epochs: int = setting(20, "Most epochs of the MLP mapper (early stopping on val).", ge=1, flag="--mlp-epochs", aliases=("--hypernet-epochs",))
    patience: int = setting(3, "Epochs without a val improvement before the MLP mapper stops.", ge=1, flag="--mlp-patience", panel="MLP mapper")
    w_mse: float = setting(1.0, "Loss weight: mean squared error.", ge=0, cli=False)
    w_cosine: float = setting(0.5, "Loss weight: cosine.", ge=0, cli=False)
    w_correlation: float = setting(0.5, "Loss weight: per-dimension correlation.", ge=0, cli=False)
    w_sparsity: float = setting(0.1, "Loss weight: sparsity of predicted codes.", ge=0, cli=False)
    seed: int = setting(0, "Random seed (from [hardware] seed).", cli=False)


_MOVED = {"arch": "align.sae.arch", "k": "align.sae.k", "expansion": "align.sae.expansion", "sae_tokens": "align.sae.tokens", "sae_batch_size": "align.sae.batch_size"}
_MOVED.update({f"hypernet_{k}": f"align.mlp.{v}" for k, v in {"hidden": "hidden", "epochs": "max_epochs", "patience": "patience", "dropout": "dropout", "lr": "lr"}.items()})
register_section("align", AlignSettings, renamed=_MOVED)
# Checkpoints and the dead-latent horizon follow the (short) token budget: align sets them itself.
register_section(
    "align.sae",
    SaeTrainSettings,
    fixed=("checkpoint_every", "keep_checkpoints", "dead_tokens_threshold"),
    k=32,
    expansion=4,
    tokens=200_000,
    batch_size=2048,
    help="The SAEs align trains (two per model and layer).",
)
register_section("align.mlp", MlpMapperSettings, fixed=("seed",))


CROSS = "Crosscoder"


@dataclass(frozen=True)
class CrosscoderSettings(Settings):
    """`xsae align crosscoder`: one dictionary over two models' paired positions (see align/crosscoder.py)."""

    expansion: int = setting(4, "d_sae = expansion x the wider model's width.", ge=1, panel=CROSS)
    k: int = setting(16, "Active latents per token (topk; batchtopk: on average).", ge=1, panel=CROSS)
    sparsity: str = setting("topk", "topk, batchtopk or l1 (ReLU + L1 weighted by the summed decoder norms).", choices=["topk", "batchtopk", "l1"], panel=CROSS)
    objective: str = setting(
        "crosscoder", "crosscoder (code read from all models) or universal (from each model alone; loss includes cross-reconstruction).", choices=["crosscoder", "universal"], panel=CROSS
    )
    l1_coefficient: float = setting(1e-3, "l1: weight of the decoder-norm-weighted L1 penalty.", ge=0, panel=CROSS)
    steps: int = setting(2000, "Training steps.", ge=1, panel=CROSS)
    batch_size: int = setting(512, "Paired rows per step.", ge=1, panel=CROSS)
    lr: float = setting(1e-3, "Adam learning rate.", gt=0, panel=CROSS)
    min_kept: float = setting(0.3, "Refuse when either tokenizer keeps less than this fraction of its tokens as paired positions.", ge=0, le=1, panel=CROSS)


register_section("align.crosscoder", CrosscoderSettings)
