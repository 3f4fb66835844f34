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

On a GPU (``--device cuda``): every step is timed between two ``torch.cuda.synchronize()`` calls,
data and held-out set live on the GPU, sparsify runs its Triton decoder under its own bf16 autocast,
SAELens runs with ``autocast=True``, and each row also gets

- peak MiB: what the implementation holds (weights, optimizer state, buffers) plus the largest
  transient allocation of one of its steps, from ``torch.cuda.max_memory_allocated`` (the process's
  own peak, data included, is printed below the table);
- % roofline (``--roofline``): tokens/s over the encoder-matmul roofline, ``batch / t`` with ``t`` the
  median time of the bf16 ``[batch, d_in] x [d_in, d_sae]`` matmul measured on the same GPU (the one
  dense product a TopK step cannot avoid). On a CPU the matmul is timed in the dtype xsae's encoder
  uses there.

Run: ``.venv/bin/python benchmarks/sae_throughput.py`` (both CPU shapes, ~5 minutes on 2 cores) or
``--shape small`` / ``--shape large``; on a GPU ``--device cuda --shape gpu --roofline`` (the
``gpu-768`` and ``gpu-2048`` shapes of issue 22; ``benchmarks/gpu_check.sh`` runs it, with
``--breakdown``: the per-phase step profile of :mod:`sae_step_profile`). ``--json FILE`` writes the
results as JSON.
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
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

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
    # issue 22's GPU shapes: ~2 s and ~6 s of xsae steps on an H100-class GPU
    "gpu-768": (768, 24576, 32, 8192, 200 * 8192),
    "gpu-2048": (2048, 65536, 64, 8192, 100 * 8192),
    # benchmarks/gpu_check.sh --dry-run: the GPU run's steps at a size a CPU does in seconds
    "dry": (32, 256, 8, 256, 6 * 256),
}
GROUPS = {"both": ["small", "large"], "gpu": ["gpu-768", "gpu-2048"]}
HELD_OUT = 8192


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def synthetic_acts(n: int, d_in: int, n_features: int, seed: int = 0, mean_active: float = 40.0, device: str | torch.device = "cpu") -> torch.Tensor:
    """Activations made like a residual stream is believed to be made: sparse sums of directions.

    A ground-truth dictionary of ``n_features`` unit directions (more than the SAE has latents),
    Zipf-distributed feature frequencies (a few common, a long tail of rare ones), ~``mean_active``
    active features per token with exponential x log-normal magnitudes, a per-token log-normal
    norm factor (heavy-tailed token norms), a shared offset (activations are not centred), and
    a little Gaussian noise no dictionary explains. Drawn on ``device`` (a GPU makes the 7 GB of
    the ``gpu-2048`` shape in a second; the numbers differ from the CPU's, the distribution not).
    """
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    kw: dict[str, Any] = {"generator": g, "device": dev}
    dictionary = torch.randn(n_features, d_in, **kw)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    freq = 1.0 / (torch.arange(n_features, dtype=torch.float64, device=dev) + 10.0) ** 1.1
    freq = (freq / freq.sum()).float()
    offset = torch.randn(d_in, **kw) * 0.5
    draws = 64
    out = torch.empty(n, d_in, device=dev)
    for s in range(0, n, 8192):
        m = min(8192, n - s)
        idx = torch.multinomial(freq, m * draws, replacement=True, generator=g).view(m, draws)
        keep = (torch.rand(m, draws, **kw) < mean_active / draws).float()
        mag = torch.empty(m, draws, device=dev).exponential_(1.0, generator=g) * torch.exp(0.5 * torch.randn(m, draws, **kw))
        x = torch.nn.functional.embedding_bag(idx, dictionary, per_sample_weights=keep * mag, mode="sum")
        x *= torch.exp(0.3 * torch.randn(m, 1, **kw))
        x += offset + 0.05 * torch.randn(m, d_in, **kw)
        out[s : s + m] = x
    return out


