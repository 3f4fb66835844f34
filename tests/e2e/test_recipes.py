"""The recipes in recipes/ run as written: at CPU size on two ranks here, refused at once without GPUs.

Each GPU recipe reads its sizes from the environment, so the same script that trains a 7B or 72B SAE
on 8 GPUs runs here on tiny-GPT-2 with two CPU ranks (gloo): what is proven is the script, the
launcher, the engine and the checkpoint format, not GPU memory.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
HOOK = "transformer.h.2"
CPU_SIZE = {
    "DEVICE": "cpu",
    "GPUS": "2",
    "MODEL": "tiny-gpt2",
    "HOOK": HOOK,
    "K": "8",
    "EXPANSION": "4",
    "BATCH": "512",
    "TOKENS": "12k",
    "CONTEXT": "32",
    "DTYPE": "float32",
    "EXTRA": "--checkpoint-every 5",
}


def run_recipe(script: Path, env: dict[str, str], cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", COLUMNS="200", **env)
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=full, cwd=cwd, timeout=timeout, check=False)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from xsae_cli.sae.formats import load_sae

    return {k: v.detach() for k, v in load_sae(run / HOOK).state_dict().items()}


@pytest.mark.parametrize("script", ["sae_7b_ddp.sh", "sae_7b_zero2.sh", "sae_72b_zero3_8gpu.sh"])
def test_gpu_recipes_fail_at_once_without_their_gpus(script: str, tmp_path: Path) -> None:
    proc = run_recipe(RECIPES / script, {"OUT": str(tmp_path / "out")})
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "--num-processes 8 wants 8 GPU(s) on this machine; found 0" in line, line
    assert not (tmp_path / "out").exists()


def test_deepspeed_and_accelerate_configs_load() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    from xsae_cli.sae.zero import load_zero_config, zero_stage

    stages = {p.name: zero_stage(load_zero_config(p)) for p in sorted((RECIPES / "deepspeed").glob("*.json"))}
    assert stages == {"zero1.json": 1, "zero2.json": 2, "zero2_offload.json": 2, "zero3.json": 3, "zero3_offload.json": 3}
    kinds = {p.stem: str(load_config_from_file(str(p)).distributed_type) for p in (RECIPES / "accelerate").glob("*.yaml")}
    assert kinds == {"single_gpu": "DistributedType.NO", "multi_gpu": "DistributedType.MULTI_GPU", "multi_node": "DistributedType.MULTI_GPU"}


def test_7b_ddp_recipe_on_two_cpu_ranks_writes_a_single_process_checkpoint(demo_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    proc = run_recipe(RECIPES / "sae_7b_ddp.sh", {**CPU_SIZE, "OUT": str(out), "PORT": "29560"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching under accelerate with 2 process(es)" in proc.stderr
    t = json.loads((out / "metrics.json").read_text())["training"]
    assert t["world_size"] == 2 and "zero_stage" not in t
    assert t["tokens"] <= t["steps"] * 512 * 2 and t["tokens"] > (t["steps"] - 1) * 512 * 2  # both ranks contributed to every step
    from xsae_cli.core.io import Checkpoints
    from xsae_cli.sae.formats import load_sae
    from xsae_cli.sae.runs import settings_from_run
    from xsae_cli.sae.train import SaeTrainer

    sae = load_sae(out / HOOK)
    assert sae.cfg.d_in == 64 and sae.cfg.k == 8
    step, _, meta = Checkpoints(out).latest()
    assert step == t["steps"] and meta["tokens"] == t["tokens"]
    desc = json.loads((out / "run.json").read_text())
    trainer = SaeTrainer(settings_from_run(desc), {HOOK: 64}, out, seed=desc["spec"]["seed"])  # a single-process trainer resumes it
    assert trainer.try_resume() and trainer.step == t["steps"] and trainer.tokens == t["tokens"]
    assert torch.equal(trainer.finalize()[HOOK].W_dec.detach(), sae.W_dec.detach())


def test_7b_zero2_recipe_on_two_cpu_ranks_and_its_checkpoint_resumes_without_deepspeed(demo_zoo: Path, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    out = tmp_path / "z2"
    proc = run_recipe(RECIPES / "sae_7b_zero2.sh", {**CPU_SIZE, "OUT": str(out), "PORT": "29561"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    training = json.loads((out / "metrics.json").read_text())["training"]
    assert training["world_size"] == 2 and training["zero_stage"] == 2
    assert training["tokens"] <= training["steps"] * 512 * 2 and training["tokens"] > (training["steps"] - 1) * 512 * 2  # both ranks every step
    from xsae_cli.core.io import Checkpoints
    from xsae_cli.sae.runs import settings_from_run
    from xsae_cli.sae.train import SaeTrainer

    step, state, meta = Checkpoints(out).latest()
    assert meta["world_size"] == 2 and meta["decoder_weight_norm"] == {HOOK: True}
    adam = state[HOOK]["optimizer"]["state"]
    assert adam[2]["exp_avg"].shape == (256, 64) and float(adam[2]["step"]) == step  # W_dec's full moments, not a partition
    desc = json.loads((out / "run.json").read_text())
    trainer = SaeTrainer(settings_from_run(desc), {HOOK: 64}, out, seed=desc["spec"]["seed"])  # one process, no DeepSpeed
    assert trainer.try_resume() and trainer.step == step
    assert torch.allclose(trainer.finalize()[HOOK].W_dec.detach(), _weights(out)["W_dec"], atol=1e-6)
    assert torch.equal(trainer.states[HOOK].optimizer.state_dict()["state"][2]["exp_avg"], adam[2]["exp_avg"])


def test_72b_zero3_recipe_resumes_a_kill_exactly(demo_zoo: Path, tmp_path: Path) -> None:
    """ZeRO-3 with the model spread by --device-map auto (here: all on the CPU), killed and resumed."""
    pytest.importorskip("deepspeed")
    script = RECIPES / "sae_72b_zero3_8gpu.sh"
    full = run_recipe(script, {**CPU_SIZE, "OUT": str(tmp_path / "full"), "PORT": "29562"})
    assert full.returncode == 0, full.stderr[-3000:]
    training = json.loads((tmp_path / "full" / "metrics.json").read_text())["training"]
    assert training["world_size"] == 2 and training["zero_stage"] == 3 and training["tokens"] >= 12_000

    crash = {**CPU_SIZE, "OUT": str(tmp_path / "crash"), "XSAE_CRASH_AT_STEP": "5"}  # SIGKILL after the step-5 checkpoint
    crashed = run_recipe(script, {**crash, "PORT": "29563"})
    assert crashed.returncode != 0 and not (tmp_path / "crash" / "metrics.json").exists()
    crash.pop("XSAE_CRASH_AT_STEP")
    resumed = run_recipe(script, {**crash, "PORT": "29564"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resuming from step 5") == 1  # said once, by rank 0
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "crash")
    for name in a:
        assert torch.equal(a[name], b[name]), name  # the same weights as the run that was never killed
    assert torch.allclose(a["W_dec"].norm(dim=1), torch.ones(a["W_dec"].shape[0]), atol=1e-5)  # unit rows saved


def _slurm_shims(tmp_path: Path) -> Path:
    """`srun` and `scontrol` stand-ins: one node, the task runs here with SLURM's variables set."""
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_slurm_sae_recipe_runs_zero1_under_torchrun(demo_zoo: Path, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    shims = _slurm_shims(tmp_path)
    env = {
        **CPU_SIZE,
        "OUT": str(tmp_path / "slurm"),
        "ZERO": "1",
        "PORT": "29565",
        "XSAE_CACHE": os.environ["XSAE_CACHE"],
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "PATH": f"{shims}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(["bash", str(RECIPES / "slurm" / "sae_train.sbatch")], capture_output=True, text=True, env={**os.environ, **env}, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    training = json.loads((tmp_path / "slurm" / "metrics.json").read_text())["training"]
    assert training["world_size"] == 2 and training["zero_stage"] == 1
    assert "torchrun" in proc.stderr and HOOK in json.loads((tmp_path / "slurm" / "run.json").read_text())["d_in"]


def test_sane_train_under_accelerate_two_cpu_ranks(demo_zoo: Path, tmp_path: Path) -> None:
    """Both ranks train on their own windows; rank 0 writes the single-process checkpoint format."""
    from tests.conftest import run_xsae

    out = tmp_path / "sane2"
    args = ["sane", "train", "--models", "tiny-gpt2,tiny-qwen2", "--epochs", "2", "--steps-per-epoch", "3", "--window-size", "128", "--batch-size", "2", "--out", str(out)]
    proc = run_xsae("--launcher", "accelerate", "--num-processes", "2", "--main-process-port", "29566", "--device", "cpu", *args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("epoch 2/2") == 1 and proc.stdout.count("trained on 2 models") == 1  # rank 0 reports once
    meta = json.loads((out / "checkpoint_epoch_2" / "config.json").read_text())
    assert [row["world_size"] for row in meta["history"]] == [2, 2]
    assert [row["windows"] for row in meta["history"]] == [12, 12]  # 3 steps x 2 windows x 2 ranks per epoch
    from xsae_cli.core.io import load_safetensors
    from xsae_cli.sane.model import SaneAutoencoder, SaneModelConfig

    model = SaneAutoencoder(SaneModelConfig(**meta["model"]))
    model.load_state_dict(load_safetensors(out / "checkpoint_epoch_2" / "model.safetensors"))  # no DDP "module." prefix
    resumed = run_xsae("--device", "cpu", *args[:5], "3", *args[6:], timeout=900)  # one process continues to epoch 3
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and (out / "checkpoint_epoch_3").is_dir()
