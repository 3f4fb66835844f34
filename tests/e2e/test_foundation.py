"""The real `xsae` command in a subprocess: help, doctor, config, zoo, launcher and user errors."""

import json
import re
from pathlib import Path

import torch

from tests.conftest import assert_user_error, run_xsae


def test_version_and_help_list_the_six_groups() -> None:
    from xsae_cli import __version__

    proc = run_xsae("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"xsae {__version__}"
    proc = run_xsae("--help")
    assert proc.returncode == 0
    for group in ("zoo", "sane", "sae", "align", "restore", "viz", "doctor", "config"):
        assert re.search(rf"\b{group}\b", proc.stdout), group


def test_doctor_json_reports_versions_devices_and_demo_models(demo_zoo: Path) -> None:
    proc = run_xsae("--json", "doctor")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["versions"]["torch"] == torch.__version__.split("+")[0] or data["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    for pkg in ("transformers", "accelerate", "peft", "transformer_lens", "safetensors"):
        assert data["versions"][pkg], pkg
    assert "cpu" in data["hardware"]["devices"]
    assert data["demo_models"]["smollm2-135m"][0] is True
    assert data["xsae_home"] == str(demo_zoo)


def test_config_show_names_each_source(cleandir: Path) -> None:
    (cleandir / "xsae.toml").write_text('[hardware]\ndtype = "bfloat16"\n')
    proc = run_xsae("--json", "--seed", "5", "config", "show", cwd=cleandir, env={"XSAE_SAE_K": "12"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["values"]["hardware"]["seed"] == 5 and data["sources"]["hardware.seed"] == "flag --seed"
    assert data["values"]["hardware"]["dtype"] == "bfloat16" and "xsae.toml:2" in data["sources"]["hardware.dtype"]
    assert data["values"]["sae"]["k"] == 12 and data["sources"]["sae.k"] == "env XSAE_SAE_K"
    assert data["sources"]["hardware.device"] == "default"
    human = run_xsae("config", "show", cwd=cleandir)
    assert "bfloat16" in human.stdout and "default" in human.stdout


def test_zoo_demo_list_info_offline(demo_zoo: Path) -> None:
    proc = run_xsae("--json", "zoo", "list")
    assert proc.returncode == 0, proc.stderr
    names = {e["name"] for e in json.loads(proc.stdout)}
    assert {"smollm2-135m", "minilm-l6", "tiny-gpt2", "tiny-gptneox", "tiny-qwen2", "tiny-mistral", "tiny-gemma"} <= names
    info = json.loads(run_xsae("--json", "zoo", "info", "smollm2-135m").stdout)
    assert info["architecture"] == "LlamaForCausalLM" and info["layers"] == 30 and info["hidden"] == 576
    assert 130e6 < info["params"] < 140e6 and info["kind"] == "gguf" and len(info["sha256"]) == 64
    minilm = json.loads(run_xsae("--json", "zoo", "info", "minilm-l6").stdout)
    assert minilm["architecture"] == "BertModel" and minilm["layers"] == 6 and minilm["hidden"] == 384
    human = run_xsae("zoo", "info", "smollm2-135m")
    assert "LlamaForCausalLM" in human.stdout and "sha256" in human.stdout


def test_zoo_weights_streams_names_shapes_and_stats(demo_zoo: Path) -> None:
    proc = run_xsae("--json", "zoo", "weights", "tiny-gpt2", "--stats", "--limit", "4")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 4 and all({"name", "shape", "dtype", "mean", "std"} <= set(r) for r in rows)
    full = json.loads(run_xsae("--json", "zoo", "weights", "smollm2-135m").stdout)
    assert len(full) >= 272 and any(r["name"] == "model.embed_tokens.weight" and r["shape"] == [49152, 576] for r in full)


def test_zoo_add_rm_round_trip(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    env = {"XSAE_HOME": str(tmp_path / "home")}
    assert run_xsae("zoo", "add", str(tiny_gpt2_dir), "--name", "mine", env=env).returncode == 0
    assert_user_error(run_xsae("zoo", "add", str(tiny_gpt2_dir), "--name", "mine", env=env), "already in the zoo", "--force")
    assert run_xsae("zoo", "add", str(tiny_gpt2_dir), "--name", "mine", "--force", env=env).returncode == 0
    assert run_xsae("zoo", "rm", "mine", env=env).returncode == 0
    assert json.loads(run_xsae("--json", "zoo", "list", env=env).stdout) == []


def test_user_errors_are_one_line_exit_2(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    env = {"XSAE_HOME": str(tmp_path / "home")}
    assert_user_error(run_xsae("zoo", "add", str(tmp_path / "missing"), env=env), "model path not found", "missing")

    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes((tiny_gpt2_dir / "model.safetensors").read_bytes()[:-100])
    assert_user_error(run_xsae("zoo", "add", str(trunc), env=env), "truncated safetensors", "trunc.safetensors")

    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    assert_user_error(run_xsae("zoo", "add", str(gguf), env=env), "GGUF", "broken.gguf")

    import pickle

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": [1, 2]} | {"f": Path("x")}))
    assert_user_error(run_xsae("zoo", "add", str(evil), env=env), "refused to load", "evil.pt")

    assert_user_error(run_xsae("zoo", "info", "smollm", env=env), "unknown model 'smollm'")

    bad = tmp_path / "bad.toml"
    bad.write_text('[hardware]\nseed = "x"\n')
    assert_user_error(run_xsae("--config", str(bad), "config", "show", env=env), "bad.toml line 2", "seed must be an integer")

    assert_user_error(run_xsae("--device", "mps", "doctor", "--distributed", env=env) if "mps" not in _devices() else run_xsae("--device", "tpu", "doctor", env=env))
    assert_user_error(run_xsae("--launcher", "acelerate", "doctor", env=env), "did you mean 'accelerate'")


def _devices() -> list[str]:
    from xsae_cli.core.hardware import available_devices

    return available_devices()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = run_xsae("--debug", "zoo", "add", str(tmp_path / "missing"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "XsaeError" in proc.stderr


def test_accelerate_launch_runs_two_cpu_ranks() -> None:
    proc = run_xsae("--launcher", "accelerate", "--num-processes", "2", "--main-process-port", "29517", "--device", "cpu", "--json", "doctor", "--distributed", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(int(m) for m in re.findall(r'"rank": (\d+)', proc.stdout))
    assert ranks == [0, 1], proc.stdout
    assert re.findall(r'"world_size": (\d+)', proc.stdout) == ["2", "2"]
    assert re.findall(r'"allreduce_sum": (\d+)', proc.stdout) == ["3", "3"]  # 1 + 2: both ranks talked
    assert set(re.findall(r'"backend": "(\w+)"', proc.stdout)) == {"gloo"}


def test_group_settings_reach_the_run_from_every_layer(cleandir: Path) -> None:
    """[align.sae] k from the file, a flag over it, both visible in config show's sources."""
    (cleandir / "xsae.toml").write_text("[align.sae]\nk = 12\n\n[restore.predict]\nbeam = 3\n")
    data = json.loads(run_xsae("--json", "config", "show", cwd=cleandir, env={"XSAE_SAE_L1_COEFFICIENT": "2.5"}).stdout)
    assert data["values"]["align.sae"]["k"] == 12 and "xsae.toml:2" in data["sources"]["align.sae.k"]
    assert data["values"]["restore.predict"]["beam"] == 3
    assert data["values"]["sae"]["l1_coefficient"] == 2.5 and data["sources"]["sae.l1_coefficient"] == "env XSAE_SAE_L1_COEFFICIENT"
    assert len(data["sources"]) > 150


def test_bad_values_are_refused_before_any_model_is_looked_up(cleandir: Path) -> None:
    """`no-such-model` would be its own error: the value is refused first, in one line naming the flag."""
    out = cleandir / "run"
    assert_user_error(run_xsae("sae", "train", "--model", "no-such-model", "--hook", "6", "--out", str(out), "--k", "0", cwd=cleandir), "--k 0", ">= 1")
    assert_user_error(run_xsae("sae", "train", "--model", "no-such-model", "--hook", "6", "--out", str(out), "--lr", "nan", cwd=cleandir), "--lr", "finite")
    assert_user_error(run_xsae("sae", "train", "--model", "no-such-model", "--hook", "6", "--out", str(out), "--arch", "topkk", cwd=cleandir), "--arch 'topkk'", "did you mean 'topk'")
    assert_user_error(run_xsae("sae", "train", "--model", "no-such-model", "--hook", "6", "--out", str(out), "--context-size", "-4", cwd=cleandir), "--context-size -4")
    assert_user_error(run_xsae("restore", "train", "--out", str(out), "--seq-len", "100000", cwd=cleandir), "--seq-len 100000", "<= 16384")
    assert_user_error(run_xsae("restore", "predict", "a [...] b", "--model", str(out), "--beam", "0", cwd=cleandir), "--beam 0")
    assert_user_error(run_xsae("sane", "train", "--models", "no-such-model", "--lr", "nan", "--out", str(out), cwd=cleandir), "--lr", "finite")
    assert_user_error(run_xsae("--seed", "-1x", "config", "show", cwd=cleandir), "--seed")
    assert not out.exists()


def test_help_shows_generated_options_with_their_choices_and_old_spellings_still_work(tmp_path: Path) -> None:
    proc = run_xsae("sae", "train", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for flag in ("--l1-coefficient", "--warmup-fraction", "--normalize-activations", "--outlier-factor", "--no-pack"):
        assert flag in text, flag
    flat = text.replace("│ ", "")
    assert "{choices:" not in text and "one of " in flat
    listed = flat.split("--arch", 1)[1].split("one of ", 1)[1][:80]  # the registered architectures, in registration order
    assert all(arch in listed for arch in ("relu", "topk", "batchtopk", "jumprelu")), listed
    assert "--output" not in run_xsae("viz", "cluster", "--help").stdout  # hidden alias
