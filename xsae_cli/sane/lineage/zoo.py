"""The lineage zoo: random-initialised tiny bases of several families (and real demo models), and
their variants under every transform type of :data:`TRANSFORMS`, written as model folders.

Real bases are transformed and fine-tuned whole (the permutation check runs the whole model), but
only ``real_layers`` evenly spaced blocks (and the input token embedding) are written out and
compared. Function-preserving variants are checked against their base's logits as they are built.
Everything is cached in the work folder: a second run reuses the members it finds.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import atomic_write_json

if TYPE_CHECKING:
    from xsae_cli.sane.evaluate import LineageSettings

# name -> ops (applied in order; "ft_short"/"ft_long" fine-tune, anything else is a transforms.apply kind)
TRANSFORMS: dict[str, tuple[str, ...]] = {
    "noise_1e-3": ("noise_1e-3",),
    "noise_1e-2": ("noise_1e-2",),
    "noise_0.3": ("noise_0.3",),
    "prune_10": ("prune_10",),
    "prune_50": ("prune_50",),
    "int8": ("int8",),
    "ft_short": ("ft_short",),
    "ft_long": ("ft_long",),
    "perm_mlp": ("perm_mlp",),
    "perm_heads": ("perm_heads",),
    "perm_resid": ("perm_resid",),
    "perm_full": ("perm_full",),
    "norm_rescale": ("norm_rescale",),
    "noise_1e-2+ft_short": ("noise_1e-2", "ft_short"),
    "prune_30+ft_short": ("prune_30", "ft_short"),
    "perm_full+ft_long": ("perm_full", "ft_long"),
    "rotate_resid": ("rotate_resid",),
    "rotate_resid+ft_long": ("rotate_resid", "ft_long"),
}
HARD = ("noise_0.3", "ft_long", "perm_full+ft_long", "rotate_resid+ft_long")
# Every combination is built in its stated order (the permutation or rotation first, then the
# fine-tune from the transformed weights). A permutation commutes with AdamW, so its fine-tune is
# the permuted fine-tune; a rotation does not (Adam's per-coordinate steps see rotated
# coordinates), which is what makes "rotation then fine-tune" the hard case.


def applies(tname: str, arch: Any) -> bool:
    """Whether a transform type exists for a base: no rotation of a post-LN model's residual stream."""
    return not (arch.post_ln and "rotate_resid" in TRANSFORMS[tname])


@dataclass
class Member:
    name: str
    path: Path
    base: str
    transform: str  # "base" for bases
    family: str


@dataclass
class BuildReport:
    members: list[Member]
    function_check: dict[str, dict[str, float]] = field(default_factory=dict)  # base -> transform -> max |logit diff| / max |logit|
    seconds: float = 0.0


# --- bases ---------------------------------------------------------------------------------


def _tiny_bert() -> Any:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, max_position_embeddings=128))


def _tiny_builders() -> dict[str, Callable[[], Any]]:
    from xsae_cli.zoo.demo import TINY

    out = {k: v[0] for k, v in TINY.items()}
    out["tiny-bert"] = _tiny_bert
    return out


HF_PREFIX = "hf:"  # a family given by its transformers model_type: hf:<model_type>
TINY_SHAPE: dict[str, tuple[tuple[str, ...], int]] = {  # what -> (config spellings, tiny value)
    "vocab": (("vocab_size",), 512),
    "hidden": (("hidden_size", "n_embd", "d_model", "dim"), 64),
    "blocks": (("num_hidden_layers", "n_layer", "n_layers", "num_layers"), 4),
    "heads": (("num_attention_heads", "n_head", "n_heads", "num_heads"), 4),
    "inner": (("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"), 192),
    "positions": (("max_position_embeddings", "n_positions"), 128),
    "rotary": (("rotary_dim",), 8),
}


