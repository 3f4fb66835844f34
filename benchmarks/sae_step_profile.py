"""Where a TopK training step of xsae spends its time, phase by phase, and what the top-k could cost.

Three measurements per shape, for issue 22's part 3 (speed where the GPU profile says), made in the
same process as the throughput table (``sae_throughput.py --breakdown FILE``):

1. **Phases** of one training step as the benchmark drives it (auto bf16 selection, fused Adam):
   the encoder matmul (``_pre``), the top-k (``_select``), the exact values (``_GatherLinear``
   forward: the sampled products after a bf16 selection), the sparse decode (``_SparseDecode``
   forward), the rest of the forward (loss, AuxK), the two sparse backwards, the rest of the
   backward, and the optimizer (gradient projection, Adam, decoder renorm, firing counts). On CUDA
   each phase is bracketed by CUDA events and the medians over the timed steps are reported with
   their sum beside the step's own median (events add a few microseconds). Repeated at 4x the batch
   for the first shape: whether larger batches amortise the fixed costs.
2. **Kernels**: ``torch.profiler`` over a few steps, the top kernels by self device time (CPU time on
   a CPU): an independent view of the same step.
3. **Top-k variants** on pre-activations shaped like the step's (``[batch, d_sae]``, normal data):
   ``torch.topk`` on fp32 and on bf16 (what the bf16 selection path runs), and an exact two-stage
   grouped top-k (top k in each of G groups, then top k of the G*k candidates), each checked to
   select the same values as ``torch.topk``.

And :func:`matmul_throughput`, the encoder-matmul roofline (also used by ``sae_throughput.py``).
Everything is timed on data that is not zeros, warmed up, with the median of many repetitions, as
the device notes of this workplace ask; inputs rotate over three buffers so repeated matmuls do not
time the L2 cache.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from xsae_cli.sae import models


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Named spans of device time: CUDA events on a GPU, ``perf_counter`` (after a drain) elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, Any, Any]] = []

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = self._now()
        try:
            yield
        finally:
            self.spans.append((name, start, self._now()))

    def collect(self) -> dict[str, float]:
        """Milliseconds per name since the last collect (names that recur are summed)."""
        _sync(self.device)
        out: dict[str, float] = {}
        for name, a, b in self.spans:
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[name] = out.get(name, 0.0) + ms
        self.spans.clear()
        return out


def time_median(fn: Any, device: torch.device, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup`` (CUDA events on a GPU)."""
    timer = PhaseTimer(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        with timer.span("x"):
            fn()
        times.append(timer.collect()["x"] / 1e3)
    return statistics.median(times)


def matmul_throughput(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, reps: int = 30) -> dict[str, float]:
    """Median time and TFLOP/s of ``[m, k] @ [k, n]`` (plus a bias row, as ``addmm`` in the encoder)."""
    g = torch.Generator(device=device).manual_seed(0)
    sets = [(torch.randn(m, k, generator=g, device=device).to(dtype), torch.randn(k, n, generator=g, device=device).to(dtype)) for _ in range(3)]
    bias = torch.randn(n, generator=g, device=device).to(dtype)
    out = torch.empty(m, n, dtype=dtype, device=device)
    turn = [0]

    def run() -> None:
        a, b = sets[turn[0] % 3]
        turn[0] += 1
        torch.addmm(bias, a, b, out=out)

    seconds = time_median(run, device, reps=reps)
    return {"seconds": seconds, "tflops": 2.0 * m * k * n / seconds / 1e12}


# ----------------------------------------------------------------------------------------------
# 1. Phases of a training step
# ----------------------------------------------------------------------------------------------

PHASES = ("encoder_matmul", "topk", "values", "sparse_decode", "forward_other", "decode_backward", "encoder_backward", "backward_other", "optimizer")


@contextmanager
def _instrumented(sae: models.SparseAutoencoder, timer: PhaseTimer) -> Iterator[None]:
    """Time ``sae``'s encoder matmul and top-k, and both sparse autograd functions, into ``timer``."""
    pre, select = sae._pre, sae._select

    def timed_pre(*a: Any, **kw: Any) -> Any:
        with timer.span("encoder_matmul"):
            return pre(*a, **kw)

    def timed_select(*a: Any, **kw: Any) -> Any:
        with timer.span("topk"):
            return select(*a, **kw)

    saved = [(cls, name, cls.__dict__[name]) for cls in (models._GatherLinear, models._SparseDecode) for name in ("forward", "backward")]
    labels = {
        (models._GatherLinear, "forward"): "values",
        (models._SparseDecode, "forward"): "sparse_decode",
        (models._GatherLinear, "backward"): "encoder_backward",
        (models._SparseDecode, "backward"): "decode_backward",
    }

    def wrap(fn: Any, label: str) -> Any:
        def timed(*a: Any, **kw: Any) -> Any:
            with timer.span(label):
                return fn(*a, **kw)

        return staticmethod(timed)

    sae._pre, sae._select = timed_pre, timed_select  # type: ignore[method-assign]
    for cls, name, method in saved:
        setattr(cls, name, wrap(method.__func__, labels[(cls, name)]))
    try:
        yield
    finally:
        for cls, name, method in saved:
            setattr(cls, name, method)
        del sae._pre, sae._select


def train_step(sae: models.SparseAutoencoder, opt: Any, tracker: Any, x: torch.Tensor, span: Callable[[str], AbstractContextManager[Any]] | None = None) -> None:
    """One TopK training step as xsae's trainer drives it (the benchmark's xsae runner and this profile),
    its three parts in ``span("forward")``, ``span("backward")``, ``span("optimizer")``."""
    span = span or (lambda _name: nullcontext())
    with span("forward"):
        out = sae.training_forward(x, dead_mask=tracker.dead_mask(sae.cfg.dead_tokens_threshold))
    with span("backward"):
        out.loss.backward()
    with span("optimizer"):
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
        tracker.update(out.fired, x.shape[0])


def _xsae_step(d_in: int, d_sae: int, k: int, batch: int, device: torch.device) -> tuple[Any, Any, Any, torch.Tensor]:
    from sae_throughput import synthetic_acts

    from xsae_cli.sae.metrics import FiringTracker

    x = synthetic_acts(4 * batch, d_in, n_features=2 * d_sae, device=device, seed=1)
    sae = models.create_sae(models.SaeConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=k), device=device, seed=0)
    sae.init_b_dec(x[:batch])
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, fused=True)  # as sae_throughput.py's xsae:adam
    return sae, opt, FiringTracker(d_sae, device=device), x


