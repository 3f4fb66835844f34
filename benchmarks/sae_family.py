"""Gated and Matryoshka BatchTopK training steps: xsae against SAELens (the peer that has both), same data.

Every runner trains on the same synthetic activations (:func:`sae_throughput.synthetic_acts`:
sparse Zipf-frequency dictionary sums, heavy-tailed norms), batch by batch in the same order, the
runners taking turns step by step so that a shared machine slows them alike; Adam 3e-4 for all.

- ``xsae batchtopk`` / ``xsae matryoshka_batchtopk`` (widths d_sae/8, d_sae/4, d_sae/2, d_sae):
  the Matryoshka step over a plain BatchTopK step of the same (largest) width is the issue's
  1.3x budget;
- ``saelens batchtopk`` / ``saelens matryoshka_batchtopk`` / ``saelens gated``: SAELens's training
  SAEs through its ``SAETrainer.step`` (its own Adam at 3e-4), and ``xsae gated``;
- per runner: median step time (the first ``--warmup`` steps untimed), tokens/s, held-out FVU
  (beside its null: the untrained SAE's FVU; 1.0 is the mean predictor, 0 perfect), L0 and dead %;
  for Matryoshka also the FVU of its first prefix alone (codes beyond d_sae/8 zeroed), the
  property it is trained for, beside the same prefix of the plain BatchTopK.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sae_family.py`` (minutes: six runners take turns on one thread);
``--d-in 576 --d-sae 4608 --batch 4096`` for the sae_throughput ``small`` shape. Figures in
benchmarks/RESULTS.md (issue 20).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae_step_profile import train_step
from sae_throughput import synthetic_acts

from xsae_cli.sae.metrics import FiringTracker
from xsae_cli.sae.models import SaeConfig, create_sae


@dataclass
class Runner:
    name: str
    step: Callable[[torch.Tensor], None]
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    times: list[float] = field(default_factory=list)


def xsae_runner(arch: str, d_in: int, d_sae: int, k: int, widths: list[int], first: torch.Tensor) -> Runner:
    options: dict[str, Any] = {"matryoshka_widths": widths} if arch == "matryoshka_batchtopk" else {}
    if arch == "gated":
        options = {"gated_l1_coefficient": 1.0}
    cfg = SaeConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=k if arch != "gated" else None, options=options)
    sae = create_sae(cfg, seed=0)
    sae.init_b_dec(first)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)
    tracker = FiringTracker(d_sae, device=first.device)
    return Runner(f"xsae {arch}", lambda x: train_step(sae, opt, tracker, x), torch.no_grad()(sae.encode), torch.no_grad()(sae.decode))


def saelens_runner(arch: str, d_in: int, d_sae: int, k: int, widths: list[int], n_tokens: int, batch: int) -> Runner:
    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    if arch == "batchtopk":
        sae = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    elif arch == "matryoshka_batchtopk":
        sae = sae_lens.MatryoshkaBatchTopKTrainingSAE(sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, matryoshka_widths=list(widths)))
    else:
        sae = sae_lens.GatedTrainingSAE(sae_lens.GatedTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=1.0))
    cfg = SAETrainerConfig(total_training_samples=n_tokens, train_batch_size_samples=batch, lr=3e-4, lr_end=3e-4, device="cpu", autocast=False)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))

    def step(x: torch.Tensor) -> None:
        trainer.step(x)
        trainer.n_training_steps += 1

    return Runner(f"saelens {arch}", step, torch.no_grad()(sae.encode), torch.no_grad()(sae.decode))


def fvu(r: Runner, x: torch.Tensor, width: int | None = None) -> tuple[float, float, float]:
    """(held-out FVU, L0, dead fraction); ``width``: only the first ``width`` latents decode."""
    codes = r.encode(x)
    l0 = float((codes > 0).sum(-1).float().mean())
    dead = float(((codes > 0).sum(0) == 0).float().mean())
    if width is not None:
        codes = codes.clone()
        codes[:, width:] = 0
    err = r.decode(codes) - x
    return float(err.pow(2).sum() / (x - x.mean(0)).pow(2).sum()), l0, dead


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated runner names to keep (e.g. 'xsae batchtopk,xsae matryoshka_batchtopk')")
    a = ap.parse_args()
    d_in, d_sae, k, batch = a.d_in, a.d_sae, a.k, a.batch
    widths = [d_sae // 8, d_sae // 4, d_sae // 2, d_sae]
    data = synthetic_acts(a.steps * batch + 8192, d_in, n_features=2 * d_sae, seed=0)
    train, held = data[: a.steps * batch], data[a.steps * batch :]
    first = train[:batch]
    runners = [xsae_runner(arch, d_in, d_sae, k, widths, first) for arch in ("batchtopk", "matryoshka_batchtopk", "gated")]
    runners += [saelens_runner(arch, d_in, d_sae, k, widths, a.steps * batch, batch) for arch in ("batchtopk", "matryoshka_batchtopk", "gated")]
    if a.only:
        keep = {s.strip() for s in a.only.split(",")}
        runners = [r for r in runners if r.name in keep]
    null = {r.name: fvu(r, held)[0] for r in runners}
    for i in range(a.steps):
        x = train[i * batch : (i + 1) * batch]
        for r in runners:
            t0 = time.perf_counter()
            r.step(x)
            if i >= a.warmup:
                r.times.append(time.perf_counter() - t0)
    print(f"d_in={d_in} d_sae={d_sae} k={k} batch={batch} steps={a.steps} threads={torch.get_num_threads()} widths={widths}")
    print(f"{'runner':32s} {'step ms':>8s} {'tok/s':>9s} {'FVU':>7s} {'null':>7s} {'L0':>7s} {'dead%':>6s} {'FVU@' + str(widths[0]):>9s}")
    med = {}
    for r in runners:
        m = statistics.median(r.times)
        med[r.name] = m
        f, l0, dead = fvu(r, held)
        prefix = fvu(r, held, widths[0])[0] if "topk" in r.name else float("nan")
        print(f"{r.name:32s} {m * 1e3:8.1f} {batch / m:9.0f} {f:7.3f} {null[r.name]:7.3f} {l0:7.1f} {100 * dead:6.1f} {prefix:9.3f}")
    pairs = [("xsae matryoshka_batchtopk", "xsae batchtopk"), ("saelens matryoshka_batchtopk", "saelens batchtopk")]
    pairs += [(f"xsae {a_}", f"saelens {a_}") for a_ in ("batchtopk", "matryoshka_batchtopk", "gated")]
    for num, den in pairs:
        if num in med and den in med:
            print(f"step time {num} / {den}: {med[num] / med[den]:.2f}x")


if __name__ == "__main__":
    main()
