"""Restoration accuracy of the `seed` preset trained for a fixed budget on the built-in corpus, next to
the character n-gram baseline counted on the same training text.

Both are scored by `xsae restore evaluate` on the same held-out masked spans (spans of 1-10
characters over held-out documents): top-1 and top-5 character accuracy. The budget is fixed in
steps (default 40 steps of 8 windows x 128 characters), chosen so the run stays near ten minutes
on a shared 2-core CPU; the figures say what a 37M-parameter model learns in that budget, nothing
more. Pass `--preset tiny --steps 600` for the small model under a similar budget.

Run: `.venv/bin/python benchmarks/restore_accuracy.py [--preset seed] [--steps 60]`
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


def xsae() -> list[str]:
    beside = Path(sys.executable).with_name("xsae")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "xsae_cli"]


def run(*args: str) -> dict:
    proc = subprocess.run([*xsae(), "--json", "--seed", "0", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="seed")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--windows", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="xsae-restore-acc-")) / args.preset
    t0 = time.perf_counter()
    train = run(
        "restore",
        "train",
        "--preset",
        args.preset,
        "--corpus",
        "builtin",
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--lr",
        str(args.lr),
        "--checkpoint-every",
        str(max(args.steps, 1)),
        "--out",
        str(out),
        "--force",
    )
    t_train = time.perf_counter() - t0
    ev = run("restore", "evaluate", str(out), "--windows", str(args.windows))
    t_total = time.perf_counter() - t0
    m, b = ev["restoration_model"], ev["ngram_baseline"]
    result = {
        "benchmark": "restore_accuracy",
        "preset": args.preset,
        "params": train["params"],
        "budget": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "train_seconds": round(t_train, 1),
            "chars_seen": args.steps * args.batch_size * args.seq_len,
        },
        "masked_chars": ev["masked_chars"],
        "restoration_model": m,
        "ngram_baseline": b,
        "ratio_top1_model_over_ngram": m["top1"] / b["top1"] if b["top1"] else None,
        "total_seconds": round(t_total, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": ev["versions"],
    }
    print(f"{args.preset} ({train['params']:,} params), {args.steps} steps in {t_train:.0f}s; {ev['masked_chars']} held-out masked characters")
    print(f"  restoration model: top-1 {100 * m['top1']:.1f}%  top-5 {100 * m['top5']:.1f}%")
    print(f"  {b['order']}-gram baseline:   top-1 {100 * b['top1']:.1f}%  top-5 {100 * b['top5']:.1f}%")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
