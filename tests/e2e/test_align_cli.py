"""`xsae align` end to end: pair, transfer (tiny and real models), report, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_user_error
from tests.conftest import run_xsae as _run


def run_xsae(*args: str):
    # One OpenMP thread: on a shared 2-core machine two threads wait on each other whenever another
    # job holds a core (10x slower fits); results do not depend on it.
    return _run(*args, env={"OMP_NUM_THREADS": "1"})


SMALL = [
    "--limit",
    "8",
    "--context-size",
    "64",
    "--train-pairs",
    "3000",
    "--test-pairs",
    "1500",
    "--k",
    "8",
    "--expansion",
    "2",
    "--sae-tokens",
    "6k",
    "--hypernet-epochs",
    "2",
    "--hypernet-hidden",
    "32",
    "--intervene-latents",
    "1",
    "--intervene-contexts",
    "2",
]


def test_transfer_then_report_tiny_gpt2_to_minilm(demo_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "align"
    # the MLP mapper under its 0.1 name: still accepted, with a note, and reported as mlp
    proc = run_xsae("--json", "align", "transfer", "--a", "tiny-gpt2", "--b", "minilm-l6", "--layers", "1", "--out", str(out), "--mappers", "procrustes,ridge,hypernet", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "now called 'mlp'" in proc.stderr
    report = json.loads(proc.stdout)
    assert report == json.loads((out / "report.json").read_text())
    assert report["layer_pairs"] == [[1, 2]]  # 2 of 4 blocks of tiny-gpt2 ~ 3 of 6 blocks of MiniLM
    assert (report["results"][0]["hook_a"], report["results"][0]["hook_b"]) == ("transformer.h.1", "encoder.layer.2")
    p = report["pairing"]
    assert 0 < p["kept_a"] <= 1 and 0 < p["kept_b"] <= 1 and p["pairs"] > 0
    assert set(p["splits"]) == {"train", "val", "test"}
    res = report["results"][0]
    for direction in ("a->b", "b->a"):
        rows = res["directions"][direction]
        assert {(r["space"], r["mapper"]) for r in rows} == {(s, m) for s in ("acts", "codes") for m in ("procrustes", "ridge", "mlp")}
        for r in rows:  # every row carries its mean predictor, shuffled null, 2nd-SAE reference and upper bound from this run
            for ref in ("test", "mean", "null", "sae_ref", "upper"):
                assert r[ref]["r2"] is not None and "f1" in r[ref], (direction, r["space"], r["mapper"], ref)
            assert abs(r["mean"]["r2"]) < 0.05 and r["mean"]["cosine"] == 0.0
    iv = res["interventions"]
    assert iv["a->b"]["kl"] is None and "embedding lens" in iv["a->b"]["readout_target"]  # MiniLM has no LM head
    assert iv["b->a"]["kl"] is not None and iv["b->a"]["kl_random"] is not None
    assert report["config"]["a"] == "tiny-gpt2" and report["versions"]["torch"] and report["memory"]["peak_rss_bytes"] > 0
    assert report["harvest"]["minilm-l6"]["tokens_per_second"] > 0
    assert (out / "saes" / "a" / "seed1" / "transformer.h.1" / "cfg.json").exists()

    shown = run_xsae("align", "report", str(out))
    assert shown.returncode == 0, shown.stderr
    assert "layer pairs 1:2 (transformer.h.1 <-> encoder.layer.2)" in shown.stdout
    assert "held-out mapping tiny-gpt2 -> minilm-l6" in shown.stdout and "mean/null/sae/upper" in shown.stdout and "tok/s" in shown.stdout
    as_json = run_xsae("--json", "align", "report", str(out / "report.json"))
    assert json.loads(as_json.stdout) == report
    assert_user_error(run_xsae("align", "transfer", "--a", "tiny-gpt2", "--b", "minilm-l6", "--layers", "1", "--out", str(out), *SMALL), "already holds an alignment report", "--force")


def test_pair_shows_fractions(demo_zoo: Path) -> None:
    proc = run_xsae("--json", "align", "pair", "--a", "smollm2-135m", "--b", "minilm-l6", "--limit", "12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout)
    assert stats["documents"] == 12 and 0.7 < stats["kept_a"] < 1 and 0.6 < stats["kept_b"] < 1
    assert stats["pairs"] == sum(s["pairs"] for s in stats["splits"].values())


def test_bad_input_is_one_line(demo_zoo: Path, tmp_path: Path) -> None:
    assert_user_error(
        run_xsae("align", "transfer", "--a", "smollm2-135m", "--b", "minilm-l6", "--layers", "31", "--out", str(tmp_path / "x")),
        "layer 31 is out of range for smollm2-135m (30 blocks)",
        "0..29",
    )
    corpus = tmp_path / "short.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i} is short." for i in range(6)))
    assert_user_error(
        run_xsae("align", "transfer", "--a", "tiny-gpt2", "--b", "minilm-l6", "--layers", "1", "--corpus", str(corpus), "--out", str(tmp_path / "y")),
        "too few paired tokens",
        "need at least 768 train",
    )
    from xsae_cli.sae.formats import save_sae
    from xsae_cli.sae.models import SaeConfig, create_sae

    save_sae(create_sae(SaeConfig(arch="topk", d_in=32, d_sae=64, k=4, metadata={"hook_name": "transformer.h.1"})), tmp_path / "sae" / "transformer.h.1")
    assert_user_error(
        run_xsae("align", "transfer", "--a", "tiny-gpt2", "--b", "minilm-l6", "--layers", "1", "--sae-a", str(tmp_path / "sae"), "--out", str(tmp_path / "z"), *SMALL),
        "d_in=32",
        "width 64",
    )
    assert_user_error(
        run_xsae("align", "transfer", "--a", "tiny-gpt2", "--b", "minilm-l6", "--layers", "1", "--mappers", "ridge,hypernett", "--out", str(tmp_path / "m")),
        "'hypernett' is not one of procrustes, ridge, mlp",
        "did you mean 'hypernet'",
    )
    (tmp_path / "junk").mkdir()
    assert_user_error(run_xsae("align", "report", str(tmp_path / "junk")), "alignment report not found")


@pytest.mark.slow
def test_transfer_real_models(demo_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "real"
    proc = run_xsae(
        "--json",
        "align",
        "transfer",
        "--a",
        "smollm2-135m",
        "--b",
        "minilm-l6",
        "--layers",
        "5",
        "--out",
        str(out),
        "--limit",
        "40",
        "--train-pairs",
        "6000",
        "--test-pairs",
        "3000",
        "--sae-tokens",
        "30k",
        "--k",
        "16",
        "--expansion",
        "2",
        "--hypernet-epochs",
        "4",
        "--intervene-latents",
        "2",
        "--intervene-contexts",
        "2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    res = report["results"][0]
    assert report["layer_pairs"] == [[5, 0]]
    for direction in ("a->b", "b->a"):
        ridge = next(r for r in res["directions"][direction] if r["space"] == "acts" and r["mapper"] == "ridge")
        assert ridge["test"]["r2"] > ridge["null"]["r2"] + 0.1  # real pairs carry signal the shuffled ones lack
        assert abs(ridge["null"]["r2"]) < 0.05
    assert res["interventions"]["b->a"]["kl"] > 0  # SmolLM2 has an LM head
    assert res["similarity"]["cka_acts"]["test"] > res["similarity"]["cka_acts"]["null"]


CC_SMALL = ["--limit", "8", "--context-size", "64", "--train-pairs", "3000", "--test-pairs", "1500", "--k", "8", "--expansion", "2", "--steps", "200"]


def test_crosscoder_bad_input_is_one_line(demo_zoo: Path, tmp_path: Path) -> None:
    assert_user_error(
        run_xsae("align", "crosscoder", "--models", "tiny-gpt2,minilm-l6,tiny-qwen2", "--layers", "1", "--out", str(tmp_path / "x")),
        "names 3 models, but the pairing aligns the positions of two tokenizers",
        "--models a,b",
    )
    assert_user_error(run_xsae("align", "crosscoder", "--models", "tiny-gpt2", "--layers", "1", "--out", str(tmp_path / "x")), "needs two models", "--models a,b")
    assert_user_error(
        run_xsae("align", "crosscoder", "--models", "tiny-gpt2,minilm-l6", "--layers", "1", "--min-kept", "0.99", "--out", str(tmp_path / "y"), *CC_SMALL),
        "share too few positions",
        "below the floor of 99%",
    )


@pytest.mark.slow
def test_crosscoder_tiny_gpt2_and_minilm(demo_zoo: Path, tmp_path: Path) -> None:
    from xsae_cli.align.crosscoder import load

    out = tmp_path / "cc"
    proc = run_xsae("--json", "align", "crosscoder", "--models", "tiny-gpt2,minilm-l6", "--layers", "1", "--out", str(out), *CC_SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    r = report["results"][0]
    for ref in ("test", "null"):
        assert set(r[ref]["r2_joint"]) == {"tiny-gpt2", "minilm-l6"} and "tiny-gpt2->minilm-l6" in r[ref]["r2_from_one"]
    assert r["test"]["r2_joint"]["tiny-gpt2"] > r["null"]["r2_joint"]["tiny-gpt2"]  # real pairs beat shuffled ones
    assert r["ridge"]["a->b"]["ridge_upper"] >= r["ridge"]["a->b"]["ridge"] - 1e-6
    cc = load(out / "crosscoders" / "1_2")
    assert cc.cfg.widths == [report["widths"]["tiny-gpt2"], report["widths"]["minilm-l6"]]
    assert len(r["per_latent"]["relative_norm"][0]) == cc.cfg.d_sae
    assert_user_error(run_xsae("align", "crosscoder", "--models", "tiny-gpt2,minilm-l6", "--layers", "1", "--out", str(out), *CC_SMALL), "already holds a crosscoder report", "--force")


def test_diff_refuses_different_tokenizers(demo_zoo: Path, tmp_path: Path) -> None:
    assert_user_error(
        run_xsae("align", "diff", "--base", "tiny-gpt2", "--finetuned", "minilm-l6", "--layers", "1", "--out", str(tmp_path / "d")),
        "use different tokenizers",
        "xsae align crosscoder --models tiny-gpt2,minilm-l6",
    )


def _planted_copy(src: Path, dst: Path, amplitude: float = 0.01):  # type: ignore[no-untyped-def]
    """tiny-gpt2 with one block-0 MLP neuron replaced: it fires on the top fifth of tokens along a direction u and writes v."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(src), AutoModelForCausalLM.from_pretrained(src)
    mlp = model.transformer.h[0].mlp
    g = torch.Generator().manual_seed(3)
    u, v = (w / w.norm() for w in torch.randn(2, mlp.c_fc.weight.shape[0], generator=g))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        proj = emb @ u
        scale = 3.0 / float(proj.std())
        mlp.c_fc.weight[:, 0] = u * scale
        mlp.c_fc.bias[0] = -float(proj.quantile(0.8)) * scale
        mlp.c_proj.weight[0, :] = v * float(emb.norm(dim=1).mean()) * amplitude
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return v