def load_acts(d_in: int, d_sae: int, n_train: int, n_eval: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, str]:
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
        return train.contiguous().to(device), acts[:n_eval].contiguous().to(device), f"real ({Path(path).name})"
    acts = synthetic_acts(n_train + n_eval, d_in, n_features=2 * d_sae, device=device)
    return acts[:n_train].contiguous(), acts[n_train:].contiguous(), "synthetic sparse-dictionary"


# ----------------------------------------------------------------------------------------------
# Runners: one per implementation x optimizer
# ----------------------------------------------------------------------------------------------


def signum_lr(d_sae: int) -> float:
    """sparsify's Trainer default for signum."""
    return 5e-3 / (d_sae / (2**14)) ** 0.5


def make_signum(params: Any, d_sae: int) -> Any:
    from schedulefree import ScheduleFreeWrapper

    try:
        from sparsify.sign_sgd import SignSGD
    except ImportError:  # sparsify absent (a GPU machine without its wheel): xsae's, the same update
        from xsae_cli.sae.train import SignSGD

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
    resident_bytes: int = 0  # CUDA: weights, optimizer state and buffers it keeps
    step_peak_bytes: int = 0  # CUDA: largest transient allocation of one step


def xsae_runner(d_in: int, d_sae: int, k: int, optimizer: str, first: torch.Tensor, bf16: bool | None = None) -> Runner:
    """xsae's TopK SAE, trained the way a trainer drives it; ``bf16`` forces the bf16-encoder flag."""
    from sae_step_profile import train_step

    from xsae_cli.sae.metrics import FiringTracker

    cfg = SaeConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=k, bf16_encoder=bf16)
    sae = create_sae(cfg, device=first.device, seed=0)
    sae.init_b_dec(first)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, fused=True) if optimizer == "adam" else make_signum(sae.parameters(), d_sae)
    tracker = FiringTracker(d_sae, device=first.device)

    def step(x: torch.Tensor) -> None:
        train_step(sae, opt, tracker, x)

    def before_eval() -> None:
        if hasattr(opt, "eval"):
            opt.eval()  # schedule-free: evaluate the averaged weights

    @torch.no_grad()
    def fires(x: torch.Tensor) -> torch.Tensor:
        return (sae.encode(x) > 0).any(0)

    name = "xsae" if bf16 is None else ("xsae-bf16" if bf16 else "xsae-fp32")
    return Runner(name, optimizer, step, torch.no_grad()(sae.forward), fires, before_eval)


def sparsify_runner(d_in: int, d_sae: int, k: int, optimizer: str, first: torch.Tensor) -> Runner:
    """sparsify's SparseCoder trained the way its Trainer does (fvu loss, auxk_alpha 0 by default).

    On CUDA its forward runs under its own bf16 autocast with its Triton decoder, as in its Trainer.
    """
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    device = first.device
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device=device, dtype=torch.float32)
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
        fired = torch.zeros(d_sae, dtype=torch.bool, device=device)
        fired[enc.top_indices[enc.top_acts > 0]] = True
        return fired

    return Runner("sparsify", optimizer, step, reconstruct, fires, before_eval)