def hf_builder(model_type: str) -> Callable[[], Any]:
    """A tiny random-initialised causal LM of any family transformers builds from a config: the
    family's default config with its own spellings of the widths set small (no family is named in
    the code, so the benchmark can hold out families nothing here was written for)."""

    def build() -> Any:
        from transformers import AutoConfig, AutoModelForCausalLM

        from xsae_cli.zoo.sources import quiet_transformers

        quiet_transformers()
        try:
            defaults = AutoConfig.for_model(model_type).to_dict()
        except ValueError as e:
            raise XsaeError(f"transformers has no model type '{model_type}'", "use hf:<a transformers model_type>") from e
        kw: dict[str, Any] = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "tie_word_embeddings": defaults.get("tie_word_embeddings", True)}
        for keys, value in TINY_SHAPE.values():
            key = next((k for k in keys if k in defaults), None)
            if key is not None:
                kw[key] = value
        if "num_key_value_heads" in defaults and defaults.get("num_key_value_heads") is not None:
            kw["num_key_value_heads"] = 2  # grouped-query attention where the family has it
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw))

    return build


def family_builder(name: str) -> Callable[[], Any] | None:
    """The builder of a lineage family: a test-zoo family, or ``hf:<model_type>``."""
    if name.startswith(HF_PREFIX):
        return hf_builder(name[len(HF_PREFIX) :])
    return _tiny_builders().get(name)


def _tokenizer_dir(workdir: Path) -> Path:
    from xsae_cli.core.io import atomic_dir
    from xsae_cli.zoo.demo import tiny_tokenizer

    target = workdir / "tiny-tokenizer"
    if not (target / "tokenizer.json").exists():
        tok = tiny_tokenizer()
        tok.add_special_tokens({"mask_token": "<mask>"})  # id 512: past the tiny vocab, so masked-LM maps it to 511
        with atomic_dir(target, force=True) as tmp:
            tok.save_pretrained(tmp)
    return target


