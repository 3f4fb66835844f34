"""`xsae sae` end to end: train on real and tiny models, eval, export, resume after kill -9, bad input."""

import json
import signal
from pathlib import Path

import torch

from tests.conftest import assert_user_error, run_xsae

TINY = ["sae", "train", "--model", "tiny-gpt2", "--hook", "transformer.h.2", "--arch", "topk", "--k", "8", "--expansion", "4", "--batch-size", "512", "--context-size", "64"]


def test_train_eval_export_on_tiny_gpt2(demo_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_xsae("--json", "--seed", "0", *TINY, "--tokens", "8k", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout)
    hook = metrics["hooks"]["transformer.h.2"]
    assert 0 < hook["fvu"] < 1 and hook["l0"] <= 8.0 + 1e-6
    assert hook["downstream"]["ce_clean"] > 0 and "ce_loss_recovered" in hook["downstream"]
    assert metrics["training"]["tokens"] >= 8000
    cfg = json.loads((out / "transformer.h.2" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 64 and cfg["d_sae"] == 256 and cfg["k"] == 8
    assert cfg["metadata"]["model_name"] == "tiny-gpt2" and cfg["metadata"]["hook_name"] == "transformer.h.2"

    # A finished run is never overwritten without --force.
    assert_user_error(run_xsae(*TINY, "--tokens", "16k", "--out", str(out)), "already holds a finished run", "--force")

    ev = run_xsae("--json", "sae", "eval", str(out))
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert abs(json.loads(ev.stdout)["hooks"]["transformer.h.2"]["fvu"] - hook["fvu"]) < 1e-4

    feat = run_xsae("--json", "sae", "features", str(out), "--contexts", "16", "--top", "4")
    assert feat.returncode == 0, feat.stderr[-2000:]
    summary = json.loads((out / "transformer.h.2" / "features.json").read_text())
    assert len(summary["latents"]) == 256 and summary["n_tokens"] > 0
    busiest = max(summary["latents"], key=lambda lat: lat["frequency"])
    top = busiest["top_contexts"][0]
    assert abs(top["acts"][top["max_index"]] - top["max_act"]) < 1e-3  # the window is centred on the recorded maximum
    assert top["max_act"] == max(c["max_act"] for c in busiest["top_contexts"])
    assert sum(busiest["histogram"]["counts"]) == round(busiest["frequency"] * summary["n_tokens"])
    assert len(busiest["logit_lens"]["promoted"]) == 8

    exp = run_xsae("sae", "export", str(out / "transformer.h.2"), str(tmp_path / "sp"), "--format", "sparsify")
    assert exp.returncode == 0, exp.stderr
    assert (tmp_path / "sp" / "transformer.h.2" / "sae.safetensors").exists()

    # A run folder -> a PEFT adapter that PEFT's own loader puts on the model: its spliced
    # predictions are the ones the downstream evaluation measured.
    peft_dir = tmp_path / "adapter"
    exp = run_xsae("--json", "sae", "export", str(out), str(peft_dir), "--format", "peft")
    assert exp.returncode == 0, exp.stderr
    assert json.loads(exp.stdout)["format"] == "peft"
    assert json.loads((peft_dir / "adapter_config.json").read_text())["target_modules"] == ["transformer.h.2"]
    from peft import PeftModel

    import xsae_cli.sae.peft  # noqa: F401 - registers the XSAE method with PEFT, as a user's import does
    from xsae_cli.sae.evaluate import spliced
    from xsae_cli.sae.formats import load_sae
    from xsae_cli.zoo.registry import resolve_entry
    from xsae_cli.zoo.sources import load_model

    model, _ = load_model(resolve_entry("tiny-gpt2"), device=torch.device("cpu"), dtype=torch.float32)
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad(), spliced(model, "transformer.h.2", load_sae(out / "transformer.h.2")):
        want = model(input_ids=ids).logits
    adapted = PeftModel.from_pretrained(model, str(peft_dir))
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, want, atol=1e-5)
    assert_user_error(run_xsae("sae", "export", str(out), str(peft_dir), "--format", "peft"), "already exists", "--force")


def test_real_smollm2_topk_sae(demo_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "smol"
    proc = run_xsae(
        "--json",
        *["sae", "train", "--model", "smollm2-135m", "--hook", "model.layers.3", "--k", "16", "--expansion", "2", "--tokens", "12k", "--batch-size", "1024", "--context-size", "64", "--out", str(out)],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout)["hooks"]["model.layers.3"]
    assert m["fvu"] < 1.0 and m["downstream"]["ce_clean"] < m["downstream"]["ce_zero"]
    assert m["special_tokens_dropped"] > 0


def test_kill_9_then_resume_equals_uninterrupted(demo_zoo: Path, tmp_path: Path) -> None:
    args = ["--seed", "3", *TINY, "--tokens", "15k", "--checkpoint-every", "5"]
    ref = run_xsae(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "killed"
    # The trainer SIGKILLs itself after step 13 (XSAE_CRASH_AT_STEP): the last checkpoint is step 10,
    # so steps 11-13 are lost exactly as in an outside `kill -9`, whatever the machine's speed.
    crashed = run_xsae(*args, "--out", str(out), env={"XSAE_CRASH_AT_STEP": "13"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert not (out / "metrics.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")) == ["step_000000005", "step_000000010"]
    resumed = run_xsae(*args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step 10" in resumed.stderr
    from safetensors.torch import load_file

    a = load_file(tmp_path / "ref" / "transformer.h.2" / "sae_weights.safetensors")
    b = load_file(out / "transformer.h.2" / "sae_weights.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_bad_hook_lists_nearest_modules(demo_zoo: Path, tmp_path: Path) -> None:
    proc = run_xsae("sae", "train", "--model", "tiny-gpt2", "--hook", "transformer.h.22", "--tokens", "1k", "--out", str(tmp_path / "x"))
    line = assert_user_error(proc, "transformer.h.22")
    assert "transformer.h.2" in line


def test_sae_d_in_mismatch_names_both_shapes(demo_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_xsae("--seed", "0", *TINY, "--tokens", "4k", "--out", str(out)).returncode == 0
    run = json.loads((out / "run.json").read_text())
    run["spec"]["model"] = "minilm-l6"
    run["spec"]["hooks"] = ["encoder.layer.2"]
    (out / "run.json").write_text(json.dumps(run))
    (out / "transformer.h.2").rename(out / "encoder.layer.2")
    assert_user_error(run_xsae("sae", "eval", str(out)), "d_in=64", "width 384")


def test_corrupt_sae_file_is_refused_with_its_path(tmp_path: Path, demo_zoo: Path) -> None:
    out = tmp_path / "run"
    assert run_xsae("--seed", "0", *TINY, "--tokens", "4k", "--out", str(out)).returncode == 0
    w = out / "transformer.h.2" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:-50])
    assert_user_error(run_xsae("sae", "export", str(out / "transformer.h.2"), str(tmp_path / "o")), "sae_weights.safetensors")


def test_archs_lists_the_registry() -> None:
    proc = run_xsae("--json", "sae", "archs")
    assert proc.returncode == 0, proc.stderr
    rows = {r["arch"]: r for r in json.loads(proc.stdout)}
    assert {"relu", "topk", "batchtopk", "jumprelu"} <= set(rows)
    assert rows["batchtopk"]["saelens"] == "jumprelu" and rows["batchtopk"]["tensors"] == {"threshold": "buffer"} and rows["topk"]["uses_k"]
