"""Lineage benchmark pieces: function-preserving transforms (logits unchanged), the other transforms,
fine-tune/permutation commutation, retrieval metrics, quantile baseline, capped windows, lineage views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from xsae_cli.sane.lineage.baselines import (
    quantile_distance,
    quantile_features,
    quantile_matrix,
)
from xsae_cli.sane.lineage.metrics import retrieval_scores
from xsae_cli.sane.lineage.zoo import _keep_layers, _tiny_builders
from xsae_cli.sane.transforms import FUNCTION_PRESERVING, Arch, apply, finetune

PROBE = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))


def _model(name: str, seed: int = 0):
    """A tiny model of ``name``'s family with non-trivial norm weights (ones would hide norm bugs)."""
    torch.manual_seed(seed)
    if name == "tiny-bert":
        from transformers import BertConfig, BertForMaskedLM

        m = BertForMaskedLM(BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64))
    else:
        m = _tiny_builders()[name]()
    with torch.no_grad():
        for k, p in m.named_parameters():
            if "norm" in k.lower() or ".ln_" in k:
                p.add_(0.2 * torch.randn_like(p))
    return m.eval()


GROUPS = {  # which tensors each permutation may touch (by substring), per family
    "perm_mlp": ("mlp", "intermediate", "output.dense"),
    "perm_heads": ("attn", "attention", "self_attn"),
}


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gptneox", "tiny-qwen2", "tiny-mistral", "tiny-gemma", "tiny-bert"])
def test_function_preserving_transforms_leave_logits_unchanged(name: str) -> None:
    m = _model(name)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    arch = Arch.from_config(m.config)
    with torch.no_grad():
        ref = m(input_ids=PROBE).logits
    for kind in FUNCTION_PRESERVING:
        out = apply(state, arch, kind, seed=3)
        changed = [k for k in state if not torch.equal(state[k], out[k])]
        assert changed, (name, kind)
        for k, before in state.items():  # same multiset of values for a permutation, same shapes always
            assert out[k].shape == before.shape
            if kind.startswith("perm_"):
                assert torch.equal(out[k].reshape(-1).sort().values, before.reshape(-1).sort().values), (name, kind, k)
        if kind in GROUPS:
            assert all(any(g in k for g in GROUPS[kind]) for k in changed), (name, kind, changed)
        if kind in ("perm_resid", "perm_full"):
            emb = next(k for k in state if "wte" in k or "embed_tokens" in k or "embed_in" in k or "word_embeddings" in k)
            assert emb in changed and len(changed) > len(state) // 2, (name, kind)
        m.load_state_dict(out)
        with torch.no_grad():
            got = m(input_ids=PROBE).logits
        assert torch.allclose(got, ref, atol=1e-5 * float(ref.abs().max()), rtol=0), (name, kind, float((got - ref).abs().max()))
        m.load_state_dict(state)


def test_bert_residual_permutation_permutes_hidden_states_and_keeps_the_pooler() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    m = BertModel(BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)).eval()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        ref = m(input_ids=PROBE)
        out = apply(state, Arch.from_config(m.config), "perm_resid", seed=5)
        m.load_state_dict(out)
        got = m(input_ids=PROBE)
    perm = torch.tensor(
        [
            int(  # recovered from a word-embedding row (its values are distinct)
                torch.nonzero(state["embeddings.word_embeddings.weight"][7] == v)[0]
            )
            for v in out["embeddings.word_embeddings.weight"][7]
        ]
    )
    assert torch.allclose(got.last_hidden_state, ref.last_hidden_state[..., perm], atol=1e-5)
    assert torch.allclose(got.pooler_output, ref.pooler_output, atol=1e-5)


def test_noise_pruning_and_int8() -> None:
    w = {"a.weight": torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), "a.bias": torch.randn(64)}
    arch = Arch("llama", 1, 64, 4, 4, 16, False)
    pruned = apply(w, arch, "prune_50", 0)
    assert abs((pruned["a.weight"] == 0).float().mean().item() - 0.5) < 0.01 and torch.equal(pruned["a.bias"], w["a.bias"])
    kept = pruned["a.weight"] != 0
    assert pruned["a.weight"][kept].abs().min() >= w["a.weight"][~kept].abs().max()  # the smallest magnitudes go
    for rel in ("1e-3", "1e-2", "0.3"):
        noisy = apply(w, arch, f"noise_{rel}", 0)["a.weight"]
        ratio = ((noisy - w["a.weight"]).std() / w["a.weight"].std()).item()
        assert abs(ratio / float(rel) - 1) < 0.05, (rel, ratio)
    q = apply(w, arch, "int8", 0)["a.weight"]
    assert len(torch.unique(q)) <= 255 and (q - w["a.weight"]).abs().max() <= w["a.weight"].abs().max() / 127 / 2 + 1e-6
    assert apply(w, arch, "int8", 0)["a.weight"].data_ptr() != w["a.weight"].data_ptr()