def saelens_runner(d_in: int, d_sae: int, k: int, n_tokens: int, batch: int, device: torch.device) -> Runner:
    """SAELens's TopK training SAE through ``SAETrainer.step`` (its own Adam; autocast on CUDA)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=str(device), dtype="float32"))
    cfg = SAETrainerConfig(total_training_samples=n_tokens, train_batch_size_samples=batch, lr=3e-4, lr_end=3e-4, device=str(device), autocast=device.type == "cuda")
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))

    def step(x: torch.Tensor) -> None:
        trainer.step(x)
        trainer.n_training_steps += 1

    @torch.no_grad()
    def fires(x: torch.Tensor) -> torch.Tensor:
        return (sae.encode(x) > 0).any(0)

    return Runner("saelens", "adam", step, torch.no_grad()(sae.forward), fires)


def make_runner(want: str, d_in: int, d_sae: int, k: int, first: torch.Tensor, n_tokens: int, batch: int) -> Runner:
    impl, _, opt = want.partition(":")
    if impl in ("xsae", "xsae-bf16", "xsae-fp32"):
        return xsae_runner(d_in, d_sae, k, opt, first, bf16={"xsae": None, "xsae-bf16": True, "xsae-fp32": False}[impl])
    if impl == "sparsify":
        return sparsify_runner(d_in, d_sae, k, opt, first)
    if impl == "saelens":
        return saelens_runner(d_in, d_sae, k, n_tokens, batch, first.device)
    raise SystemExit(f"unknown runner {want}")


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(r: Runner, x: torch.Tensor) -> float:
    """One step's wall time, the device drained before and after; on CUDA also its transient peak."""
    cuda = x.device.type == "cuda"
    sync(x.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
    t0 = time.perf_counter()
    r.step(x)
    sync(x.device)
    dt = time.perf_counter() - t0
    if cuda:
        r.step_peak_bytes = max(r.step_peak_bytes, torch.cuda.max_memory_allocated(x.device) - base)
    return dt


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


def encoder_roofline(d_in: int, d_sae: int, batch: int, device: torch.device) -> dict[str, Any]:
    """The encoder matmul alone, timed as a TopK step runs it: the bound on any exact TopK step."""
    from sae_step_profile import matmul_throughput

    from xsae_cli.sae.models import bf16_encoder_is_fast

    dtype = torch.bfloat16 if device.type == "cuda" or bf16_encoder_is_fast(device) else torch.float32
    m = matmul_throughput(batch, d_in, d_sae, dtype, device)
    return {"dtype": str(dtype).replace("torch.", ""), "seconds": m["seconds"], "tflops": m["tflops"], "tokens_per_s": batch / m["seconds"]}


def run_shape(name: str, runners_wanted: list[str], warmup: int, tokens: int | None, device: torch.device, n_eval: int = HELD_OUT, roofline: bool = False) -> dict[str, Any]:
    d_in, d_sae, k, batch, n_tokens = SHAPES[name]
    n_tokens = tokens or n_tokens
    steps = n_tokens // batch
    train, evalset, source = load_acts(d_in, d_sae, steps * batch, n_eval, device=device)
    first = train[:batch]
    cuda = device.type == "cuda"
    print(f"\n[{name}] d_in={d_in} d_sae={d_sae} k={k} batch={batch} steps={steps} ({steps * batch} tokens, {warmup} untimed), data: {source}, device: {device}", flush=True)
    runners: list[Runner] = []
    failed: dict[str, str] = {}  # a runner that raises is dropped, the others go on (a GPU slot is not rerun lightly)

    def drop(r_name: str, exc: Exception) -> None:
        failed[r_name] = f"{type(exc).__name__}: {exc}"
        print(f"  {r_name} failed and is left out: {failed[r_name]}", flush=True)

    for want in runners_wanted:
        # Built and stepped once (untimed, step 1) one after another, so that each one's own
        # memory shows: what it keeps, and the transient peak of a step.
        sync(device)
        before = torch.cuda.memory_allocated(device) if cuda else 0
        try:
            r = make_runner(want, d_in, d_sae, k, first, steps * batch, batch)
            dt = timed_step(r, first)
        except Exception as exc:  # noqa: BLE001 - see `failed`
            drop(want, exc)
            continue
        if warmup == 0:
            r.times.append(dt)
        if cuda:
            r.resident_bytes = torch.cuda.memory_allocated(device) - before
        runners.append(r)
    for i in range(1, steps):
        xb = train[i * batch : (i + 1) * batch]
        last = []
        for r in list(runners):
            try:
                last.append(timed_step(r, xb))
            except Exception as exc:  # noqa: BLE001 - see `failed`
                drop(f"{r.name}:{r.optimizer}", exc)
                runners.remove(r)
                continue
            if i >= warmup:
                r.times.append(last[-1])
        if i == 1 or (i + 1) % 20 == 0 or i == steps - 1:
            print(f"  step {i + 1}/{steps}: " + ", ".join(f"{r.name}:{r.optimizer} {dt * 1e3:.1f}ms" for r, dt in zip(runners, last)), flush=True)
    roof = None
    if roofline:
        try:
            roof = encoder_roofline(d_in, d_sae, batch, device)
        except Exception as exc:  # noqa: BLE001 - see `failed`
            drop("roofline", exc)
    rows = []
    for r in runners:
        try:
            fvu, dead = held_out(r, evalset)
        except Exception as exc:  # noqa: BLE001 - see `failed`
            drop(f"{r.name}:{r.optimizer}", exc)
            continue
        med = statistics.median(r.times)
        row = {
            "impl": r.name,
            "optimizer": r.optimizer,
            "tokens_per_s": batch / med,
            "tokens_per_s_mean": batch * len(r.times) / sum(r.times),
            "fvu": fvu,
            "dead_pct": dead,
            "steps_timed": len(r.times),
        }
        if cuda:
            row.update(resident_bytes=r.resident_bytes, step_peak_bytes=r.step_peak_bytes, peak_bytes=r.resident_bytes + r.step_peak_bytes)
        if roof:
            row["roofline_fraction"] = row["tokens_per_s"] / roof["tokens_per_s"]
        rows.append(row)
    for row in rows:
        ours = next((o for o in rows if o["impl"].startswith("xsae") and o["optimizer"] == row["optimizer"]), None)
        row["ours_over_this"] = ours["tokens_per_s"] / row["tokens_per_s"] if ours and not row["impl"].startswith("xsae") else None
    result = {"shape": name, "d_in": d_in, "d_sae": d_sae, "k": k, "batch": batch, "tokens": steps * batch, "data": source, "device": str(device), "rows": rows, "roofline": roof, "failed": failed}
    if cuda:
        result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)  # since the last step's reset: held-out pass included
        result["data_bytes"] = (train.numel() + evalset.numel()) * train.element_size()
    del train, evalset, runners
    return result


