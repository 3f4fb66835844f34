"""Peak memory of `xsae restore sae` (hook on the original model, forward stopped after the block)
vs the TransformerLens `run_with_cache` route, on the same model and samples.

The model is the `seed` preset (37M parameters at vocab 11812, random weights) saved as an original
``{"model_state_dict", "config", "vocab_size"}`` .pt checkpoint, so the users' format is exercised
too. Each route runs in its own subprocess (`xsae --json restore sae ... --via direct|transformer-lens`)
and reports its peak resident set size from ``getrusage(RUSAGE_SELF).ru_maxrss`` (whole process:
Python, torch, the model, activations). A third subprocess only loads the model and the samples,
so the working memory above that floor can be compared too.

Run: `.venv/bin/python benchmarks/restore_memory.py [--samples 16] [--batch-samples 4] [--layer 8]`
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

FLOOR = r"""
import json, sys
from xsae_cli.core.hardware import peak_rss_bytes
from xsae_cli.restore.model import load_restoration
from xsae_cli.restore.sae import RestoreSaeSpec, samples
loaded = load_restoration(sys.argv[1])
ids, attn, corpus, seq = samples(loaded, RestoreSaeSpec(model=sys.argv[1], layer=0, out=".", max_samples=int(sys.argv[2]), seq_len=int(sys.argv[3])), 0)
print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "samples": int(ids.shape[0])}))
"""


def xsae() -> list[str]:
    beside = Path(sys.executable).with_name("xsae")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "xsae_cli"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch-samples", type=int, default=4)
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=768)
    args = ap.parse_args()

    import torch

    from xsae_cli.core.hardware import package_versions
    from xsae_cli.restore.model import RestorationModel, preset_config

    tmp = Path(tempfile.mkdtemp(prefix="xsae-restore-mem-"))
    torch.manual_seed(0)
    model = RestorationModel(preset_config("seed", 11812))
    cfg = {k: v for k, v in model.config.to_dict().items() if k != "attn_bias"}
    torch.save({"model_state_dict": model.state_dict(), "config": cfg, "vocab_size": 11812}, tmp / "seed.pt")
    n_params = model.n_params()
    del model

    env = dict(os.environ)
    floor = json.loads(subprocess.run([sys.executable, "-c", FLOOR, str(tmp / "seed.pt"), str(args.samples), str(args.seq_len)], capture_output=True, text=True, env=env, check=True).stdout)
    runs = {}
    for via in ("direct", "transformer-lens"):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                *xsae(),
                "--json",
                "--seed",
                "0",
                "restore",
                "sae",
                "-m",
                str(tmp / "seed.pt"),
                "--layer",
                str(args.layer),
                "--max-samples",
                str(args.samples),
                "--epochs",
                "1",
                "--device",
                "cpu",
                "--via",
                via,
                "--seq-len",
                str(args.seq_len),
                "--batch-samples",
                str(args.batch_samples),
                "--batch-size",
                "1024",
                "--expansion",
                "8",
                "--k",
                "32",
                "--corpus",
                "builtin",
                "--out",
                str(tmp / via),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            sys.exit(f"{via} failed:\n{proc.stderr[-3000:]}")
        m = json.loads(proc.stdout)
        runs[via] = {"peak_rss_bytes": m["memory"]["peak_rss_bytes"], "seconds": round(time.perf_counter() - t0, 1), "fvu": m["reconstruction"].get("fvu"), "tokens": m["training"]["tokens"]}
    ours, peer = runs["direct"]["peak_rss_bytes"], runs["transformer-lens"]["peak_rss_bytes"]
    base = floor["peak_rss_bytes"]
    result = {
        "benchmark": "restore_memory",
        "measure": "peak RSS of the whole process (getrusage ru_maxrss), one subprocess per route",
        "model": f"seed preset, {n_params:,} parameters, vocab 11812, random weights, original .pt format",
        "layer": args.layer,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "batch_samples": args.batch_samples,
        "floor_peak_rss_bytes": base,
        "routes": runs,
        "ratio_peak_rss": ours / peer,
        "ratio_above_floor": (ours - base) / max(1, peer - base),
        "goal": "ratio_peak_rss <= 0.25",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": package_versions(),
    }
    mib = 2**20
    print(f"peak RSS, direct hook:           {ours / mib:8.0f} MiB ({runs['direct']['seconds']} s)")
    print(f"peak RSS, TL run_with_cache:     {peer / mib:8.0f} MiB ({runs['transformer-lens']['seconds']} s)")
    print(f"floor (model + samples loaded):  {base / mib:8.0f} MiB")
    print(f"ratio direct / TransformerLens:  {result['ratio_peak_rss']:.3f} (goal <= 0.25); above the floor: {result['ratio_above_floor']:.3f}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