def test_finetune_commutes_with_a_full_permutation() -> None:
    """Why perm_full+ft_long may be computed as the permuted ft_long: same result up to rounding."""
    m = _model("tiny-qwen2")
    arch = Arch.from_config(m.config)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    ids = torch.randint(0, 512, (4000,), generator=torch.Generator().manual_seed(1))
    m.load_state_dict(apply(state, arch, "perm_full", 9))
    finetune(m, ids, 5, 1e-3, seed=2, batch_size=2, seq_len=16)
    perm_then_ft = {k: v.clone() for k, v in m.state_dict().items()}
    m.load_state_dict(state)
    finetune(m, ids, 5, 1e-3, seed=2, batch_size=2, seq_len=16)
    ft_then_perm = apply({k: v.clone() for k, v in m.state_dict().items()}, arch, "perm_full", 9)
    moved = max(float((ft_then_perm[k] - apply(state, arch, "perm_full", 9)[k]).abs().max()) for k in state)
    assert moved > 1e-3  # the fine-tune did change the weights
    for k in state:
        assert torch.allclose(perm_then_ft[k], ft_then_perm[k], atol=1e-5), k


def test_retrieval_scores_on_a_known_distance_matrix() -> None:
    names = ["A", "B", "A~x", "B~x"]
    base_of = {"A": "A", "B": "B", "A~x": "A", "B~x": "B"}
    tr = {"A": "base", "B": "base", "A~x": "x", "B~x": "x"}
    d = np.array(
        [
            [0, 5, 1, 2],
            [5, 0, 3, 4],
            [1, 3, 0, 6],
            [2, 4, 6, 0],
        ],
        dtype=float,
    )
    r = retrieval_scores(names, base_of, tr, d, ["x"])
    # A~x: nearest base A (1 < 3): hit. B~x: A at 2 < B at 4: miss, rank 2.
    # separation: A~x 3 / 1, B~x 2 / 4 -> median 1.75
    assert r["per_type"]["x"] == {"top1": 0.5, "mrr": 0.75, "auroc": 0.5, "separation": 1.75, "n": 2}
    # pairs: same-lineage (A,A~x)=1, (B,B~x)=4; others 5,2,3,6 -> P(neg > pos) = (4 + 2) / 8
    assert r["auroc"] == pytest.approx(6 / 8)
    assert 0 < r["map"] < 1


def test_quantile_matrix_matches_pairwise_distance() -> None:
    g = torch.Generator().manual_seed(0)
    feats = [quantile_features([("w", torch.randn(32, 32, generator=g) * (1 + i / 10)), ("b", torch.randn(32, generator=g))]) for i in range(3)]
    feats.append(quantile_features([("other", torch.randn(32, generator=g))]))
    mat = quantile_matrix(feats)
    for i in range(4):
        for j in range(4):
            assert mat[i, j] == pytest.approx(quantile_distance(feats[i], feats[j])), (i, j)
    assert mat[0, 3] == np.inf and mat[1, 1] == 0


def test_keep_layers_picks_evenly_spaced_whole_blocks() -> None:
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.mlp.up_proj.weight" for i in range(30)] + [f"model.layers.{i}.input_layernorm.weight" for i in range(30)] + ["model.norm.weight"]
    kept = _keep_layers(names, 3, Arch("llama", 30, 64, 4, 4, 16, False))
    assert kept[0] == "model.embed_tokens.weight" and "model.norm.weight" not in kept
    assert sorted({int(n.split(".")[2]) for n in kept[1:]}) == [0, 14, 29] and len(kept) == 7