def print_table(result: dict[str, Any]) -> None:
    roof, cuda = result.get("roofline"), "max_memory_allocated_bytes" in result
    print(f"\n{result['shape']}: d_in {result['d_in']}, d_sae {result['d_sae']}, k {result['k']}, batch {result['batch']}, {result['tokens']} tokens, {result['data']}, {result.get('device', 'cpu')}")
    extra_h = (f" {'peak MiB':>8} |" if cuda else "") + (f" {'% roofline':>10} |" if roof else "")
    extra_l = ("-" * 10 + "|" if cuda else "") + ("-" * 12 + "|" if roof else "")
    print(f"| {'implementation':<10} | {'optimizer':<9} | {'tokens/s (median)':>17} | {'tokens/s (mean)':>15} | {'held-out FVU':>12} | {'dead %':>6} | {'xsae / this':>11} |{extra_h}")
    print(f"|{'-' * 12}|{'-' * 11}|{'-' * 19}|{'-' * 17}|{'-' * 14}|{'-' * 8}|{'-' * 13}|{extra_l}")
    for r in result["rows"]:
        ratio = f"{r['ours_over_this']:.2f}x" if r["ours_over_this"] else ""
        extra = (f" {r['peak_bytes'] / 2**20:>8,.0f} |" if cuda else "") + (f" {100 * r['roofline_fraction']:>9.1f}% |" if roof else "")
        print(f"| {r['impl']:<10} | {r['optimizer']:<9} | {r['tokens_per_s']:>17,.0f} | {r['tokens_per_s_mean']:>15,.0f} | {r['fvu']:>12.4f} | {r['dead_pct']:>6.1f} | {ratio:>11} |{extra}")
    if roof:
        print(
            f"encoder-matmul roofline: {roof['dtype']} [{result['batch']}, {result['d_in']}] x [{result['d_in']}, {result['d_sae']}] in {roof['seconds'] * 1e3:.3f} ms ({roof['tflops']:.1f} TFLOP/s) = {roof['tokens_per_s']:,.0f} tokens/s"
        )
    if cuda:
        print(f"torch.cuda.max_memory_allocated: {result['max_memory_allocated_bytes'] / 2**30:.2f} GiB (activations on the GPU: {result['data_bytes'] / 2**30:.2f} GiB)")
    for name, why in result.get("failed", {}).items():
        print(f"FAILED {name}: {why}")


