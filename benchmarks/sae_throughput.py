"""TopK SAE training throughput: xsae against EleutherAI's sparsify and SAELens, same data, same steps.

Every implementation trains on the same in-memory activations, batch by batch in the same order,
and the implementations take turns step by step, so that a machine shared with other work slows
them all alike. Reported per implementation:

- tokens/s: batch size / median step time over the timed steps (the first ``--warmup`` steps
  are run but not timed), and the mean-based figure beside it;
- held-out FVU: sum of squared errors / total variance about the per-dimension mean, over a
  held-out set never trained on (one computation over the whole set);
- dead %: latents that fire on no token of the held-out set;
- ratio: ours / peer tokens/s for runs that share an optimizer.

Optimizers: ``adam`` is ``torch.optim.Adam(lr=3e-4, fused=True)`` for both xsae and sparsify
(a same-optimizer comparison of the models); ``signum`` is sparsify's default as its Trainer
builds it (``ScheduleFreeWrapper(SignSGD, momentum=0.95)``, lr ``5e-3 / sqrt(d_sae / 2**14)``),
given to xsae too. SAELens runs through ``SAETrainer.step`` with its own Adam (3e-4).

Activations: ``$XSAE_BENCH_ACTS`` may name a safetensors file with a tensor ``acts [n, d_in]``
(real model activations, e.g. SmolLM2-135M resid_post once xsae's activation store writes
them); otherwise synthetic heavy-tailed sparse-dictionary data is generated (see
:func:`synthetic_acts`).

Run: ``.venv/bin/python benchmarks/sae_throughput.py`` (both shapes, ~5 minutes on 2 cores) or
``--shape small`` / ``--shape large``; ``--json FILE`` writes the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from xsae_cli.sae.models import SaeConfig, create_sae

SHAPES = {
    # name: (d_in, d_sae, k, batch, training tokens)
    "small": (576, 4608, 32, 4096, 40 * 4096),
    "large": (768, 24576, 32, 8192, 8 * 8192),
    # for checks that need many steps cheaply (e.g. bf16-encoder FVU parity on a CPU without bf16)
    "tiny": (64, 512, 8, 1024, 150 * 1024),
}
HELD_OUT = 8192


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def synthetic_acts(n: int, d_in: int, n_features: int, seed: int = 0, mean_active: float = 40.0) -> torch.Tensor:
    """Activations made like a residual stream is believed to be made: sparse sums of directions.

    A ground-truth dictionary of ``n_features`` unit directions (more than the SAE has latents),
    Zipf-distributed feature frequencies (a few common, a long tail of rare ones), ~``mean_active``
    active features per token with exponential x log-normal magnitudes, a per-token log-normal
    norm factor (heavy-tailed token norms), a shared offset (activations are not centred), and
    a little Gaussian noise no dictionary explains.
    """
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_features, d_in, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    freq = 1.0 / (torch.arange(n_features, dtype=torch.float64) + 10.0) ** 1.1
    freq = (freq / freq.sum()).float()
    offset = torch.randn(d_in, generator=g) * 0.5
    draws = 64
    out = torch.empty(n, d_in)
    for s in range(0, n, 8192):
        m = min(8192, n - s)
        idx = torch.multinomial(freq, m * draws, replacement=True, generator=g).view(m, draws)
        keep = (torch.rand(m, draws, generator=g) < mean_active / draws).float()
        mag = torch.empty(m, draws).exponential_(1.0, generator=g) * torch.exp(0.5 * torch.randn(m, draws, generator=g))
        x = torch.nn.functional.embedding_bag(idx, dictionary, per_sample_weights=keep * mag, mode="sum")
        x *= torch.exp(0.3 * torch.randn(m, 1, generator=g))
        x += offset + 0.05 * torch.randn(m, d_in, generator=g)
        out[s : s + m] = x
    return out


def load_acts(d_in: int, d_sae: int, n_train: int, n_eval: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    path = os.environ.get("XSAE_BENCH_ACTS")
    if path:
        from safetensors.torch import load_file

        acts = load_file(path)["acts"].float()
        acts = acts.reshape(-1, acts.shape[-1])
        if acts.shape[-1] != d_in:
            raise SystemExit(f"{path}: acts have d_in={acts.shape[-1]}, this shape needs {d_in}")
        g = torch.Generator().manual_seed(0)
        acts = acts[torch.randperm(acts.shape[0], generator=g)]
        need = n_train + n_eval
        if acts.shape[0] < need:
            reps = math.ceil(need / acts.shape[0])
            print(f"note: {path} holds {acts.shape[0]} tokens; training repeats them {reps}x", file=sys.stderr)
            train = acts[n_eval:].repeat(reps, 1)[:n_train]
        else:
            train = acts[n_eval:need]
        return train.contiguous(), acts[:n_eval].contiguous(), f"real ({Path(path).name})"
    acts = synthetic_acts(n_train + n_eval, d_in, n_features=2 * d_sae)
    return acts[:n_train].contiguous(), acts[n_train:].contiguous(), "synthetic sparse-dictionary"


# ----------------------------------------------------------------------------------------------
# Runners: one per implementation x optimizer
# ----------------------------------------------------------------------------------------------


def signum_lr(d_sae: int) -> float:
    """sparsify's Trainer default for signum."""
    return 5e-3 / (d_sae / (2**14)) ** 0.5


