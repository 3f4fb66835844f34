"""The four SAE architectures behind one base class: ReLU-L1, TopK, BatchTopK and JumpReLU.

Every SAE has the same parameters, named and shaped as SAELens names them (``W_enc [d_in, d_sae]``,
``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``, plus ``threshold [d_sae]`` for JumpReLU and
BatchTopK), so SAELens's file layout is the native one and the rest of xsae can treat all four alike:
``encode`` / ``decode`` / ``forward`` for inference and splicing, ``training_forward`` for the trainer.

Why the TopK path looks the way it does: on a CPU the dense encoder matmul is the one cost that
cannot be avoided (every pre-activation must be seen to pick the top k). Everything else is sparse:
each token keeps k of d_sae latents, so the decoder, the decoder backward and the encoder backward
touch ``N * k`` entries, not ``N * d_sae``. Plain autograd would run three more dense
``[N, d_sae]`` matmuls for them; here they run as sparse products (``embedding_bag`` and a sampled
matmul on CPU/CUDA, gather/index_add elsewhere) through two small autograd functions,
:class:`_GatherLinear` and :class:`_SparseDecode`. BatchTopK and AuxK reuse the same two functions
with other sparsity patterns. The dense pre-activations go into a buffer reused between steps.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xsae_cli.core.errors import XsaeError

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
PARAM_DTYPES = ("float32", "float64", "bfloat16", "float16")
SPARSE_BACKENDS = ("auto", "bag", "gather")

#: Set to ``bag`` or ``gather`` to force one sparse backend (tests compare both on CPU).
SPARSE_BACKEND_ENV = "XSAE_SPARSE_BACKEND"
#: ``on`` / ``off`` decide what ``bf16_encoder = None`` (auto) means, whatever the hardware: the
#: test suite runs once each way, so a CPU without AVX512-BF16 exercises the path others take.
BF16_ENCODER_ENV = "XSAE_BF16_ENCODER"
BF16_MODES = ("auto", "on", "off")
#: Architectures whose training may select latents with a bf16 matmul by default. Their values are
#: recomputed exactly in fp32 after the selection, so bf16 moves only near-ties of the top-k;
#: benchmarks/bf16_encoder.py measures held-out FVU within seed noise of fp32 (RESULTS.md). ReLU
#: and JumpReLU would train on the bf16 values themselves and stay fp32 unless asked.
BF16_SELECTION_ARCHES = ("topk", "batchtopk")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class SaeConfig:
    """Everything that defines an SAE; it travels with the weights (``cfg.json``).

    The fields after ``metadata`` are xsae additions with defaults, so a config written by an
    older xsae or assembled from a SAELens file still loads.
    """

    arch: str
    d_in: int
    d_sae: int
    k: int | None = None  # topk, batchtopk: active latents per token (batchtopk: on average)
    l1_coefficient: float = 5.0  # relu: L1 weighted by decoder row norms
    l0_coefficient: float = 1e-3  # jumprelu: L0 through the straight-through estimator
    jumprelu_bandwidth: float = 1e-3
    jumprelu_init_threshold: float = 1e-3
    aux_k: int | None = None  # topk/batchtopk AuxK latents; None means d_in // 2
    aux_k_coefficient: float = 1 / 32
    dead_tokens_threshold: int = 1_000_000  # tokens without firing before a latent counts as dead
    normalize_activations: str = "none"
    apply_b_dec_to_input: bool = True
    dtype: str = "float32"
    metadata: dict = field(default_factory=dict)
    # -- xsae additions --
    batchtopk_threshold_lr: float = 0.01  # EMA rate of the inference threshold (SAELens's value)
    bf16_encoder: bool | None = None  # training only; None: see bf16_encoder_default. Inference is always exact
    norm_scaling_factor: float | None = None  # expected_average_only_in: set by fit_normalization

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse configs that cannot train, with the fix named (user input reaches here from TOML/CLI)."""
        if self.arch not in ARCHITECTURES:
            raise XsaeError(f"unknown SAE architecture '{self.arch}'", f"use one of {', '.join(ARCHITECTURES)}")
        if int(self.d_in) <= 0 or int(self.d_sae) <= 0:
            raise XsaeError(f"d_in and d_sae must be positive (got d_in={self.d_in}, d_sae={self.d_sae})", "check the SAE width settings")
        if self.arch in ("topk", "batchtopk"):
            if self.k is None or int(self.k) <= 0:
                raise XsaeError(f"a {self.arch} SAE needs k >= 1 active latents", "set k (e.g. k = 32)")
            if int(self.k) > int(self.d_sae):
                raise XsaeError(f"k={self.k} is larger than d_sae={self.d_sae}", "lower k or widen the SAE")
        if self.aux_k is not None and int(self.aux_k) <= 0:
            raise XsaeError(f"aux_k must be positive (got {self.aux_k})", "leave it unset for d_in // 2")
        if self.normalize_activations not in NORMALIZATIONS:
            raise XsaeError(f"unknown normalize_activations '{self.normalize_activations}'", f"use one of {', '.join(NORMALIZATIONS)}")
        if str(self.dtype).replace("torch.", "") not in PARAM_DTYPES:
            raise XsaeError(f"unknown SAE dtype '{self.dtype}'", f"use one of {', '.join(PARAM_DTYPES)}")
        if self.jumprelu_bandwidth <= 0:
            raise XsaeError(f"jumprelu_bandwidth must be positive (got {self.jumprelu_bandwidth})", "the paper's default is 1e-3")
        if not 0.0 < self.batchtopk_threshold_lr <= 1.0:
            raise XsaeError(f"batchtopk_threshold_lr must be in (0, 1] (got {self.batchtopk_threshold_lr})", "SAELens uses 0.01")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, str(self.dtype).replace("torch.", ""))

    @property
    def effective_aux_k(self) -> int:
        """AuxK latents per token: OpenAI's heuristic d_in // 2 unless set (Gao et al., App. B.1)."""
        return int(self.aux_k) if self.aux_k is not None else max(1, int(self.d_in) // 2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SaeConfig:
        """Build from a dict; an unknown key is an error that names the valid keys."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise XsaeError(f"unknown SAE config key(s): {', '.join(unknown)}", f"valid keys: {', '.join(known)}")
        return cls(**data)


@dataclass
class TrainOutput:
    """One training step's result; the trainer backpropagates ``loss`` and logs ``terms``."""

    x_hat: Tensor  # reconstruction in the input's units, [N, d_in]
    loss: Tensor  # scalar
    terms: dict[str, Tensor]  # detached scalars: mse, fvu, l0, and l1 / l0_loss / aux per architecture
    fired: Tensor  # int64 [d_sae]: tokens of this batch on which each latent fired (> 0)


# ----------------------------------------------------------------------------------------------
# Device capabilities
# ----------------------------------------------------------------------------------------------


def bf16_encoder_is_fast(device: torch.device | str) -> bool:
    """Whether a bf16 encoder matmul beats fp32 here.

    CUDA with bf16 support: yes (tensor cores). CPU: only with AVX512-BF16 or AMX; without them
    oneDNN emulates bf16 and one [4096, 576] x [576, 4608] matmul takes ~17 s instead of 0.14 s
    (measured on an AVX2 EPYC). MPS: off, its bf16 matmuls are not reliably faster.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False


def bf16_encoder_default(arch: str, device: torch.device | str) -> bool:
    """What ``bf16_encoder = None`` means: ``XSAE_BF16_ENCODER`` if set, else on for the
    architectures in :data:`BF16_SELECTION_ARCHES` where :func:`bf16_encoder_is_fast`."""
    forced = os.environ.get(BF16_ENCODER_ENV, "auto").strip().lower() or "auto"
    if forced not in BF16_MODES:
        raise XsaeError(f"{BF16_ENCODER_ENV}={forced} is not a bf16 encoder mode", f"use one of {', '.join(BF16_MODES)}")
    if forced != "auto":
        return forced == "on"
    return arch in BF16_SELECTION_ARCHES and bf16_encoder_is_fast(device)


def _sparse_backend(device: torch.device, dtype: torch.dtype) -> str:
    """``bag`` (embedding_bag + sampled matmul) on CPU and CUDA, ``gather`` (index_add) elsewhere.

    Measured on the benchmark shape (CPU, one thread): embedding_bag runs the sparse products in
    10-16 ms where CSR ``@`` takes 26-29 ms and index_add over ``[nnz, d_in]`` ~130 ms.
    """
    forced = os.environ.get(SPARSE_BACKEND_ENV, "auto").strip().lower()
    if forced not in SPARSE_BACKENDS:
        raise XsaeError(f"{SPARSE_BACKEND_ENV}={forced} is not a sparse backend", f"use one of {', '.join(SPARSE_BACKENDS)}")
    if forced != "auto":
        return forced
    if device.type in ("cpu", "cuda") and dtype in (torch.float32, torch.float64):
        return "bag"
    return "gather"


# ----------------------------------------------------------------------------------------------
# Sparse kernels
# ----------------------------------------------------------------------------------------------

_GATHER_CHUNK = 1 << 16  # entries per chunk in the gather backend: bounds its [chunk, d_in] temporaries


class _Pattern:
    """Where the nonzero codes of a batch sit: entry i is (rows[i], cols[i]), rows ascending.

    Built once per step and shared by the encoder and decoder backward, so the one sort that the
    transposed (per-latent) view needs is paid once.
    """

    def __init__(self, cols: Tensor, n_rows: int, n_cols: int, crow: Tensor, backend: str, rows: Tensor | None = None, per_row: int | None = None) -> None:
        self.cols = cols
        self.n_rows = n_rows
        self.n_cols = n_cols
        self.crow = crow
        self.backend = backend
        self._rows = rows
        self._per_row = per_row  # entries in every row (TopK, AuxK), whose columns come unsorted
        self._t: tuple[Tensor, Tensor, Tensor] | None = None
        self._sorted: tuple[Tensor, Tensor] | None = None

    @classmethod
    def from_topk(cls, idx: Tensor, n_cols: int, backend: str) -> _Pattern:
        """k entries per row: the pattern of a TopK (or AuxK) selection ``idx [N, k]``."""
        n, k = idx.shape
        crow = torch.arange(0, n * k + 1, k, device=idx.device)
        return cls(idx.reshape(-1), n, n_cols, crow, backend, per_row=k)

    @classmethod
    def from_flat(cls, flat: Tensor, n_rows: int, n_cols: int, backend: str) -> _Pattern:
        """Any pattern given as sorted flat indices ``row * n_cols + col`` (BatchTopK)."""
        rows = torch.div(flat, n_cols, rounding_mode="floor")
        cols = flat - rows * n_cols
        crow = torch.searchsorted(rows, torch.arange(n_rows + 1, device=flat.device))
        return cls(cols, n_rows, n_cols, crow, backend, rows=rows)

    @property
    def nnz(self) -> int:
        return self.cols.numel()

    @property
    def rows(self) -> Tensor:
        if self._rows is None:
            counts = self.crow[1:] - self.crow[:-1]
            self._rows = torch.repeat_interleave(torch.arange(self.n_rows, device=self.cols.device), counts, output_size=self.nnz)
        return self._rows

    def csr_mask(self, like: Tensor, sort: bool) -> tuple[Tensor, Tensor | None]:
        """The pattern as a zero-valued CSR tensor (``like``'s dtype and device), and ``order``: entry j
        of the tensor's values is entry ``order[j]`` of the pattern (None: the same order).

        torch's CSR invariant wants the columns of each row ascending, and cuSPARSE's SDDMM is
        specified for such CSR; a TopK selection (``topk(sorted=False)``) leaves them unsorted.
        ``sort`` sorts them (once per pattern; tens of microseconds on a GPU). The CPU kernel
        computes every entry on its own, needs no order (the tests compare it with dense autograd on
        unsorted patterns), and sorting [8192, 32] indices there costs ~40 ms on 2 cores, so CPU
        callers pass ``sort=False``. BatchTopK's patterns come sorted.
        """
        cols, order = self.cols, None
        if sort and self._per_row is not None and self._per_row > 1:
            if self._sorted is None:
                ascending, within = self.cols.view(self.n_rows, self._per_row).sort(dim=-1)
                self._sorted = (ascending.reshape(-1), (within + self.crow[:-1, None]).reshape(-1))
            cols, order = self._sorted
        with warnings.catch_warnings():  # PyTorch calls CSR "beta"; this use is checked by the tests
            warnings.simplefilter("ignore", UserWarning)
            mask = torch.sparse_csr_tensor(self.crow, cols, like.new_zeros(self.nnz), (self.n_rows, self.n_cols), check_invariants=False)
        return mask, order

    def transposed(self) -> tuple[Tensor, Tensor, Tensor]:
        """(order, crow_t, rows_t): the pattern sorted by latent, for products with G^T."""
        if self._t is None:
            order = torch.argsort(self.cols, stable=True)
            crow_t = torch.zeros(self.n_cols + 1, dtype=torch.long, device=self.cols.device)
            torch.cumsum(torch.bincount(self.cols, minlength=self.n_cols), 0, out=crow_t[1:])
            self._t = (order, crow_t, self.rows[order])
        return self._t


def _spmm(p: _Pattern, values: Tensor, dense: Tensor) -> Tensor:
    """G @ dense, with G [n_rows, n_cols] given by (p, values) and dense [n_cols, D] -> [n_rows, D]."""
    if p.backend == "bag":
        return F.embedding_bag(p.cols, dense, p.crow[:-1], mode="sum", per_sample_weights=values)
    out = dense.new_zeros(p.n_rows, dense.shape[1])
    rows, cols = p.rows, p.cols
    for s in range(0, p.nnz, _GATHER_CHUNK):
        sl = slice(s, s + _GATHER_CHUNK)
        out.index_add_(0, rows[sl], dense.index_select(0, cols[sl]) * values[sl, None])
    return out


def _spmm_t(p: _Pattern, values: Tensor, dense: Tensor) -> Tensor:
    """G^T @ dense, dense [n_rows, D] -> [n_cols, D]: the weight gradients of both sparse products."""
    if p.backend == "bag":
        order, crow_t, rows_t = p.transposed()
        return F.embedding_bag(rows_t, dense, crow_t[:-1], mode="sum", per_sample_weights=values.index_select(0, order))
    out = dense.new_zeros(p.n_cols, dense.shape[1])
    rows, cols = p.rows, p.cols
    for s in range(0, p.nnz, _GATHER_CHUNK):
        sl = slice(s, s + _GATHER_CHUNK)
        out.index_add_(0, cols[sl], dense.index_select(0, rows[sl]) * values[sl, None])
    return out


def _sddmm(p: _Pattern, a: Tensor, b: Tensor, sort: bool | None = None) -> Tensor:
    """(a @ b^T) sampled at the pattern: out[i] = a[rows[i]] . b[cols[i]]; a [n_rows, D], b [n_cols, D].

    The ``bag`` backend uses ``torch.sparse.sampled_addmm`` (no [nnz, D] temporary), on a CSR
    mask with sorted columns off the CPU (``sort``, see :meth:`_Pattern.csr_mask`); should a
    build lack it for this device or dtype, the chunked gather below gives the same numbers.
    """
    if p.backend == "bag":
        try:
            mask, order = p.csr_mask(a, sort=a.device.type != "cpu" if sort is None else sort)
            vals = torch.sparse.sampled_addmm(mask, a, b.t(), beta=0.0).values()
            return vals if order is None else torch.empty_like(vals).index_copy_(0, order, vals)
        except (RuntimeError, NotImplementedError):  # pragma: no cover - depends on the build
            pass
    out = a.new_empty(p.nnz)
    rows, cols = p.rows, p.cols
    for s in range(0, p.nnz, _GATHER_CHUNK):
        sl = slice(s, s + _GATHER_CHUNK)
        out[sl] = (a.index_select(0, rows[sl]) * b.index_select(0, cols[sl])).sum(-1)
    return out


class _GatherLinear(torch.autograd.Function):
    """``values = ((x - b_dec) @ W_enc + b_enc)[pattern]`` with a sparse backward.

    Only the selected pre-activations carry gradient, so ``grad W_enc = xc^T G`` with G holding
    ``nnz`` entries: one sparse product instead of a dense ``[d_in, N] x [N, d_sae]`` matmul. The
    input gradient is needed only summed over tokens (for ``b_dec``), which is
    ``W_enc @ colsum(G)``: a matrix-vector product, not ``[N, d_in]``.

    ``values`` may be passed in when the forward already computed them (the dense pre-activations
    of the selection); otherwise they are computed exactly in the weights' dtype (after a bf16
    selection).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, b_dec: Tensor | None, W_enc: Tensor, b_enc: Tensor, xc: Tensor, pattern: _Pattern, values: Tensor | None) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(xc, W_enc)
        if values is None:
            values = _sddmm(pattern, xc, W_enc.t()) + b_enc.index_select(0, pattern.cols)
        else:
            values = values.to(W_enc.dtype, copy=True)
        return values

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xc, W_enc = ctx.saved_tensors
        p: _Pattern = ctx.pattern
        grad = grad.contiguous()
        need_x, need_bdec, need_w, need_benc = ctx.needs_input_grad[:4]
        colsum = grad.new_zeros(p.n_cols).index_add_(0, p.cols, grad)
        grad_x = _spmm(p, grad, W_enc.t()) if need_x else None
        grad_b_dec = -(W_enc @ colsum) if need_bdec else None
        grad_w = _spmm_t(p, grad, xc).t() if need_w else None
        return grad_x, grad_b_dec, grad_w, colsum if need_benc else None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """``x_hat = G @ W_dec`` for sparse codes G, with both gradients sparse.

    ``grad values = (grad_out @ W_dec^T)[pattern]`` (sampled product, nnz * d_in work) and
    ``grad W_dec = G^T grad_out``; on the ``bag`` backend neither materialises ``[N, d_sae]`` or
    ``[nnz, d_in]``.
    """

    @staticmethod
    def forward(ctx: Any, values: Tensor, W_dec: Tensor, pattern: _Pattern) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(values, W_dec)
        return _spmm(pattern, values, W_dec)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        values, W_dec = ctx.saved_tensors
        p: _Pattern = ctx.pattern
        grad = grad.contiguous()
        grad_values = _sddmm(p, grad, W_dec) if ctx.needs_input_grad[0] else None
        grad_w = _spmm_t(p, values, grad) if ctx.needs_input_grad[1] else None
        return grad_values, grad_w, None