def step_phases(d_in: int, d_sae: int, k: int, batch: int, device: torch.device, steps: int = 12, warmup: int = 3) -> dict[str, Any]:
    """Median milliseconds per phase of xsae's TopK step, and the step's own median without timers."""
    sae, opt, tracker, x = _xsae_step(d_in, d_sae, k, batch, device)
    timer = PhaseTimer(device)
    batches = [x[i * batch : (i + 1) * batch] for i in range(4)]

    plain = time_median(lambda: train_step(sae, opt, tracker, batches[0]), device, reps=steps, warmup=warmup)
    per_step: list[dict[str, float]] = []
    with _instrumented(sae, timer):
        for i in range(warmup + steps):
            train_step(sae, opt, tracker, batches[i % 4], timer.span)
            got = timer.collect()
            if i >= warmup:
                per_step.append(got)
    med = {name: statistics.median(s.get(name, 0.0) for s in per_step) for name in {n for s in per_step for n in s}}
    phases = {
        "encoder_matmul": med.get("encoder_matmul", 0.0),
        "topk": med.get("topk", 0.0),
        "values": med.get("values", 0.0),
        "sparse_decode": med.get("sparse_decode", 0.0),
        "decode_backward": med.get("decode_backward", 0.0),
        "encoder_backward": med.get("encoder_backward", 0.0),
        "optimizer": med.get("optimizer", 0.0),
    }
    phases["forward_other"] = med["forward"] - sum(phases[n] for n in ("encoder_matmul", "topk", "values", "sparse_decode"))
    phases["backward_other"] = med["backward"] - phases["decode_backward"] - phases["encoder_backward"]
    total = sum(phases.values())
    return {
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "batch": batch,
        "bf16_selection": sae.use_bf16_encoder,
        "backend": sae.sparse_backend,
        "phases_ms": {n: phases[n] for n in PHASES},
        "phases_sum_ms": total,
        "step_ms": plain * 1e3,
        "tokens_per_s": batch / plain,
    }


# ----------------------------------------------------------------------------------------------
# 2. Kernels
# ----------------------------------------------------------------------------------------------


def kernel_table(d_in: int, d_sae: int, k: int, batch: int, device: torch.device, steps: int = 4, rows: int = 25) -> str:
    """torch.profiler's table of the top kernels (self device time) over ``steps`` training steps."""
    from torch.profiler import ProfilerActivity, profile

    sae, opt, tracker, x = _xsae_step(d_in, d_sae, k, batch, device)
    for _ in range(2):
        train_step(sae, opt, tracker, x[:batch])
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(sae, opt, tracker, x[:batch])
        _sync(device)
    events = prof.key_averages()
    if device.type == "cuda":
        key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    else:
        key = "self_cpu_time_total"
    return f"{steps} steps, sorted by {key}\n" + events.table(sort_by=key, row_limit=rows, max_name_column_width=70)


# ----------------------------------------------------------------------------------------------
# 3. Top-k variants
# ----------------------------------------------------------------------------------------------


