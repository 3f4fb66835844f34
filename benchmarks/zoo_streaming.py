"""Weight streaming: xsae's per-tensor stream vs a plain sequential read of the same files.

Each side runs in its own subprocess so peak RSS is measured separately; both touch every byte
(a sum over each tensor / each block as float32), so the comparison is of I/O paths, not of
laziness. Run: `.venv/bin/python benchmarks/zoo_streaming.py [MODEL]` (default: smollm2-135m's
cached safetensors folder; needs `xsae zoo demo`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

CHILD = r"""
import json, sys, time, resource
import numpy as np
import torch
mode, files = sys.argv[1], sys.argv[2:]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter(); nbytes = 0; total = 0.0; largest = 0
if mode == "xsae":
    from pathlib import Path
    from xsae_cli.zoo.sources import ResolvedModel
    from xsae_cli.zoo.weights import iter_weights
    r = ResolvedModel("hf_dir", "bench", Path(files[0]).parent, tuple(Path(f) for f in files))
    for name, t in iter_weights(r):
        b = t.numel() * t.element_size(); nbytes += b; largest = max(largest, b)
        total += float(t.sum())
else:
    for f in files:
        with open(f, "rb") as fh:
            while True:
                block = fh.read(64 << 20)
                if not block:
                    break
                nbytes += len(block)
                usable = len(block) - len(block) % 4
                total += float(np.frombuffer(block[:usable], dtype=np.float32).sum())
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"mode": mode, "seconds": dt, "bytes": nbytes, "mb_s": nbytes / 1e6 / dt, "peak_rss": peak, "import_rss": base, "largest": largest}))
"""


def run(mode: str, files: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, *files], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from xsae_cli.zoo.registry import resolve_entry

    name = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
    resolved = resolve_entry(name)
    files = [str(f) for f in resolved.weight_files]
    size = sum(os.path.getsize(f) for f in files)
    run("plain", files)  # warm the page cache for both sides
    results = {m: [run(m, files) for _ in range(3)] for m in ("plain", "xsae")}
    best = {m: max(rs, key=lambda r: r["mb_s"]) for m, rs in results.items()}
    largest = best["xsae"]["largest"]
    print(f"model {name}: {len(files)} file(s), {size / 1e6:.0f} MB, largest tensor {largest / 1e6:.0f} MB")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    for m in ("plain", "xsae"):
        b = best[m]
        print(f"{m:6s} {b['mb_s']:8.0f} MB/s  peak RSS {b['peak_rss'] / 1e6:6.0f} MB (after imports {b['import_rss'] / 1e6:.0f} MB)")
    ratio = best["xsae"]["mb_s"] / best["plain"]["mb_s"]
    growth = best["xsae"]["peak_rss"] - best["xsae"]["import_rss"]
    print(f"ratio xsae/plain: {ratio:.2f}")
    print(f"xsae peak RSS above imports: {growth / 1e6:.0f} MB; goal: < largest tensor + 300 MB = {(largest + 300e6) / 1e6:.0f} MB -> {'met' if growth < largest + 300e6 else 'NOT met'}")


if __name__ == "__main__":
    main()
