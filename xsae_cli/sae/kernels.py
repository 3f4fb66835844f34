"""Sparse products for SAEs whose codes keep a few latents per token (TopK, BatchTopK, AuxK).

On a CPU the dense encoder matmul is the one cost that cannot be avoided (every pre-activation
must be seen to pick the top k). Everything else is sparse: each token keeps k of d_sae latents,
so the decoder, the decoder backward and the encoder backward touch ``N * k`` entries, not
``N * d_sae``. Plain autograd would run three more dense ``[N, d_sae]`` matmuls for them; here
they run as sparse products (``embedding_bag`` and a sampled matmul on CPU/CUDA, gather/index_add
elsewhere) through two small autograd functions, :class:`GatherLinear` and :class:`SparseDecode`,
over a :class:`Pattern` (where the nonzero codes sit) built once per step. An architecture with
another sparsity rule builds its own pattern (``Pattern.from_topk`` / ``Pattern.from_flat``) and
reuses both functions; :func:`global_topk` is the exact batch-wide top-K that BatchTopK needs.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xsae_cli.core.errors import XsaeError

SPARSE_BACKENDS = ("auto", "bag", "gather")
#: Set to ``bag`` or ``gather`` to force one sparse backend (tests compare both on CPU).
SPARSE_BACKEND_ENV = "XSAE_SPARSE_BACKEND"


def sparse_backend(device: torch.device, dtype: torch.dtype) -> str:
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


_GATHER_CHUNK = 1 << 16  # entries per chunk in the gather backend: bounds its [chunk, d_in] temporaries


class Pattern:
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
        self._sorted: tuple[Tensor, Tensor] | None = None
        self._t: tuple[Tensor, Tensor, Tensor] | None = None

    @classmethod
    def from_topk(cls, idx: Tensor, n_cols: int, backend: str) -> Pattern:
        """k entries per row: the pattern of a TopK (or AuxK) selection ``idx [N, k]``."""
        n, k = idx.shape
        crow = torch.arange(0, n * k + 1, k, device=idx.device)
        return cls(idx.reshape(-1), n, n_cols, crow, backend, per_row=k)

    @classmethod
    def from_flat(cls, flat: Tensor, n_rows: int, n_cols: int, backend: str) -> Pattern:
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


def _gather_add(n_out: int, into: Tensor, take: Tensor, values: Tensor, dense: Tensor) -> Tensor:
    """``out[into[i]] += values[i] * dense[take[i]]`` in chunks (the ``gather`` backend's product)."""
    out = dense.new_zeros(n_out, dense.shape[1])
    for s in range(0, values.numel(), _GATHER_CHUNK):
        sl = slice(s, s + _GATHER_CHUNK)
        out.index_add_(0, into[sl], dense.index_select(0, take[sl]) * values[sl, None])
    return out


def _spmm(p: Pattern, values: Tensor, dense: Tensor) -> Tensor:
    """G @ dense, with G [n_rows, n_cols] given by (p, values) and dense [n_cols, D] -> [n_rows, D]."""
    if p.backend == "bag":
        return F.embedding_bag(p.cols, dense, p.crow[:-1], mode="sum", per_sample_weights=values)
    return _gather_add(p.n_rows, p.rows, p.cols, values, dense)


def _spmm_t(p: Pattern, values: Tensor, dense: Tensor) -> Tensor:
    """G^T @ dense, dense [n_rows, D] -> [n_cols, D]: the weight gradients of both sparse products."""
    if p.backend == "bag":
        order, crow_t, rows_t = p.transposed()
        return F.embedding_bag(rows_t, dense, crow_t[:-1], mode="sum", per_sample_weights=values.index_select(0, order))
    return _gather_add(p.n_cols, p.cols, p.rows, values, dense)


def _sddmm(p: Pattern, a: Tensor, b: Tensor, sort: bool | None = None) -> Tensor:
    """(a @ b^T) sampled at the pattern: out[i] = a[rows[i]] . b[cols[i]]; a [n_rows, D], b [n_cols, D].

    The ``bag`` backend uses ``torch.sparse.sampled_addmm`` (no [nnz, D] temporary), on a CSR
    mask with sorted columns off the CPU (``sort``, see :meth:`Pattern.csr_mask`); should a
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


class GatherLinear(torch.autograd.Function):
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
    def forward(ctx: Any, x: Tensor, b_dec: Tensor | None, W_enc: Tensor, b_enc: Tensor, xc: Tensor, pattern: Pattern, values: Tensor | None) -> Tensor:
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
        p: Pattern = ctx.pattern
        grad = grad.contiguous()
        need_x, need_bdec, need_w, need_benc = ctx.needs_input_grad[:4]
        colsum = grad.new_zeros(p.n_cols).index_add_(0, p.cols, grad)
        grad_x = _spmm(p, grad, W_enc.t()) if need_x else None
        grad_b_dec = -(W_enc @ colsum) if need_bdec else None
        grad_w = _spmm_t(p, grad, xc).t() if need_w else None
        return grad_x, grad_b_dec, grad_w, colsum if need_benc else None, None, None, None


class SparseDecode(torch.autograd.Function):
    """``x_hat = G @ W_dec`` for sparse codes G, with both gradients sparse.

    ``grad values = (grad_out @ W_dec^T)[pattern]`` (sampled product, nnz * d_in work) and
    ``grad W_dec = G^T grad_out``; on the ``bag`` backend neither materialises ``[N, d_sae]`` or
    ``[nnz, d_in]``.
    """

    @staticmethod
    def forward(ctx: Any, values: Tensor, W_dec: Tensor, pattern: Pattern) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(values, W_dec)
        return _spmm(pattern, values, W_dec)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        values, W_dec = ctx.saved_tensors
        p: Pattern = ctx.pattern
        grad = grad.contiguous()
        grad_values = _sddmm(p, grad, W_dec) if ctx.needs_input_grad[0] else None
        grad_w = _spmm_t(p, values, grad) if ctx.needs_input_grad[1] else None
        return grad_values, grad_w, None


def global_topk(values: Tensor, K: int) -> Tensor:
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
