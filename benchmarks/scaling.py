"""Scaling on one machine: SAE and SANE training with 1 and 2 processes, and per-rank memory of DDP vs ZeRO.

Runs the real ``xsae`` command (as users do) and reads what it writes:

- SAE throughput: ``xsae sae train`` on SmolLM2-135M layer 6 (the harvest is cached once and shared by
  every run: the key does not depend on the number of processes), 1 process vs 2 under torchrun; each
  rank trains on its own batch of ``--batch-size`` tokens, so 2 processes see twice the tokens per step.
- SANE throughput: ``xsae sane train`` on the demo zoo, 1 process vs 2 under accelerate (windows/s).
- Memory: a wide SAE (``--d-sae``) trained for a few steps with DDP, ZeRO-2 and ZeRO-3 on 2 ranks;
  peak RSS of each rank as ``metrics.json`` reports it (rank 0 also holds the model and the harvest
  buffers; rank 1 holds only its SAE share, so its figure shows what ZeRO saves).

On a CPU the processes share the same cores, so 2 processes cannot be faster than 1 with 2 threads;
the figures say what the launch overhead costs. Run: ``.venv/bin/python benchmarks/scaling.py``
(``--only sae|sane|memory``); the machine is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
XSAE = [str(Path(sys.executable).with_name("xsae"))] if Path(sys.executable).with_name("xsae").exists() else [sys.executable, "-m", "xsae_cli"]


def xsae(*args: str, timeout: int = 3600, threads: int | None = None) -> tuple[float, str]:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    t0 = time.perf_counter()
    proc = subprocess.run([*XSAE, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"xsae {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout


# (processes, OMP threads per process): the launchers give each rank one thread, so 1 process is
# measured with its default (one per core) and with one thread.
RUNS = ((1, None), (1, 1), (2, None))


def launch(n: int, launcher: str, port: int) -> list[str]:
    return [] if n == 1 else ["--launcher", launcher, "--num-processes", str(n), "--main-process-port", str(port)]


def sae_throughput(tokens: str, batch: int) -> list[dict[str, Any]]:
    rows = []
    train = [
        "sae",
        "train",
        "--model",
        "smollm2-135m",
        "--hook",
        "model.layers.6",
        "--k",
        "32",
        "--expansion",
        "8",
        "--batch-size",
        str(batch),
        "--tokens",
        tokens,
        "--checkpoint-every",
        "100000",
        "--force",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        xsae("--device", "cpu", *train, "--out", f"{tmp}/warm")  # fills the harvest cache for both
        for n, threads in RUNS:
            out = f"{tmp}/sae{n}{threads}"
            xsae("--device", "cpu", *launch(n, "torchrun", 29571 + n), *train, "--out", out, threads=threads)
            t = json.loads(Path(out, "metrics.json").read_text())["training"]
            rows.append(
                {
                    "what": f"sae train (SmolLM2 L6, TopK k32 x8), {threads or 'default'} thread(s)/process",
                    "processes": n,
                    "rate": t["tokens_per_second"],
                    "unit": "tokens/s",
                    "tokens": t["tokens"],
                    "steps": t["steps"],
                }
            )
    return rows


def sane_throughput(steps: int) -> list[dict[str, Any]]:
    rows = []
    models = "tiny-gpt2,tiny-gptneox,tiny-qwen2,tiny-mistral,tiny-gemma"
    with tempfile.TemporaryDirectory() as tmp:
        base = ["sane", "train", "--models", models, "--epochs", "1", "--steps-per-epoch", str(steps), "--batch-size", "4", "--window-size", "256", "--force"]
        xsae("--device", "cpu", *base, "--out", f"{tmp}/warm")  # tokenises the models into the cache once
        for n, threads in RUNS:
            out = f"{tmp}/sane{n}{threads}"
            seconds, _ = xsae("--device", "cpu", *launch(n, "accelerate", 29581 + n), *base, "--out", out, threads=threads)
            history = json.loads(Path(out, "checkpoint_epoch_1", "config.json").read_text())["history"]
            rows.append(
                {
                    "what": f"sane train (5 tiny models, window 256, batch 4 per rank), {threads or 'default'} thread(s)/process",
                    "processes": n,
                    "rate": history[-1]["windows_per_second"],
                    "unit": "windows/s (training loop)",
                    "seconds": round(seconds, 1),
                }
            )
    return rows


def zero_memory(d_sae: int) -> list[dict[str, Any]]:
    rows = []
    train = [
        "sae",
        "train",
        "--model",
        "tiny-gpt2",
        "--hook",
        "transformer.h.2",
        "--k",
        "8",
        "--d-sae",
        str(d_sae),
        "--batch-size",
        "256",
        "--context-size",
        "32",
        "--tokens",
        "4k",
        "--optimizer",
        "adam",
        "--checkpoint-every",
        "100000",
        "--force",
    ]
    recipes = ROOT / "recipes" / "deepspeed"
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("DDP", []), ("ZeRO-2", ["--deepspeed-config", str(recipes / "zero2.json")]), ("ZeRO-3", ["--deepspeed-config", str(recipes / "zero3.json")])):
            out = f"{tmp}/{name}"
            xsae("--device", "cpu", *launch(2, "torchrun", 29591), *extra, *train, "--out", out)
            per_rank = json.loads(Path(out, "metrics.json").read_text())["training"]["memory_per_rank"]
            rows.append({"what": f"{name}, d_in 64 x d_sae {d_sae:,}", "peak_rss_mb": [round(m["peak_rss_bytes"] / 2**20) for m in per_rank]})
    return rows


def machine() -> str:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["sae", "sane", "memory"], default=None)
    ap.add_argument("--sae-tokens", default="200k")
    ap.add_argument("--sane-steps", type=int, default=20)
    ap.add_argument("--d-sae", type=int, default=262_144)
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    if args.only in (None, "sae"):
        rows = sae_throughput(args.sae_tokens, 4096)
        print("\n| run | processes | rate | ratio 2/1 |\n| --- | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['what']} | {r['processes']} | {r['rate']:,.0f} {r['unit']} | {r['rate'] / rows[0]['rate']:.2f} |")
    if args.only in (None, "sane"):
        rows = sane_throughput(args.sane_steps)
        print("\n| run | processes | rate | ratio 2/1 |\n| --- | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['what']} | {r['processes']} | {r['rate']:.2f} {r['unit']} | {r['rate'] / rows[0]['rate']:.2f} |")
    if args.only in (None, "memory"):
        rows = zero_memory(args.d_sae)
        print("\n| 2 ranks | peak RSS rank 0 (MB) | peak RSS rank 1 (MB) | rank 1 vs DDP |\n| --- | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['what']} | {r['peak_rss_mb'][0]:,} | {r['peak_rss_mb'][1]:,} | {r['peak_rss_mb'][1] / rows[0]['peak_rss_mb'][1]:.2f} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