@pytest.mark.slow
def test_diff_recovers_a_planted_feature(demo_zoo: Path, tmp_path: Path) -> None:
    import torch

    from xsae_cli.align.crosscoder import load
    from xsae_cli.zoo.registry import resolve_entry

    src = resolve_entry("tiny-gpt2").model_dir
    v = _planted_copy(src, tmp_path / "planted")
    out = tmp_path / "diff"
    proc = run_xsae(
        "--json",
        "align",
        "diff",
        "--base",
        "tiny-gpt2",
        "--finetuned",
        str(tmp_path / "planted"),
        "--layers",
        "0",
        "--out",
        str(out),
        "--limit",
        "8",
        "--context-size",
        "64",
        "--train-pairs",
        "3000",
        "--test-pairs",
        "1500",
        "--k",
        "8",
        "--expansion",
        "2",
        "--steps",
        "1500",
        "--lr",
        "3e-3",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)["results"][0]
    ranked = r["exclusive_latents"][str(tmp_path / "planted")]
    assert ranked[0]["relative_norm"] > 0.8 and ranked[1]["relative_norm"] < 0.6  # one latent stands out as the fine-tune's own
    cc = load(out / "crosscoders" / "0_0")
    assert float(torch.nn.functional.cosine_similarity(cc.W_dec[1][ranked[0]["latent"]].detach(), v, dim=0)) > 0.95  # and it is the planted direction
    assert r["latents"]["shared_fraction"] > 0.9 and ranked[0]["contexts"]