def test_capped_windows_are_evenly_spaced_and_shared_by_a_layout(tiny_models) -> None:
    from xsae_cli.sane.embed import embed_tokenized, window_starts
    from xsae_cli.sane.model import SaneAutoencoder, SaneModelConfig

    tm = tiny_models[0]
    full = window_starts(tm, 128)
    assert full == tm.cover_starts(128) and window_starts(tm, 128, max_windows=len(full)) == full
    capped = window_starts(tm, 128, max_windows=5)
    assert len(capped) == 5 and capped[0] == 0 and capped[-1] == tm.n_chunks - 128 and capped == sorted(capped)
    torch.manual_seed(0)
    model = SaneAutoencoder(SaneModelConfig(d_model=32, n_heads=4, enc_layers=1, dec_layers=1, latent_dim=8)).eval()
    v, n = embed_tokenized(model, tm, 128, max_windows=5)
    assert n == 5 and v.shape == (512,)  # the sketch: latent_dim 8 x 64 features
    assert not np.allclose(v, embed_tokenized(model, tm, 128)[0])


def test_lineage_views_take_the_same_range_of_a_partner(tiny_models) -> None:
    from xsae_cli.sane.settings import SaneTrainSettings as TrainSettings
    from xsae_cli.sane.train import lineage_partners, make_views

    models = [tiny_models[0], tiny_models[0], tiny_models[1]]  # two copies of one layout, one other layout
    partners = lineage_partners(models, [0, 0, 0])
    assert partners == [[1], [0], []]
    s = TrainSettings(lineage_views=1.0, noise=0.0, mask_prob=0.0)
    win = models[0].window(100, 64)
    views = make_views([(0, win)], models, np.random.default_rng(0), s, partners)
    assert len(views) == 2
    # identical copies: the partner's range holds the same chunks (up to the view's permutations)
    assert np.allclose(np.sort(views[1][2], axis=None), np.sort(win["values"], axis=None))
    with pytest.raises(ValueError):
        lineage_partners(models, [0, 0])


@pytest.mark.slow
def test_real_models_permutations_leave_logits_unchanged(demo_zoo: Path) -> None:
    from transformers import AutoModelForCausalLM, BertForMaskedLM

    from xsae_cli.sane.lineage.zoo import _real_folder

    for name, cls in (("smollm2-135m", AutoModelForCausalLM), ("minilm-l6", BertForMaskedLM)):
        torch.manual_seed(0)
        m = cls.from_pretrained(_real_folder(name), dtype=torch.float32).eval()
        state = {k: v.clone() for k, v in m.state_dict().items()}
        arch = Arch.from_config(m.config)
        with torch.no_grad():
            ref = m(input_ids=PROBE).logits
            for kind in ("perm_full", "norm_rescale"):
                m.load_state_dict(apply(state, arch, kind, seed=1))
                got = m(input_ids=PROBE).logits
                assert (got - ref).abs().max() / ref.abs().max() < 1e-4, (name, kind)


def test_hard_goal_ranks_by_separation_when_top1_ties() -> None:
    from xsae_cli.sane.lineage.metrics import goals

    def row(top1: tuple[float, float, float], sep: tuple[float, float, float]) -> dict:
        keys = ("sane", "quantile_baseline", "random_encoder_baseline")
        return {"hard": True, **{k: {"top1": t, "separation": s} for k, t, s in zip(keys, top1, sep)}}

    g = goals({"ft_long": row((1.0, 0.55, 1.0), (2.5, 1.0, 1.41)), "noise_0.3": row((1.0, 1.0, 1.0), (8.7, 1.18, 5.64))})
    assert g["hard_strictly_above_both"]["met"]
    g = goals({"ft_long": row((1.0, 0.55, 1.0), (1.36, 1.0, 1.41))})  # tied top-1, smaller margin than the random encoder
    assert not g["hard_strictly_above_both"]["met"] and g["hard_strictly_above_both"]["failing"] == ["ft_long"]
    g = goals({"ft_long": row((0.9, 0.55, 1.0), (9.0, 1.0, 1.41))})  # a larger margin cannot make up for a lower top-1
    assert not g["hard_strictly_above_both"]["met"]


def _auc_by_hand(pos: np.ndarray, neg: np.ndarray) -> float:
    """The hand-written AUROC the lineage scores used before scikit-learn (kept here as the reference)."""
    pos = np.asarray(pos, dtype=np.float64)[:, None]
    neg = np.asarray(neg, dtype=np.float64)[None, :]
    return float(((neg > pos).sum() + 0.5 * (neg == pos).sum()) / (pos.size * neg.size))