def grouped_topk(pre: torch.Tensor, k: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k per row in two stages: top k of each of ``groups`` column blocks, then of those."""
    n, m = pre.shape
    width = m // groups
    vals, idx = pre.view(n, groups, width).topk(k, dim=-1, sorted=False)
    idx = idx + torch.arange(0, m, width, device=pre.device).view(1, groups, 1)
    top, pick = vals.reshape(n, groups * k).topk(k, dim=-1, sorted=False)
    return top, idx.reshape(n, groups * k).gather(1, pick)


def topk_variants(batch: int, d_sae: int, k: int, device: torch.device, reps: int = 20) -> list[dict[str, Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    pre32 = torch.randn(batch, d_sae, generator=g, device=device)
    ref_vals = pre32.topk(k, dim=-1).values  # sorted, the values any exact top-k must pick
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        pre = pre32.to(dtype)
        expect = ref_vals.to(dtype) if dtype == torch.float32 else pre.topk(k, dim=-1).values
        candidates = [("torch.topk", lambda p=pre: p.topk(k, dim=-1, sorted=False))]
        for groups in (8, 16, 32, 64):
            if d_sae % groups == 0 and d_sae // groups >= k:
                candidates.append((f"grouped G={groups}", lambda p=pre, gr=groups: grouped_topk(p, k, gr)))
        for name, fn in candidates:
            vals, idx = fn()
            exact = bool(torch.equal(vals.sort(dim=-1, descending=True).values, expect)) and bool(torch.equal(pre.gather(1, idx), vals))
            seconds = time_median(fn, device, reps=reps)
            rows.append({"dtype": str(dtype).replace("torch.", ""), "method": name, "ms": seconds * 1e3, "exact": exact})
    return rows


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _phase_lines(r: dict[str, Any]) -> list[str]:
    lines = [
        (
            f"xsae TopK step, d_in {r['d_in']}, d_sae {r['d_sae']}, k {r['k']}, batch {r['batch']} (bf16 selection: {r['bf16_selection']}, backend {r['backend']}): "
            f"step {r['step_ms']:.2f} ms = {r['tokens_per_s']:,.0f} tokens/s; phases sum {r['phases_sum_ms']:.2f} ms"
        )
    ]
    for name in PHASES:
        ms = r["phases_ms"][name]
        lines.append(f"  {name:<17} {ms:8.3f} ms {100 * ms / max(r['phases_sum_ms'], 1e-9):5.1f} %")
    return lines


def _guarded(what: str, fn: Callable[[], Any], errors: list[str]) -> Any:
    """``fn()``, or None with the error kept: one part failing on a one-shot GPU run spares the others."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported in the file and the JSON, not raised
        errors.append(f"{what}: {type(exc).__name__}: {exc}")
        print(f"profile: {errors[-1]}", flush=True)
        return None


def profile_report(shapes: list[tuple[int, int, int, int]], device: torch.device, path: Path) -> dict[str, Any]:
    """All three measurements for each (d_in, d_sae, k, batch); text into ``path``, results returned."""
    errors: list[str] = []
    report: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "shapes": [], "errors": errors}
    text: list[str] = []
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        report["bf16_matmul_8192"] = _guarded("bf16 matmul", lambda: matmul_throughput(8192, 8192, 8192, torch.bfloat16, device, reps=10), errors)
        if report["bf16_matmul_8192"]:
            text.append(f"bf16 8192^3 matmul: {report['bf16_matmul_8192']['tflops']:.0f} TFLOP/s")
    text.insert(0, f"device {device} ({report.get('gpu', 'cpu')}), torch {torch.__version__}")
    for i, (d_in, d_sae, k, batch) in enumerate(shapes):
        entry: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "k": k, "batch": batch}
        batches = [batch, 4 * batch] if i == 0 else [batch]
        phases = [_guarded(f"phases {d_in}x{d_sae} batch {b}", partial(step_phases, d_in, d_sae, k, b, device), errors) for b in batches]
        entry["phases"] = [p for p in phases if p]
        entry["topk"] = _guarded(f"top-k {batch}x{d_sae}", partial(topk_variants, batch, d_sae, k, device), errors) or []
        entry["kernels"] = _guarded(f"kernels {d_in}x{d_sae}", partial(kernel_table, d_in, d_sae, k, batch, device), errors) or "(kernel table failed)"
        report["shapes"].append(entry)
        lines = [""]
        for r in entry["phases"]:
            lines.extend(_phase_lines(r))
        lines.append(f"top-k over [{batch}, {d_sae}], k {k}:")
        lines.extend(f"  {t['dtype']:<9} {t['method']:<13} {t['ms']:8.3f} ms  exact: {t['exact']}" for t in entry["topk"])
        print("\n".join(lines), flush=True)  # the kernel table goes to the file only
        text.extend([*lines, entry["kernels"]])
    text.extend(f"ERROR {e}" for e in errors)
    path.write_text("\n".join(text) + "\n")
    return report