def machine(device: torch.device) -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "load_avg_start": os.getloadavg(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, gpu_sms=props.multi_processor_count, cuda=torch.version.cuda, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    for pkg in ("eai-sparsify", "sae-lens", "triton", "schedulefree"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    return info


def default_runners(shape: str, device: torch.device) -> str:
    from xsae_cli.sae.models import bf16_encoder_is_fast

    # Where bf16 is the default (CUDA, AVX512-BF16/AMX CPUs), show the fp32 encoder beside it.
    extra = ",xsae-fp32:adam" if bf16_encoder_is_fast(device) else ""
    full = "xsae:adam,sparsify:adam,xsae:signum,sparsify:signum,saelens:adam"
    return {
        "small": full + extra,
        "large": "xsae:adam,sparsify:adam,xsae:signum,sparsify:signum" + extra,
        "tiny": "xsae-fp32:adam,xsae-bf16:adam,sparsify:adam",
    }.get(shape, full + extra)


def available(wanted: list[str]) -> list[str]:
    """Drop the runners of a peer that cannot be imported here, saying why (the GPU machine may lack one)."""
    keep = []
    for want in wanted:
        impl = want.partition(":")[0]
        module = {"sparsify": "sparsify", "saelens": "sae_lens.training.sae_trainer"}.get(impl)
        if module:
            try:
                __import__(module)
            except Exception as exc:  # noqa: BLE001 - any import-time failure of a peer skips it, never the run
                print(f"skipping {want}: cannot import {module} ({type(exc).__name__}: {exc})", flush=True)
                continue
        keep.append(want)
    return keep


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="both", help=f"comma list of {', '.join(SHAPES)}, or both (= small,large) or gpu (= gpu-768,gpu-2048)")
    ap.add_argument("--runners", default=None, help="comma list of impl:optimizer (default: per shape)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=None, help="training tokens per run (default: per shape)")
    ap.add_argument("--held-out", type=int, default=HELD_OUT, help="held-out tokens for FVU and dead %%")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--roofline", action="store_true", help="time the encoder matmul alone and report each row's fraction of it")
    ap.add_argument("--breakdown", default=None, metavar="FILE", help="after the table: xsae's step phase by phase, its kernels and top-k variants (sae_step_profile), into FILE")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, one per core)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if device.type == "cpu":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # read when sparsify is imported
    shapes = [n for part in args.shape.split(",") for n in GROUPS.get(part, [part])]
    unknown = [n for n in shapes if n not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}, both, gpu")
    info = machine(device)
    print(f"machine: {info}")
    results: list[dict[str, Any]] = []

    def write(breakdown: Any) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": info, "results": results, "breakdown": breakdown}, indent=2))

    failures = 0
    for shape in shapes:
        wanted = available((args.runners or default_runners(shape, device)).split(","))
        try:
            results.append(run_shape(shape, wanted, args.warmup, args.tokens, device, n_eval=args.held_out, roofline=args.roofline))
        except Exception as exc:  # noqa: BLE001 - the next shape still runs (an out-of-memory one, say)
            import traceback

            traceback.print_exc()
            results.append({"shape": shape, "error": f"{type(exc).__name__}: {exc}"})
            failures += 1
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        failures += bool(results[-1]["failed"])
        print_table(results[-1])
        write(None)  # kept should anything later fail
    info["load_avg_end"] = os.getloadavg()
    write(None)
    if args.breakdown:
        from sae_step_profile import profile_report

        try:
            report = profile_report([SHAPES[s][:4] for s in shapes], device, Path(args.breakdown))
            write(report)
            failures += bool(report["errors"])
        except Exception as exc:  # noqa: BLE001 - a one-shot GPU run keeps what it measured
            import traceback

            traceback.print_exc()
            write({"error": f"{type(exc).__name__}: {exc}"})
            failures += 1
    for res in results:
        if "error" in res:
            print(f"\n{res['shape']}: FAILED {res['error']}")
        else:
            print_table(res)
    print(f"\nload average at start {info['load_avg_start']}, at end {info['load_avg_end']}")
    if failures:
        raise SystemExit(f"{failures} shape(s), runner set(s) or profile(s) failed: see above")


if __name__ == "__main__":
    main()