def make_signum(params: Any, d_sae: int) -> Any:
    from schedulefree import ScheduleFreeWrapper
    from sparsify.sign_sgd import SignSGD

    opt = ScheduleFreeWrapper(SignSGD(params, lr=signum_lr(d_sae)), momentum=0.95)
    opt.train()
    return opt


@dataclass
class Runner:
    name: str
    optimizer: str
    step: Callable[[torch.Tensor], None]
    reconstruct: Callable[[torch.Tensor], torch.Tensor]
    fires: Callable[[torch.Tensor], torch.Tensor]  # [N, d_sae] -> bool per latent
    before_eval: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)


def xsae_runner(d_in: int, d_sae: int, k: int, optimizer: str, first: torch.Tensor, bf16: bool | None = None) -> Runner:
    """xsae's TopK SAE, trained the way a trainer drives it; ``bf16`` forces the bf16-encoder flag."""
    from xsae_cli.sae.metrics import FiringTracker

    cfg = SaeConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=k, bf16_encoder=bf16)
    sae = create_sae(cfg, seed=0)
    sae.init_b_dec(first)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, fused=True) if optimizer == "adam" else make_signum(sae.parameters(), d_sae)
    tracker = FiringTracker(d_sae)

    def step(x: torch.Tensor) -> None:
        out = sae.training_forward(x, dead_mask=tracker.dead_mask(cfg.dead_tokens_threshold))
        out.loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
        tracker.update(out.fired, x.shape[0])

    def before_eval() -> None:
        if hasattr(opt, "eval"):
            opt.eval()  # schedule-free: evaluate the averaged weights

    @torch.no_grad()
    def fires(x: torch.Tensor) -> torch.Tensor:
        return (sae.encode(x) > 0).any(0)

    name = "xsae" if bf16 is None else ("xsae-bf16" if bf16 else "xsae-fp32")
    return Runner(name, optimizer, step, torch.no_grad()(sae.forward), fires, before_eval)