# ----------------------------------------------------------------------------------------------
# JumpReLU straight-through estimators (Rajamanoharan et al. 2024; SAELens's JumpReLU)
# ----------------------------------------------------------------------------------------------


def _rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre * (pre > threshold)``; the threshold gets the rectangle-kernel pseudo-gradient.

    d/dθ is ``-(θ / ε) K((pre - θ) / ε)`` (the jump of height θ smoothed over a window ε), the
    input gets the ordinary gradient where the unit is open.
    """

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold) if ctx.needs_input_grad[0] else None
        grad_t = None
        if ctx.needs_input_grad[1]:
            grad_t = -((threshold / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0)
        return grad_pre, grad_t, None


class _Step(torch.autograd.Function):
    """Heaviside ``pre > threshold`` (the L0 count); pseudo-gradient ``-(1/ε) K((pre - θ)/ε)`` to θ only."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_t = -((1.0 / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0) if ctx.needs_input_grad[1] else None
        return None, grad_t, None


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def geometric_median(x: Tensor, iters: int = 20, eps: float = 1e-8, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distances to the rows of ``x``.

    Why not the mean: activations have heavy-tailed outlier tokens (BOS, massive activations); the
    median is not dragged by them, so ``b_dec`` starts at the bulk of the data.
    """
    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        moved = (y_new - y).norm() / y.norm().clamp_min(eps)
        y = y_new
        if moved < tol:
            break
    return y


def _flatten(x: Tensor, d_in: int) -> tuple[Tensor, tuple[int, ...]]:
    if x.shape[-1] != d_in:
        raise XsaeError(f"the SAE expects inputs with last dimension d_in={d_in}, got shape {list(x.shape)}", "check the hook and the SAE's d_in")
    return x.reshape(-1, d_in), tuple(x.shape[:-1])


def _global_topk(values: Tensor, K: int) -> Tensor:
    """Sorted flat indices of the K largest entries of ``values`` (exact).

    A full top-K over N * d_sae entries is slow on a CPU (0.35 s for 19M entries). A quantile of a
    strided sample gives a threshold t just below the K-th largest value; if at least K entries
    reach t the answer lies among them (exact: every top-K entry is >= the K-th value >= t), and
    only those few candidates are ranked. Otherwise it falls back to the full top-K.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if K >= n:
        return torch.arange(n, device=flat.device)
    idx = None
    if n >= (1 << 20) and K * 8 <= n:
        stride = next(p for p in (251, 241, 239, 233) if values.shape[-1] % p)
        sample = flat[::stride]
        above = min(sample.numel(), max(1, math.ceil(1.25 * K / n * sample.numel())))
        t = sample.topk(above, sorted=True).values[-1]  # ~the (1 - 1.25 K/n) quantile
        cand = (flat >= t).nonzero().squeeze(1)
        if cand.numel() >= K:
            idx = cand[flat.index_select(0, cand).topk(K, sorted=False).indices]
    if idx is None:
        idx = flat.topk(K, sorted=False).indices
    return idx.sort().values


# ----------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------


class SparseAutoencoder(nn.Module):
    """What the four architectures share: parameters, normalisation, decoder-norm hooks, init.

    Subclasses provide ``_codes`` (dense inference codes from normalised inputs) and ``_train``
    (loss terms from normalised inputs). All losses live in the normalised space, so coefficients
    transfer between models of different activation scale; reconstructions come back in the
    input's units.
    """

    unit_norm_decoder: bool = True  # the trainer keeps decoder rows unit norm when True
    # Under DeepSpeed ZeRO the optimizer owns fp32 partitions of the weights, so rows cannot be
    # renormalised after a step; the forward then divides by the row norms instead (weight norm).
    decoder_weight_norm: bool = False

    def __init__(self, cfg: SaeConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d_in, d_sae = int(cfg.d_in), int(cfg.d_sae)
        dtype = cfg.torch_dtype
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))
        self._norm_state: tuple[Tensor, Tensor] | None = None
        if self.W_dec.device.type != "meta":  # a loader building on meta (accelerate) skips the init
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows; the encoder is their transpose; biases zero.

        Encoder = decoder^T (Gao et al. 2024; Conerly et al. 2024) makes each latent first respond
        to its own direction, which cuts dead latents at the start. Drawn in float32 on the CPU so
        a seed gives the same SAE on every device and dtype.
        """
        w_dec = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator, dtype=torch.float32)
        w_dec /= w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(w_dec)
        self.W_enc.copy_(w_dec.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    # -- properties --------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def use_bf16_encoder(self) -> bool:
        """Whether *training* runs the encoder matmul in bf16; inference never does (it is exact
        in the weights' dtype, so a saved SAE gives the same codes on every machine)."""
        if self.dtype != torch.float32:  # a bf16 SAE is bf16 throughout; float64 stays exact
            return False
        if self.cfg.bf16_encoder is not None:
            return bool(self.cfg.bf16_encoder)
        return bf16_encoder_default(self.cfg.arch, self.device)

    @property
    def sparse_backend(self) -> str:
        return _sparse_backend(self.device, self.dtype)

    # -- normalisation -----------------------------------------------------------------------

    def _norm_in(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Scale inputs as ``cfg.normalize_activations`` says; return what undoing it needs."""
        mode = self.cfg.normalize_activations
        if mode == "none":
            return x, None
        if mode == "expected_average_only_in":
            if self.cfg.norm_scaling_factor is None:
                raise XsaeError(
                    "normalize_activations='expected_average_only_in' needs a scaling factor, and this SAE has none",
                    "call sae.fit_normalization(sample) on a few batches of activations before training",
                )
            return x * self.cfg.norm_scaling_factor, None
        if mode == "constant_norm_rescale":
            coeff = (self.cfg.d_in**0.5) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return x * coeff, (coeff, torch.zeros_like(coeff))
        mu = x.mean(dim=-1, keepdim=True)  # layer_norm, as SAELens does it (std with Bessel, eps 1e-5)
        xc = x - mu
        std = xc.std(dim=-1, keepdim=True)
        return xc / (std + 1e-5), (1.0 / (std + 1e-5), mu)

    def _norm_out(self, y: Tensor, state: tuple[Tensor, Tensor] | None) -> Tensor:
        mode = self.cfg.normalize_activations
        if mode == "expected_average_only_in":
            return y / self.cfg.norm_scaling_factor
        if mode in ("constant_norm_rescale", "layer_norm"):
            if state is None or state[0].shape[0] != y.shape[0]:
                raise XsaeError(
                    f"decode() of an SAE with per-token normalisation ({mode}) needs the codes of the last encode() call",
                    "call encode(x) then decode(codes) on the same batch, or use forward(x)",
                )
            scale, shift = state
            return y / scale + shift
        return y

    @torch.no_grad()
    def fit_normalization(self, x: Tensor) -> float | None:
        """Estimate SAELens's ``expected_average_only_in`` factor sqrt(d_in) / E||x|| from a sample.

        Why: with inputs of norm ~sqrt(d_in) the same l1/l0 coefficients and learning rates work
        across models and layers. A no-op (returns None) for the other modes.
        """
        if self.cfg.normalize_activations != "expected_average_only_in":
            return None
        x2, _ = _flatten(x, self.cfg.d_in)
        mean_norm = float(x2.float().norm(dim=-1).mean())
        if not math.isfinite(mean_norm) or mean_norm <= 0:
            raise XsaeError("cannot fit the normalisation: the sample's mean norm is zero or not finite", "check the activations")
        self.cfg.norm_scaling_factor = (self.cfg.d_in**0.5) / mean_norm
        return self.cfg.norm_scaling_factor

    @torch.no_grad()
    def fold_normalization(self) -> None:
        """Fold the ``expected_average_only_in`` factor into the weights (as SAELens does before saving).

        ``(s x - b) W = (x - b/s)(s W)`` and ``(c W_dec + b)/s = c (W_dec/s) + b/s``: the codes and
        reconstructions of raw inputs are unchanged, and the SAE needs no scaling at run time.
        Thresholds act on codes, which do not change, so they stay. Per-token modes cannot fold.
        """
        mode = self.cfg.normalize_activations
        if mode == "none":
            return
        if mode != "expected_average_only_in":
            raise XsaeError(f"normalize_activations='{mode}' is computed per token and cannot be folded into the weights", "keep the config with the weights, or train with expected_average_only_in")
        s = self.cfg.norm_scaling_factor
        if s is None:
            raise XsaeError("nothing to fold: fit_normalization was never called", "call sae.fit_normalization(sample) first")
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)
        self.cfg.normalize_activations = "none"
        self.cfg.norm_scaling_factor = None

    # -- decoder norm hooks ------------------------------------------------------------------

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rows of W_dec to unit norm: the scale of a latent then lives in its code alone."""
        norm = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(norm + torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the radial part of W_dec's gradient, so a step moves along the unit sphere.

        Assumes unit-norm rows, as they are after :meth:`set_decoder_norm_to_unit_norm` (the
        trainer calls that after every step); sparsify and SAELens make the same assumption.
        """
        grad = self.W_dec.grad
        if grad is None:
            return
        parallel = torch.linalg.vecdot(grad, self.W_dec, dim=1)  # no [d_sae, d_in] temporary
        grad.addcmul_(parallel.unsqueeze(1), self.W_dec, value=-1.0)

    # -- init --------------------------------------------------------------------------------

    @torch.no_grad()
    def init_b_dec(self, x: Tensor, method: str = "geometric_median") -> None:
        """Start ``b_dec`` at the centre of a first batch (in the normalised space the SAE sees)."""
        x2, _ = _flatten(x, self.cfg.d_in)
        x_n, _ = self._norm_in(x2.to(self.dtype))
        if method == "geometric_median":
            centre = geometric_median(x_n)
        elif method == "mean":
            centre = x_n.to(torch.float64).mean(0)
        elif method == "zeros":
            centre = torch.zeros(self.cfg.d_in)
        else:
            raise XsaeError(f"unknown b_dec init '{method}'", "use geometric_median, mean or zeros")
        self.b_dec.copy_(centre.to(self.b_dec))

    # -- shared pieces -----------------------------------------------------------------------

    def _centred(self, x_n: Tensor) -> Tensor:
        return x_n - self.b_dec if self.cfg.apply_b_dec_to_input else x_n

    def _pre(self, xc: Tensor, *, training: bool = False, scratch: bool = False) -> Tensor:
        """Dense pre-activations; the one matmul every architecture pays.

        ``training``: a training step, which may run the matmul in bf16 (:attr:`use_bf16_encoder`);
        inference is always exact in the weights' dtype. ``scratch``: write into a buffer kept
        between steps (only for pre-activations that no autograd graph keeps). On a CPU a fresh
        [N, d_sae] block is a fresh mmap each step, and faulting its pages in costs as much as the
        top-k that follows.
        """
        if training and self.use_bf16_encoder:
            with torch.autocast(xc.device.type, dtype=torch.bfloat16):
                return torch.addmm(self.b_enc, xc, self.W_enc)
        if scratch and not torch.is_grad_enabled():
            return torch.addmm(self.b_enc, xc, self.W_enc, out=self._scratch_buffer(xc.shape[0]))
        return torch.addmm(self.b_enc, xc, self.W_enc)

    def _scratch_buffer(self, n: int) -> Tensor:
        buf = self.__dict__.get("_scratch")
        shape = (n, int(self.cfg.d_sae))
        if buf is None or tuple(buf.shape) != shape or buf.dtype != self.dtype or buf.device != self.device:
            buf = None
            self.__dict__["_scratch"] = None  # free the old one before allocating
            buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.__dict__["_scratch"] = buf
        return buf

    def __getstate__(self) -> dict[str, Any]:
        """Copies (deepcopy, pickle) leave the scratch buffer behind: it is not state."""
        state = self.__dict__.copy()
        state.pop("_scratch", None)
        return state

    def _w_dec(self) -> Tensor:
        if self.decoder_weight_norm:
            return self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)
        return self.W_dec

    @torch.no_grad()
    def fold_decoder_weight_norm(self) -> None:
        """Store the unit rows the forward used, and go back to plain decoding."""
        if self.decoder_weight_norm:
            self.W_dec.copy_(self._w_dec())
            self.decoder_weight_norm = False

    def _decode_raw(self, codes: Tensor) -> Tensor:
        return codes.to(self.dtype) @ self._w_dec() + self.b_dec

    def _codes(self, x_n: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _train(self, x_n: Tensor, dead_mask: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:  # pragma: no cover
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes ``[..., d_sae]`` with inference semantics (BatchTopK: the learned threshold)."""
        x2, lead = _flatten(x, self.cfg.d_in)
        x_n, state = self._norm_in(x2.to(self.dtype))
        self._norm_state = state
        return self._codes(x_n).reshape(*lead, self.cfg.d_sae)

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction ``[..., d_in]`` in the input's units (per-token modes: of the last encode)."""
        c2 = codes.reshape(-1, self.cfg.d_sae)
        y = self._norm_out(self._decode_raw(c2), self._norm_state)
        return y.reshape(*codes.shape[:-1], self.cfg.d_in)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, *, train_step: bool = False) -> Any:
        """Reconstruction with the shape and dtype of ``x``: what splicing into a model needs.

        ``train_step=True`` returns :meth:`training_forward` as a plain tuple ``(loss, x_hat,
        fired, terms)``: DeepSpeed ZeRO-3 gathers parameters only around ``module(...)`` calls and
        finds the tensors to hook for backward only in tuples, lists and dicts.
        """
        if train_step:
            o = self.training_forward(x, dead_mask)
            return o.loss, o.x_hat, o.fired, o.terms
        x2, lead = _flatten(x, self.cfg.d_in)
        x_n, state = self._norm_in(x2.to(self.dtype))
        y = self._norm_out(self._reconstruct(x_n), state)
        return y.reshape(*lead, self.cfg.d_in).to(x.dtype)

    def _reconstruct(self, x_n: Tensor) -> Tensor:
        return self._decode_raw(self._codes(x_n))

    def training_forward(self, x: Tensor, dead_mask: Tensor | None = None) -> TrainOutput:
        """Loss and logs for one batch ``[N, d_in]`` (or ``[..., d_in]``); ``dead_mask [d_sae]`` feeds AuxK."""
        x2, _ = _flatten(x, self.cfg.d_in)
        x_n, state = self._norm_in(x2.to(self.dtype))
        x_hat_n, loss, terms, fired = self._train(x_n, dead_mask)
        with torch.no_grad():  # terms["mse"] is the summed squared error / N for every architecture
            centred = (x_n - x_n.mean(0)).reshape(-1)  # two passes: exact, and 10x faster than var(dim=0)
            total_var = torch.dot(centred, centred)
            terms["fvu"] = terms["mse"].detach() * x_n.shape[0] / total_var.clamp_min(1e-30)
        terms = {name: value.detach() for name, value in terms.items()}
        return TrainOutput(x_hat=self._norm_out(x_hat_n, state), loss=loss, terms=terms, fired=fired)

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k is not None else ""
        return f"arch={c.arch}, d_in={c.d_in}, d_sae={c.d_sae}{k}, norm={c.normalize_activations}"


def _mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """SAELens's training MSE: squared error summed over d_in, averaged over tokens."""
    return (x_hat - x).pow(2).sum(-1).mean()


def _fired_dense(codes: Tensor) -> Tensor:
    return (codes > 0).sum(0, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# ReLU with decoder-norm-weighted L1
# ----------------------------------------------------------------------------------------------


class ReluSae(SparseAutoencoder):
    """ReLU codes with an L1 penalty on ``codes * ||W_dec row||`` (SAELens standard, Anthropic April 2024).

    Weighting by the decoder norms makes the penalty invariant to moving scale between codes and
    decoder rows, so the decoder needs no unit-norm constraint (it starts unit norm).
    """

    unit_norm_decoder = False

    def _codes(self, x_n: Tensor, training: bool = False) -> Tensor:
        return F.relu(self._pre(self._centred(x_n), training=training).to(self.dtype))

    def _train(self, x_n: Tensor, dead_mask: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        codes = self._codes(x_n, training=True)
        x_hat = self._decode_raw(codes)
        mse = _mse(x_hat, x_n)
        l1 = (codes * self.W_dec.norm(dim=1)).sum(-1).mean()
        loss = mse + self.cfg.l1_coefficient * l1
        with torch.no_grad():
            l0 = (codes > 0).sum(-1, dtype=torch.float32).mean()
        return x_hat, loss, {"mse": mse, "l1": l1, "l0": l0}, _fired_dense(codes.detach())


# ----------------------------------------------------------------------------------------------
# JumpReLU
# ----------------------------------------------------------------------------------------------


class JumpReluSae(SparseAutoencoder):
    """JumpReLU codes ``pre * (pre > θ)`` with a learned per-latent θ and an L0 penalty.

    θ is a plain parameter (SAELens's choice: Adam moves a log-parameter too slowly from a small
    init) kept >= 0 by projection before each training step.
    """

    def __init__(self, cfg: SaeConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        self.threshold = nn.Parameter(torch.full((int(cfg.d_sae),), float(cfg.jumprelu_init_threshold), dtype=cfg.torch_dtype))

    def _codes(self, x_n: Tensor) -> Tensor:
        pre = self._pre(self._centred(x_n)).to(self.dtype)
        return pre * (pre > self.threshold)

    def _train(self, x_n: Tensor, dead_mask: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        with torch.no_grad():
            self.threshold.clamp_(min=0.0)
        pre = self._pre(self._centred(x_n), training=True).to(self.dtype)
        eps = float(self.cfg.jumprelu_bandwidth)
        codes = _JumpReLU.apply(pre, self.threshold, eps)
        x_hat = self._decode_raw(codes)
        mse = _mse(x_hat, x_n)
        l0 = _Step.apply(pre, self.threshold, eps).sum(-1).mean()
        loss = mse + self.cfg.l0_coefficient * l0
        return x_hat, loss, {"mse": mse, "l0": l0, "l0_loss": self.cfg.l0_coefficient * l0}, _fired_dense(codes.detach())


# ----------------------------------------------------------------------------------------------
# TopK and BatchTopK: the sparse path
# ----------------------------------------------------------------------------------------------


class TopKSae(SparseAutoencoder):
    """k largest of ReLU(pre) per token; AuxK revives dead latents (Gao et al. 2024 / sparsify).

    Training runs one dense matmul (the pre-activations) and otherwise only sparse products.
    """

    def _select(self, pre: Tensor, training: bool) -> tuple[_Pattern, Tensor]:
        """Pattern and pre-activation values of the selected latents (TopK: k per row)."""
        vals, idx = pre.topk(int(self.cfg.k), dim=-1, sorted=False)
        return _Pattern.from_topk(idx, int(self.cfg.d_sae), self.sparse_backend), vals.reshape(-1)

    def _sparse_codes(self, x_n: Tensor, training: bool) -> tuple[Tensor, _Pattern, Tensor, Tensor]:
        """(values, pattern, centred input, dense pre-activations) of the selected latents.

        Selection runs without autograd; the values are re-attached through :class:`_GatherLinear`,
        which reuses them when they were computed in the weights' dtype and recomputes them
        exactly (nnz dot products) after a bf16 selection.
        """
        with torch.no_grad():
            xc = self._centred(x_n)
            pre = self._pre(xc, training=training, scratch=training)
            pattern, vals = self._select(pre, training)
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        raw = _GatherLinear.apply(x_n, b_dec, self.W_enc, self.b_enc, xc, pattern, vals if pre.dtype == self.dtype else None)
        return F.relu(raw), pattern, xc, pre

    def _codes(self, x_n: Tensor) -> Tensor:
        vals, p, _, _ = self._sparse_codes(x_n, training=False)
        codes = x_n.new_zeros(p.n_rows * p.n_cols)
        codes = codes.index_put((p.rows * p.n_cols + p.cols,), vals)
        return codes.reshape(p.n_rows, p.n_cols)

    def _reconstruct(self, x_n: Tensor) -> Tensor:
        vals, p, _, _ = self._sparse_codes(x_n, training=False)
        return _SparseDecode.apply(vals, self._w_dec(), p) + self.b_dec

    def _train(self, x_n: Tensor, dead_mask: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        vals, p, xc, pre = self._sparse_codes(x_n, training=True)
        x_hat = _SparseDecode.apply(vals, self._w_dec(), p) + self.b_dec
        err = x_hat - x_n
        n = x_n.shape[0]
        flat = err.reshape(-1)
        mse = torch.dot(flat, flat) / n  # one pass, no [N, d_in] temporary
        aux = self._auxk(x_n, xc, pre, err.detach(), dead_mask)
        del pre
        loss = mse + self.cfg.aux_k_coefficient * aux if aux.requires_grad else mse
        with torch.no_grad():
            positive = vals.detach() > 0
            fired = torch.zeros(int(self.cfg.d_sae), dtype=torch.long, device=vals.device).index_add_(0, p.cols, positive.long())
            l0 = positive.sum(dtype=torch.float32) / n
            self._after_step(vals.detach(), positive)
        return x_hat, loss, {"mse": mse, "aux": aux, "l0": l0}, fired

    def _after_step(self, values: Tensor, positive: Tensor) -> None:
        """Hook for state that follows the training codes (BatchTopK's threshold)."""

    def _auxk(self, x_n: Tensor, xc: Tensor, pre: Tensor, err: Tensor, dead_mask: Tensor | None) -> Tensor:
        """AuxK: the top aux_k *dead* latents reconstruct the main reconstruction's error.

        Scaled by min(dead / aux_k, 1) as sparsify and SAELens do, so a handful of dead latents
        does not get the weight of many. Unlike sparsify (whose fused encoder drops this gradient),
        the loss reaches the encoder as well as the decoder, as in Gao et al. The dead latents'
        pre-activations are read from the forward's matrix: no second matmul.
        """
        zero = err.new_zeros(())
        if dead_mask is None:
            return zero
        dead = dead_mask.to(device=err.device, dtype=torch.bool).reshape(-1).nonzero().squeeze(1)
        n_dead = dead.numel()
        if n_dead == 0:
            return zero
        aux_k = self.cfg.effective_aux_k
        scale = min(n_dead / aux_k, 1.0)
        k = min(aux_k, n_dead)
        with torch.no_grad():
            vals, local = pre.index_select(1, dead).topk(k, dim=-1, sorted=False)
            p = _Pattern.from_topk(dead[local], int(self.cfg.d_sae), self.sparse_backend)
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        raw = _GatherLinear.apply(x_n, b_dec, self.W_enc, self.b_enc, xc, p, vals.reshape(-1) if pre.dtype == self.dtype else None)
        e_hat = _SparseDecode.apply(F.relu(raw), self._w_dec(), p)
        return scale * (e_hat + err).pow(2).sum() / x_n.shape[0]


class BatchTopKSae(TopKSae):
    """Top ``k * N`` of ReLU(pre) over the whole batch in training; a learned threshold at inference.

    The threshold is an EMA of the smallest selected activation (SAELens's rule), kept in the
    ``threshold [d_sae]`` buffer so the SAE saves and runs as a JumpReLU SAE. It starts from the
    first batch's value instead of SAELens's 0, so early evaluations are meaningful.
    """

    threshold: Tensor

    def __init__(self, cfg: SaeConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        self.register_buffer("threshold", torch.zeros(int(cfg.d_sae), dtype=cfg.torch_dtype))

    def _select(self, pre: Tensor, training: bool) -> tuple[_Pattern, Tensor]:
        n, d_sae = pre.shape
        if training:
            flat = _global_topk(pre, int(self.cfg.k) * n)
        else:  # JumpReLU semantics: every latent above the threshold (and above zero)
            keep = (pre > self.threshold.to(pre.dtype)) & (pre > 0)
            flat = keep.reshape(-1).nonzero().squeeze(1)
        return _Pattern.from_flat(flat, n, d_sae, self.sparse_backend), pre.reshape(-1).index_select(0, flat)

    def _after_step(self, values: Tensor, positive: Tensor) -> None:
        """EMA towards the smallest positive kept code; written without host syncs (CUDA)."""
        smallest = torch.where(positive, values, torch.full_like(values, math.inf)).min().to(self.threshold.dtype)
        lr = float(self.cfg.batchtopk_threshold_lr)
        first = (self.threshold == 0).all()
        moved = torch.where(first, smallest, self.threshold * (1 - lr) + smallest * lr)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), moved, self.threshold))


# ----------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------

_CLASSES: dict[str, type[SparseAutoencoder]] = {"relu": ReluSae, "topk": TopKSae, "batchtopk": BatchTopKSae, "jumprelu": JumpReluSae}


def create_sae(cfg: SaeConfig, device: torch.device | str | None = None, seed: int | None = None) -> SparseAutoencoder:
    """Build the SAE ``cfg.arch`` names, initialised on the CPU (same weights on every device) and moved.

    ``seed`` makes the init reproducible without touching the global RNG.
    """
    cfg.validate()
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    sae = _CLASSES[cfg.arch](cfg, generator)
    return sae.to(device) if device is not None else sae