def _load_trainable(folder: Path, model_type: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BertForMaskedLM

    from xsae_cli.zoo.sources import quiet_transformers

    quiet_transformers()
    if model_type == "bert":
        return BertForMaskedLM.from_pretrained(folder, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _real_folder(name: str) -> Path:
    from xsae_cli.zoo.demo import FETCH_HINT, real_model_path
    from xsae_cli.zoo.demo import REAL as DEMO_REAL
    from xsae_cli.zoo.sources import resolve

    if name not in DEMO_REAL:
        raise XsaeError(f"unknown real lineage base '{name}'", f"use some of {', '.join(DEMO_REAL)}")
    p = real_model_path(name)
    if p is None:
        raise XsaeError(f"demo model {name} is not fetched", FETCH_HINT)
    folder = resolve(str(p)).model_dir
    assert folder is not None
    return Path(folder)


def _state_names(state: dict[str, Any], prefix: str) -> list[str]:
    """Float tensors of a state dict, tied copies once, under ``prefix`` (stripped): what is written."""
    seen: set[int] = set()
    names = []
    for k, v in state.items():
        if not v.is_floating_point() or not k.startswith(prefix):
            continue
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        names.append(k[len(prefix) :])
    return names


def _keep_layers(names: list[str], n_keep: int, arch: Any) -> list[str]:
    """Whole blocks at evenly spaced depths (first and last included) and the input token
    embedding (the circuit view reads every block through it); no other embeddings or heads."""
    layers = sorted({b for n in names if (b := arch.block(n)) is not None})
    if not layers:
        return names
    picks = {layers[round(i * (len(layers) - 1) / max(n_keep - 1, 1))] for i in range(n_keep)}
    return [n for n in names if arch.block(n) in picks or arch.role(n).role == "embedding"]


def kept_layers(tm: Any) -> list[int]:
    """The block numbers a tokenised member holds (its tensor names, zoo/anatomy)."""
    from xsae_cli.zoo.anatomy import block_index

    return sorted({b for t in tm.manifest["tensors"] if (b := block_index(t["name"])) is not None})


class _Ids:
    """Token streams of the built-in corpus, one per tokenizer folder."""

    def __init__(self) -> None:
        self.cache: dict[str, Any] = {}

    def get(self, folder: Path) -> tuple[Any, int | None]:
        from transformers import AutoTokenizer

        from xsae_cli.sane.transforms import corpus_ids

        key = str(folder)
        if key not in self.cache:
            tok = AutoTokenizer.from_pretrained(folder)
            self.cache[key] = (corpus_ids(tok), tok.mask_token_id)
        return self.cache[key]


def _untied(model: Any, cfg: dict[str, Any], prefix: str, real: bool, real_layers: int, arch: Any) -> tuple[Any, Callable[..., None]]:
    """An untied copy of a tied model (its head a copy of the embedding, the same function) and the
    writer of its members (its own config and tensor list, the head included)."""
    from xsae_cli.core.io import atomic_dir, save_safetensors

    conf = model.config.__class__.from_dict({**model.config.to_dict(), "tie_word_embeddings": False})
    untied = type(model)(conf)
    state = model.state_dict()
    out_emb = untied.get_output_embeddings()
    head = next(n for n, m in untied.named_modules() if m is out_emb) + ".weight"
    state = {**state, head: model.get_input_embeddings().weight.detach().clone()}
    untied.load_state_dict(state)
    untied.eval()
    saved = _state_names(untied.state_dict(), prefix)
    if real:
        saved = _keep_layers(saved, real_layers, arch)
    ucfg = {**cfg, "tie_word_embeddings": False}

    def write(state: dict[str, Any], target: Path) -> None:
        with atomic_dir(target, force=True) as tmp:
            save_safetensors({n: state[prefix + n].contiguous().clone() for n in saved}, tmp / "model.safetensors", metadata={"format": "pt"})
            atomic_write_json(tmp / "config.json", ucfg)

    return untied, write


def build_lineage_zoo(workdir: Path, s: LineageSettings, log: Callable[[str], None] | None = None, progress: Callable[[str], None] | None = None) -> BuildReport:
    """Bases and their variants as model folders under ``workdir`` (reused when already there)."""
    import torch

    from xsae_cli.core.io import atomic_dir, save_safetensors
    from xsae_cli.sane.transforms import FUNCTION_PRESERVING, ROTATIONS, Arch, apply, finetune

    t0 = time.perf_counter()
    builders = _tiny_builders()
    unknown = [f for f in s.families if family_builder(f) is None]
    if unknown:
        raise XsaeError(f"unknown lineage families: {', '.join(unknown)}", f"use some of {', '.join(builders)}, or hf:<a transformers model_type>")
    builders.update({f: b for f in s.families if f.startswith(HF_PREFIX) and (b := family_builder(f)) is not None})
    if s.seeds < 1:
        raise XsaeError(f"--seeds {s.seeds}: no bases", "use --seeds 2 or more")
    tok_dir = _tokenizer_dir(workdir)
    ids = _Ids()
    plan: list[tuple[str, str, Path, bool]] = []  # (base name, family, folder, real)
    for fam in s.families:
        for k in range(s.seeds):
            name = f"{fam}-s{k}"
            folder = workdir / "bases" / name
            if not (folder / "config.json").exists():
                torch.manual_seed(1000 + 17 * k + 101 * list(builders).index(fam))  # hf: families after the test zoo's
                model = builders[fam]()
                with atomic_dir(folder, force=True) as tmp:
                    model.save_pretrained(tmp, safe_serialization=True)
                    for f in tok_dir.iterdir():
                        shutil.copy(f, tmp / f.name)
            plan.append((name, fam, folder, False))
    for name in s.real:
        plan.append((name, name, _real_folder(name), True))

    report = BuildReport([])
    probe = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    for bi, (bname, fam, folder, real) in enumerate(plan):
        cfg = json.loads((folder / "config.json").read_text())
        arch = Arch.from_config(cfg)
        prefix = "bert." if arch.model_type == "bert" else ""
        base_out = workdir / "members" / bname
        kinds = [t for t in TRANSFORMS if applies(t, arch)]
        todo = [t for t in kinds if not (workdir / "members" / f"{bname}~{t}" / "model.safetensors").exists()]
        if not (base_out / "model.safetensors").exists() or todo:
            torch.manual_seed(4242 + bi)  # the MLM head of a BERT base starts the same for all its fine-tunes
            model = _load_trainable(folder, arch.model_type)
            model.eval()
            full = {k: v.detach().clone() for k, v in model.state_dict().items()}
            saved = _state_names(model.state_dict(), prefix)
            if real:
                saved = _keep_layers(saved, s.real_layers, arch)
            with torch.no_grad():
                ref = model(input_ids=probe).logits
            steps_short, steps_long, lr = s.real_ft if real else s.tiny_ft
            batch, seq = (2, 64) if real else s.ft_batch
            corpus, mask_id = ids.get(folder if real else tok_dir)
            if mask_id is not None and mask_id >= cfg.get("vocab_size", 1 << 30):
                mask_id = cfg["vocab_size"] - 1

            def write(state: dict[str, Any], target: Path, saved: list[str] = saved, prefix: str = prefix, cfg: dict[str, Any] = cfg) -> None:
                with atomic_dir(target, force=True) as tmp:
                    save_safetensors({n: state[prefix + n].contiguous().clone() for n in saved}, tmp / "model.safetensors", metadata={"format": "pt"})
                    atomic_write_json(tmp / "config.json", cfg)

            if not (base_out / "model.safetensors").exists():
                write(full, base_out)
            checks: dict[str, float] = {}
            memo: dict[tuple[str, ...], dict[str, Any]] = {}  # fine-tuned states, reused by later ops
            base_model, base_write = model, write
            for ti, tname in enumerate(TRANSFORMS):
                if tname not in todo:
                    continue
                state = full
                ops = TRANSFORMS[tname]
                model, write = base_model, base_write
                if "rotate_resid" in ops and arch.tied:  # the rotation unties the head: an untied model holds it
                    model, write = _untied(base_model, cfg, prefix, real, s.real_layers, arch)
                for oi, op in enumerate(ops):
                    if ops[: oi + 1] in memo:
                        state = memo[ops[: oi + 1]]
                        continue
                    seed = 7919 * bi + 131 * ti + oi + s.seed
                    if op.startswith("ft_"):
                        model.load_state_dict(state)
                        finetune(model, corpus, steps_short if op == "ft_short" else steps_long, lr, seed, batch, seq, mlm=arch.model_type == "bert", mask_id=mask_id)
                        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                        memo[ops[: oi + 1]] = state
                    else:
                        state = apply(state, arch, op, seed)
                if tname in FUNCTION_PRESERVING or tname in ROTATIONS:
                    model.load_state_dict(state)
                    with torch.no_grad():
                        diff = (model(input_ids=probe).logits - ref).abs().max() / ref.abs().max()
                    checks[tname] = float(diff)
                write(state, workdir / "members" / f"{bname}~{tname}")
                if progress:
                    progress(f"{bname}~{tname}")
            if checks:
                report.function_check[bname] = checks
            del model, base_model, full
        report.members.append(Member(bname, base_out, bname, "base", fam))
        for tname in kinds:
            report.members.append(Member(f"{bname}~{tname}", workdir / "members" / f"{bname}~{tname}", bname, tname, fam))
        if log:
            log(f"lineage zoo: {bname} and {len(TRANSFORMS)} variants ready")
    # Members built by an earlier run were checked then: keep their figures beside this run's.
    check_file = workdir / "function_check.json"
    saved = json.loads(check_file.read_text()) if check_file.exists() else {}
    saved.update(report.function_check)
    atomic_write_json(check_file, saved)
    bases = {m.base for m in report.members}
    report.function_check = {b: c for b, c in saved.items() if b in bases}
    report.seconds = time.perf_counter() - t0
    return report
