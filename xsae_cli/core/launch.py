"""Re-run the same ``xsae`` command under accelerate, DeepSpeed or torchrun.

xsae never spawns its own worker pool: ``--launcher accelerate --num-processes 2`` rebuilds the
command line for that engine's own launcher and runs ``python -m xsae_cli <same arguments>`` in
every process it starts. ``XSAE_LAUNCHED`` marks the children so they do not launch again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from xsae_cli.core.errors import XsaeError

LAUNCHERS = ("none", "accelerate", "deepspeed", "torchrun")

# Root options that configure the launch itself; they are removed from the child's argv.
LAUNCH_OPTIONS = {
    "--launcher": True,
    "--num-processes": True,
    "--num-machines": True,
    "--machine-rank": True,
    "--main-process-ip": True,
    "--main-process-port": True,
}


@dataclass(frozen=True)
class LaunchSpec:
    launcher: str
    num_processes: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = "127.0.0.1"
    main_process_port: int = 29500
    accelerate_config: str = ""
    deepspeed_config: str = ""
    cpu: bool = False


def check_launcher(name: str) -> str:
    name = (name or "none").lower()
    if name not in LAUNCHERS:
        import difflib

        close = difflib.get_close_matches(name, LAUNCHERS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise XsaeError(f"unknown launcher '{name}'", f"{hint}valid launchers: {', '.join(LAUNCHERS)}")
    return name


def check_gpus(wanted: int, found: int) -> None:
    """One process per GPU: refuse a launch that asks for more GPUs than this machine has."""
    if found < wanted:
        raise XsaeError(
            f"--num-processes {wanted} wants {wanted} GPU(s) on this machine; found {found}",
            "lower --num-processes to the GPUs present, or pass --device cpu to run CPU ranks",
        )


def in_launched_process() -> bool:
    return os.environ.get("XSAE_LAUNCHED") == "1"


def strip_launch_args(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_OPTIONS:
            skip = "=" not in arg and LAUNCH_OPTIONS[name]
            continue
        out.append(arg)
    return out


def _executable(name: str, module: str) -> list[str]:
    """Prefer the launcher's console script beside this Python, else ``python -m``."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(beside):
        return [beside]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


def build_command(spec: LaunchSpec, argv: Sequence[str]) -> list[str]:
    """The launcher command line that runs ``python -m xsae_cli argv`` in every process."""
    args = strip_launch_args(argv)
    n, m = spec.num_processes, spec.num_machines
    if n < 1 or m < 1:
        raise XsaeError(f"--num-processes ({n}) and --num-machines ({m}) must be at least 1", "pass positive counts")
    if spec.launcher == "accelerate":
        cmd = _executable("accelerate", "accelerate.commands.launch")
        if cmd[-1] != "accelerate.commands.launch":
            cmd.append("launch")
        if spec.accelerate_config:
            cmd += ["--config_file", spec.accelerate_config]
        cmd += ["--num_processes", str(n * m), "--num_machines", str(m), "--machine_rank", str(spec.machine_rank)]
        cmd += ["--main_process_ip", spec.main_process_ip, "--main_process_port", str(spec.main_process_port)]
        if n * m > 1 and not spec.accelerate_config:
            # accelerate's --cpu forces its single-process launcher (multi-CPU would need mpirun);
            # its torchrun-based launcher runs CPU ranks too when the children use gloo.
            cmd += ["--multi_gpu"]
        elif spec.cpu:
            cmd += ["--cpu"]
        if spec.cpu:
            cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        if spec.deepspeed_config:
            cmd += ["--use_deepspeed", "--deepspeed_config_file", spec.deepspeed_config]
        return cmd + ["-m", "xsae_cli", *args]
    if spec.launcher == "torchrun":
        cmd = _executable("torchrun", "torch.distributed.run")
        cmd += [f"--nproc-per-node={n}", f"--nnodes={m}", f"--node-rank={spec.machine_rank}"]
        cmd += [f"--master-addr={spec.main_process_ip}", f"--master-port={spec.main_process_port}"]
        return cmd + ["-m", "xsae_cli", *args]
    if spec.launcher == "deepspeed":
        cmd = _executable("deepspeed", "deepspeed.launcher.runner")
        cmd += ["--num_nodes", str(m), "--master_addr", spec.main_process_ip, "--master_port", str(spec.main_process_port)]
        if not spec.cpu:
            cmd += ["--num_gpus", str(n)]
        cmd += ["--no_local_rank", "--module", "xsae_cli", *args]
        return cmd
    raise XsaeError(f"launcher '{spec.launcher}' cannot relaunch", f"use one of {', '.join(LAUNCHERS[1:])}")


def relaunch(spec: LaunchSpec, argv: Sequence[str]) -> int:
    """Run the command under ``spec.launcher`` and return its exit code."""
    if spec.launcher in ("accelerate", "deepspeed"):
        module = spec.launcher
        try:
            __import__(module)
        except ImportError:
            extra = "deepspeed" if module == "deepspeed" else ""
            raise XsaeError(f"launcher '{module}' is not installed", f"pip install {'xsae[' + extra + ']' if extra else module}") from None
    cmd = build_command(spec, argv)
    env = dict(os.environ, XSAE_LAUNCHED="1")
    if spec.cpu:
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
        env["ACCELERATE_USE_CPU"] = "true"
        if spec.launcher == "deepspeed":  # its CPU accelerator counts NUMA nodes as devices unless told
            env["LOCAL_SIZE"] = str(spec.num_processes)
    return subprocess.call(cmd, env=env)


def distributed_check(cpu: bool = False) -> dict[str, int | str]:
    """Join the process group the launcher set up and all-reduce once.

    Proves that every rank started and can talk to the others (gloo on CPU, nccl on CUDA).
    """
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    value = torch.tensor([float(state.process_index + 1)], device=state.device)
    if state.num_processes > 1:
        torch.distributed.all_reduce(value)
    result = {
        "rank": state.process_index,
        "local_rank": state.local_process_index,
        "world_size": state.num_processes,
        "backend": str(state.backend or "none"),
        "allreduce_sum": int(value.item()),
    }
    state.wait_for_everyone()
    return result
