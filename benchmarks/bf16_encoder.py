"""What the bf16 training encoder costs in quality, and what it buys in speed, per SAE architecture.

The same SAE trains twice on the same batches in the same order, once with the encoder matmul in fp32
(``bf16_encoder=False``) and once in bf16 (``True``), for several seeds; held-out FVU is computed by exact
fp32 inference (inference never uses bf16). Beside each bf16-minus-fp32 difference stands its null: the
spread of fp32 FVU across seeds (a difference inside it is not a cost). TopK/BatchTopK select in bf16 and
recompute the kept values in fp32; ReLU/JumpReLU train on the bf16 values themselves, so they are the ones
expected to pay. Median step times of both paths on this machine give the speed side (a CPU without
AVX512-BF16/AMX emulates bf16 and is far slower; CUDA is where the speed-up is meant to be).

Run: ``.venv/bin/python benchmarks/make_activations.py --hook model.layers.6 --tokens 65600 --out /tmp/smol_l6.safetensors``
then ``XSAE_BENCH_ACTS=/tmp/smol_l6.safetensors .venv/bin/python benchmarks/bf16_encoder.py`` (about 10 minutes on 2 cores).
Without ``XSAE_BENCH_ACTS`` it uses the synthetic sparse-dictionary data of ``sae_throughput.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.sae_throughput import load_acts  # noqa: E402
from xsae_cli.sae.metrics import fvu  # noqa: E402
from xsae_cli.sae.models import bf16_encoder_is_fast  # noqa: E402
from xsae_cli.sae.settings import SaeTrainSettings  # noqa: E402
from xsae_cli.sae.train import SaeTrainer  # noqa: E402

COEF = {"relu": {"l1_coefficient": 1.0}, "jumprelu": {"l0_coefficient": 1e-3}}


def train_once(arch: str, bf16: bool, seed: int, train: torch.Tensor, held: torch.Tensor, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    settings = SaeTrainSettings(
        arch=arch,
        k=args.k,
        expansion=args.expansion,
        batch_size=args.batch,
        tokens=train.shape[0],
        optimizer="adam",
        lr=args.lr,
        checkpoint_every=10**6,
        bf16_encoder=bf16,
        **COEF.get(arch, {}),
    )
    trainer = SaeTrainer(settings, {"h": train.shape[1]}, tmp / f"{arch}-{int(bf16)}-{seed}", seed=seed)
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    times = []
    for s in range(0, train.shape[0], args.batch):
        batch = {"h": train[order[s : s + args.batch]]}
        t0 = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - t0)
    sae = trainer.finalize()["h"]
    with torch.no_grad():
        codes = sae.encode(held)
        recon = sae.decode(codes)
    return {"fvu": float(fvu(held, recon)), "l0": float((codes > 0).sum(1).float().mean()), "step_s": statistics.median(times[2:] or times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="topk,batchtopk,relu,jumprelu")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    d_sae = args.d_in * args.expansion
    train, held, source = load_acts(args.d_in, d_sae, args.steps * args.batch, 8192)
    tmp = Path("/tmp/xsae-bf16-bench")
    rows = []
    print(
        f"data: {source}; d_in {args.d_in}, d_sae {d_sae}, k {args.k}, {args.steps} steps of {args.batch}; "
        f"bf16 matmuls native here: {bf16_encoder_is_fast('cpu')}; torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print("| arch | fp32 FVU (mean +- sd over seeds) | bf16 FVU | bf16 - fp32 (mean) | null: fp32 seed sd | L0 fp32 / bf16 | step fp32 / bf16 (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arch in args.archs.split(","):
        runs = {b: [train_once(arch, b, seed, train, held, args, tmp) for seed in range(args.seeds)] for b in (False, True)}
        f32 = [r["fvu"] for r in runs[False]]
        b16 = [r["fvu"] for r in runs[True]]
        diff = statistics.mean(b - f for b, f in zip(b16, f32))
        sd = statistics.stdev(f32) if len(f32) > 1 else 0.0
        row = {
            "arch": arch,
            "fvu_fp32": f32,
            "fvu_bf16": b16,
            "diff_mean": diff,
            "null_sd": sd,
            "l0_fp32": statistics.mean(r["l0"] for r in runs[False]),
            "l0_bf16": statistics.mean(r["l0"] for r in runs[True]),
            "step_fp32": statistics.median(r["step_s"] for r in runs[False]),
            "step_bf16": statistics.median(r["step_s"] for r in runs[True]),
        }
        rows.append(row)
        print(
            f"| {arch} | {statistics.mean(f32):.4f} +- {sd:.4f} | {statistics.mean(b16):.4f} | {diff:+.4f} | {sd:.4f} | "
            f"{row['l0_fp32']:.1f} / {row['l0_bf16']:.1f} | {row['step_fp32']:.3f} / {row['step_bf16']:.3f} |",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"source": source, "args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