def _ap_by_hand(dist: np.ndarray, rel: np.ndarray) -> float:
    """The hand-written average precision (ties broken pessimistically) scikit-learn replaced."""
    order = np.lexsort((rel.astype(int), dist))
    r = rel[order]
    hits = np.cumsum(r)
    return float((hits[r] / (np.nonzero(r)[0] + 1)).mean())


def test_sklearn_metrics_agree_with_the_hand_written_ones() -> None:
    from xsae_cli.sane.lineage.metrics import auroc, average_precision

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 40))
        d = rng.random(n)
        if trial % 3 == 0:
            d = np.round(d, 1)  # ties, within and across classes (AUROC counts them half either way)
        if trial % 4 == 0:
            d[rng.random(n) < 0.3] = np.inf  # the quantile baseline: no shared tensor
        rel = rng.random(n) < 0.3
        if rel.any() and (~rel).any():
            assert auroc(d[rel], d[~rel]) == pytest.approx(_auc_by_hand(d[rel], d[~rel]), abs=1e-12), trial
        if rel.any():
            assert average_precision(d, rel) == pytest.approx(_ap_by_hand(d, rel), abs=1e-12), trial
    # ties are broken against the method: a relevant and an irrelevant item at one distance rank the
    # irrelevant first, and a tied run of relevant items after a miss gains precision one by one
    d, rel = np.array([0.0, 0.0, 0.0, 1.0]), np.array([True, True, False, True])
    assert average_precision(d, rel) == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3)
    d, rel = np.array([0.0, 1.0, 1.0]), np.array([False, True, True])
    assert average_precision(d, rel) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert np.isnan(auroc(np.array([]), np.array([1.0]))) and np.isnan(average_precision(d, np.zeros(3, dtype=bool)))


@pytest.mark.slow
def test_lineage_zoo_builds_rotations_then_finetunes_in_order(tmp_path: Path) -> None:
    """rotate_resid keeps the logits of a tied base (through an untied copy, whose members carry
    their own head and an untied config), and every variant type is built."""
    import json

    from safetensors.torch import load_file

    from xsae_cli.sane.lineage.zoo import TRANSFORMS, build_lineage_zoo
    from xsae_cli.sane.settings import LineageSettings

    s = LineageSettings(families=("tiny-gpt2",), seeds=2, real=(), tiny_ft=(1, 2, 1e-3), ft_batch=(2, 16))
    rep = build_lineage_zoo(tmp_path, s)
    assert {m.transform for m in rep.members} == {"base", *TRANSFORMS}
    for b, checks in rep.function_check.items():
        assert checks["rotate_resid"] < 1e-4 and checks["perm_full"] < 1e-4, (b, checks)
    rot = tmp_path / "members" / "tiny-gpt2-s0~rotate_resid+ft_long"
    assert json.loads((rot / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(rot / "model.safetensors")


def test_hf_families_build_tiny_models_that_no_code_names() -> None:
    """hf:<model_type> builds the family's default config at tiny widths; its anatomy is derived."""
    from xsae_cli.sane.lineage.zoo import family_builder
    from xsae_cli.zoo.anatomy import Anatomy, family_rules

    m = family_builder("hf:gptj")()
    assert m.config.n_embd == 64 and m.config.n_layer == 4 and family_rules(m.config.model_type) is None
    assert Anatomy.from_config(m.config.to_dict()).n_heads == 4
    assert family_builder("nope") is None


def test_holdout_families_must_be_built(tmp_path: Path) -> None:
    from xsae_cli.core.errors import XsaeError
    from xsae_cli.sane.evaluate import evaluate
    from xsae_cli.sane.settings import LineageSettings

    with pytest.raises(XsaeError, match="not among --families"):
        evaluate(tmp_path, LineageSettings(families=("tiny-gpt2",), holdout_families=("hf:phi",), real=()))


def test_raw_cosine_baseline_is_fooled_by_a_permutation_and_not_by_noise() -> None:
    from xsae_cli.sane.lineage.baselines import raw_cosine_matrix, raw_features
    from xsae_cli.sane.transforms import elementwise

    m = _model("tiny-qwen2")
    arch = Arch.from_config(m.config)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    variants = [state, elementwise(state, "noise_1e-2", 1), apply(state, arch, "perm_full", 2), _model("tiny-qwen2", seed=1).state_dict()]
    d = raw_cosine_matrix([raw_features(v.items()) for v in variants])
    assert d[0, 0] < 1e-9 and d[0, 1] < 1e-3 and d[0, 2] > 0.1 and d[0, 3] > 0.1, d[0]
