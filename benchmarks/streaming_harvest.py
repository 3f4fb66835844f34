"""Streaming vs cached harvest: harvest + train tokens/s with 1 and 2 processes, held-out FVU, disk per token.

Runs the real ``xsae sae train`` on tiny-GPT-2 (hook transformer.h.2, TopK k8 x4, batch 256 per rank,
context 32) with the same token budget in four modes: 1 process cached (today's single-process path),
1 process ``--no-cache`` (streaming), 2 processes ``--cache`` (today's rank-0 harvest, the others wait)
and 2 processes streaming (the new default under a launcher: each rank runs the model on its own
documents). Each run gets a fresh XSAE_CACHE (so a cached run pays for its harvest) with the demo
models linked in. Reported per run: end-to-end tokens/s = tokens / (harvest seconds + training seconds)
(streaming interleaves the two, so its training seconds already hold the harvest), per-rank harvest
rate, held-out FVU (rank 0's evaluation, same held-out documents for every mode), bytes on disk per token.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/streaming_harvest.py [--tokens 16k]``.
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

ROOT = Path(__file__).resolve().parents[1]
XSAE = [str(Path(sys.executable).with_name("xsae"))] if Path(sys.executable).with_name("xsae").exists() else [sys.executable, "-m", "xsae_cli"]
SHARED = Path(os.environ.get("XSAE_CACHE") or Path.home() / ".cache" / "xsae" / "cache")


def run(mode: str, procs: int, tokens: str, work: Path, port: int, extra: list[str]) -> dict:
    cache = work / f"cache-{mode}-{procs}"
    cache.mkdir()
    for entry in SHARED.iterdir():  # the demo models, not the activations
        if entry.name != "activations":
            (cache / entry.name).symlink_to(entry)
    out = work / f"run-{mode}-{procs}"
    launch = ["--launcher", "accelerate", "--num-processes", str(procs), "--main-process-port", str(port)] if procs > 1 else []
    flag = {"cached": ["--cache"], "streaming": ["--no-cache"]}[mode]
    args = [
        *XSAE,
        *launch,
        "--device",
        "cpu",
        "sae",
        "train",
        "--model",
        "tiny-gpt2",
        "--hook",
        "transformer.h.2",
        "--k",
        "8",
        "--expansion",
        "4",
        "--batch-size",
        "256",
        "--context-size",
        "32",
        "--tokens",
        tokens,
        *flag,
        *extra,
        "--out",
        str(out),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, XSAE_CACHE=str(cache), OMP_NUM_THREADS="1"), check=False, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    t = m["training"]
    seconds = t["seconds"] + (t["harvest_seconds"] if mode == "cached" else 0.0)
    disk = sum(f.stat().st_size for f in (cache / "activations").rglob("*.safetensors")) if (cache / "activations").exists() else 0
    ranks = m.get("harvest_per_rank") or [{"rank": 0, "tokens_seen": t["harvest"].get("tokens_seen", 0), "seconds": t["harvest_seconds"]}]
    return {
        "mode": mode,
        "procs": procs,
        "tokens": t["tokens"],
        "e2e_tokens_per_s": t["tokens"] / seconds,
        "wall_s": wall,
        "harvest_rate": [r["tokens_seen"] / max(r["seconds"], 1e-9) for r in ranks],
        "fvu": m["hooks"]["transformer.h.2"]["fvu"],
        "disk_bytes_per_token": disk / t["tokens"] if disk else 0.0,
        "cache": t.get("cache"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="16k")
    a = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs), python {platform.python_version()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for i, (mode, procs, extra) in enumerate([("cached", 1, []), ("streaming", 1, []), ("cached", 2, []), ("streaming", 2, []), ("cached", 1, ["--cache-dtype", "bfloat16"])]):
            r = run(mode, procs, a.tokens, work / str(i), 29700 + i, extra) if (work / str(i)).mkdir() is None else {}
            r["mode"] += " bf16" if extra else ""
            rows.append(r)
            print(json.dumps(r), flush=True)
    base = rows[0]["e2e_tokens_per_s"]
    print("\n| mode | processes | harvest+train tokens/s | vs 1-process cached | per-rank harvest tokens/s | held-out FVU | disk bytes/token |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for r in rows:
        rates = ", ".join(f"{x:,.0f}" for x in r["harvest_rate"])
        print(f"| {r['mode']} | {r['procs']} | {r['e2e_tokens_per_s']:,.0f} | {r['e2e_tokens_per_s'] / base:.2f} | {rates} | {r['fvu']:.4f} | {r['disk_bytes_per_token']:.1f} |")


if __name__ == "__main__":
    main()