def sparsify_runner(d_in: int, d_sae: int, k: int, optimizer: str, first: torch.Tensor) -> Runner:
    """sparsify's SparseCoder trained the way its Trainer does (fvu loss, auxk_alpha 0 by default)."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        sae.b_dec.data = first.mean(0)  # sparsify's Trainer: b_dec from the first batch's mean
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, fused=True) if optimizer == "adam" else make_signum(sae.parameters(), d_sae)

    def step(x: torch.Tensor) -> None:
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=None)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    def before_eval() -> None:
        if hasattr(opt, "eval"):
            opt.eval()

    @torch.no_grad()
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return sae(x).sae_out

    @torch.no_grad()
    def fires(x: torch.Tensor) -> torch.Tensor:
        enc = sae.encode(x)
        fired = torch.zeros(d_sae, dtype=torch.bool)
        fired[enc.top_indices[enc.top_acts > 0]] = True
        return fired

    return Runner("sparsify", optimizer, step, reconstruct, fires, before_eval)


def saelens_runner(d_in: int, d_sae: int, k: int, n_tokens: int, batch: int) -> Runner:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device="cpu", dtype="float32"))
    cfg = SAETrainerConfig(total_training_samples=n_tokens, train_batch_size_samples=batch, lr=3e-4, lr_end=3e-4, device="cpu")
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))

    def step(x: torch.Tensor) -> None:
        trainer.step(x)
        trainer.n_training_steps += 1

    @torch.no_grad()
    def fires(x: torch.Tensor) -> torch.Tensor:
        return (sae.encode(x) > 0).any(0)

    return Runner("saelens", "adam", step, torch.no_grad()(sae.forward), fires)


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def held_out(runner: Runner, x: torch.Tensor) -> tuple[float, float]:
    from xsae_cli.sae.metrics import RunningStats

    runner.before_eval()
    stats = RunningStats(x.shape[1])
    fired = None
    for s in range(0, x.shape[0], 2048):
        xb = x[s : s + 2048]
        stats.update(xb, runner.reconstruct(xb))
        f = runner.fires(xb)
        fired = f if fired is None else fired | f
    assert fired is not None
    return stats.fvu(), 100.0 * float((~fired).float().mean())


def run_shape(name: str, runners_wanted: list[str], warmup: int, tokens: int | None) -> dict[str, Any]:
    d_in, d_sae, k, batch, n_tokens = SHAPES[name]
    n_tokens = tokens or n_tokens
    steps = n_tokens // batch
    train, evalset, source = load_acts(d_in, d_sae, steps * batch, HELD_OUT)
    first = train[:batch]
    runners: list[Runner] = []
    for want in runners_wanted:
        impl, _, opt = want.partition(":")
        if impl in ("xsae", "xsae-bf16", "xsae-fp32"):
            runners.append(xsae_runner(d_in, d_sae, k, opt, first, bf16={"xsae": None, "xsae-bf16": True, "xsae-fp32": False}[impl]))
        elif impl == "sparsify":
            runners.append(sparsify_runner(d_in, d_sae, k, opt, first))
        elif impl == "saelens":
            runners.append(saelens_runner(d_in, d_sae, k, steps * batch, batch))
        else:
            raise SystemExit(f"unknown runner {want}")
    print(f"\n[{name}] d_in={d_in} d_sae={d_sae} k={k} batch={batch} steps={steps} ({steps * batch} tokens, {warmup} untimed), data: {source}", flush=True)
    for i in range(steps):
        xb = train[i * batch : (i + 1) * batch]
        last = []
        for r in runners:
            t0 = time.perf_counter()
            r.step(xb)
            last.append(time.perf_counter() - t0)
            if i >= warmup:
                r.times.append(last[-1])
        if i == 0 or (i + 1) % 10 == 0 or i == steps - 1:
            print(f"  step {i + 1}/{steps}: " + ", ".join(f"{r.name}:{r.optimizer} {dt:.2f}s" for r, dt in zip(runners, last)), flush=True)
    rows = []
    for r in runners:
        fvu, dead = held_out(r, evalset)
        med = statistics.median(r.times)
        rows.append({"impl": r.name, "optimizer": r.optimizer, "tokens_per_s": batch / med, "tokens_per_s_mean": batch * len(r.times) / sum(r.times), "fvu": fvu, "dead_pct": dead, "steps_timed": len(r.times)})
    for row in rows:
        ours = next((o for o in rows if o["impl"].startswith("xsae") and o["optimizer"] == row["optimizer"]), None)
        row["ours_over_this"] = ours["tokens_per_s"] / row["tokens_per_s"] if ours and not row["impl"].startswith("xsae") else None
    return {"shape": name, "d_in": d_in, "d_sae": d_sae, "k": k, "batch": batch, "tokens": steps * batch, "data": source, "rows": rows}


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['shape']}: d_in {result['d_in']}, d_sae {result['d_sae']}, k {result['k']}, batch {result['batch']}, {result['tokens']} tokens, {result['data']}")
    print(f"| {'implementation':<10} | {'optimizer':<9} | {'tokens/s (median)':>17} | {'tokens/s (mean)':>15} | {'held-out FVU':>12} | {'dead %':>6} | {'xsae / this':>11} |")
    print(f"|{'-' * 12}|{'-' * 11}|{'-' * 19}|{'-' * 17}|{'-' * 14}|{'-' * 8}|{'-' * 13}|")
    for r in result["rows"]:
        ratio = f"{r['ours_over_this']:.2f}x" if r["ours_over_this"] else ""
        print(f"| {r['impl']:<10} | {r['optimizer']:<9} | {r['tokens_per_s']:>17,.0f} | {r['tokens_per_s_mean']:>15,.0f} | {r['fvu']:>12.4f} | {r['dead_pct']:>6.1f} | {ratio:>11} |")


def machine() -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "load_avg_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["small", "large", "tiny", "both"], default="both", help="both = small + large")
    ap.add_argument("--runners", default=None, help="comma list of impl:optimizer (default: per shape)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=None, help="training tokens per run (default: per shape)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, one per core)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from xsae_cli.sae.models import bf16_encoder_is_fast

    # Where bf16 is the default (AVX512-BF16/AMX CPUs), show the fp32 encoder beside it.
    extra = ",xsae-fp32:adam" if bf16_encoder_is_fast("cpu") else ""
    defaults = {
        "small": "xsae:adam,sparsify:adam,xsae:signum,sparsify:signum,saelens:adam" + extra,
        "large": "xsae:adam,sparsify:adam,xsae:signum,sparsify:signum" + extra,
        "tiny": "xsae-fp32:adam,xsae-bf16:adam,sparsify:adam",
    }
    info = machine()
    print(f"machine: {info}")
    results = []
    for shape in (["small", "large"] if args.shape == "both" else [args.shape]):
        wanted = (args.runners or defaults[shape]).split(",")
        results.append(run_shape(shape, wanted, args.warmup, args.tokens))
        print_table(results[-1])
    info["load_avg_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=2))
    for res in results:
        print_table(res)
    print(f"\nload average at start {info['load_avg_start']}, at end {info['load_avg_end']}")


if __name__ == "__main__":
    main()
