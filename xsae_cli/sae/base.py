"""What every SAE architecture shares: its config, the base class, the bf16 training encoder rule.

Every SAE has the same four parameters, named and shaped as SAELens names them (``W_enc [d_in,
d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``), plus the extra tensors its registration
declares (``threshold [d_sae]`` for JumpReLU and BatchTopK), so SAELens's file layout is the native
one and the rest of xsae can treat all architectures alike: ``encode`` / ``decode`` / ``forward``
for inference and splicing, ``training_forward`` for the trainer. The architectures themselves
are in :mod:`xsae_cli.sae.architectures` (one file each), the sparse products the TopK family
uses in :mod:`xsae_cli.sae.kernels`, and what each architecture declares in
:mod:`xsae_cli.sae.registry`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from xsae_cli.core.errors import XsaeError
from xsae_cli.sae.kernels import sparse_backend
from xsae_cli.sae.registry import check_arch, get_arch

if TYPE_CHECKING:
    from xsae_cli.sae.registry import ArchSpec

NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
PARAM_DTYPES = ("float32", "float64", "bfloat16", "float16")

#: ``on`` / ``off`` decide what ``bf16_encoder = None`` (auto) means, whatever the hardware: the
#: test suite runs once each way, so a CPU without AVX512-BF16 exercises the path others take.
#: Architectures registered with ``bf16_selection=True`` may select latents with a bf16 matmul by
#: default: their values are recomputed exactly in fp32 after the selection, so bf16 moves only
#: near-ties of the top-k; benchmarks/bf16_encoder.py measures held-out FVU within seed noise of
#: fp32 (RESULTS.md). ReLU and JumpReLU would train on the bf16 values themselves and stay fp32
#: unless asked.
BF16_ENCODER_ENV = "XSAE_BF16_ENCODER"
BF16_MODES = ("auto", "on", "off")


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
    k: int | None = None  # architectures that use k (registry): active latents per token (batchtopk: on average)
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
    options: dict = field(default_factory=dict)  # settings only this architecture has (its registration declares them)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse configs that cannot train, with the fix named (user input reaches here from TOML/CLI)."""
        if int(self.d_in) <= 0 or int(self.d_sae) <= 0:
            raise XsaeError(f"d_in and d_sae must be positive (got d_in={self.d_in}, d_sae={self.d_sae})", "check the SAE width settings")
        spec = check_arch(self.arch, k=self.k, d_sae=self.d_sae)
        unknown = sorted(set(self.options) - set(spec.options))
        if unknown:
            known = ", ".join(spec.options) or "none"
            raise XsaeError(f"unknown option(s) {', '.join(unknown)} for a {self.arch} SAE", f"its options: {known}")
        self.options = {**spec.options, **self.options}
        if spec.validate is not None:
            spec.validate(self)
        for name in spec.coefficients:
            value = self.setting(name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise XsaeError(f"{name} must be a finite number >= 0 (got {value!r})", f"set {name} for the {self.arch} loss, e.g. its default")
        if int(self.dead_tokens_threshold) < 1:
            raise XsaeError(f"dead_tokens_threshold must be at least 1 token (got {self.dead_tokens_threshold})", "e.g. 1000000")
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

    def setting(self, name: str) -> Any:
        """A config field or an architecture option, by name (what registrations refer to)."""
        if name in self.options:
            return self.options[name]
        if name in self.__dataclass_fields__:
            return getattr(self, name)
        raise XsaeError(f"a {self.arch} SAE has no setting '{name}'", f"its options: {', '.join(self.options) or 'none'}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SaeConfig:
        """Build from a dict; options of the architecture may be given flat (``{"arch": "x", "width": 3}``).

        An unknown key is an error that names the valid keys.
        """
        known = [f.name for f in dataclasses.fields(cls)]
        data = dict(data)
        extra = {key: data.pop(key) for key in list(data) if key not in known}
        if extra:
            spec_options = get_arch(str(data.get("arch", ""))).options if "arch" in data else {}
            unknown = sorted(set(extra) - set(spec_options))
            if unknown:
                valid = ", ".join([*known, *spec_options])
                raise XsaeError(f"unknown SAE config key(s): {', '.join(unknown)}", f"valid keys: {valid}")
            data["options"] = {**dict(data.get("options") or {}), **extra}
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
    architectures registered with ``bf16_selection=True`` where :func:`bf16_encoder_is_fast`."""
    forced = os.environ.get(BF16_ENCODER_ENV, "auto").strip().lower() or "auto"
    if forced not in BF16_MODES:
        raise XsaeError(f"{BF16_ENCODER_ENV}={forced} is not a bf16 encoder mode", f"use one of {', '.join(BF16_MODES)}")
    if forced != "auto":
        return forced == "on"
    return get_arch(arch).bf16_selection and bf16_encoder_is_fast(device)


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


def flatten_tokens(x: Tensor, d_in: int) -> tuple[Tensor, tuple[int, ...]]:
    if x.shape[-1] != d_in:
        raise XsaeError(f"the SAE expects inputs with last dimension d_in={d_in}, got shape {list(x.shape)}", "check the hook and the SAE's d_in")
    return x.reshape(-1, d_in), tuple(x.shape[:-1])


# ----------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------


class SparseAutoencoder(nn.Module):
    """What every architecture shares: parameters, normalisation, decoder-norm hooks, init.

    Subclasses provide ``_codes`` (dense inference codes from normalised inputs) and ``_train``
    (loss terms from normalised inputs), and register themselves
    (:func:`xsae_cli.sae.registry.register_sae_class`); the extra tensors their registration
    declares (a threshold, ...) are created here. All losses live in the normalised space, so
    coefficients transfer between models of different activation scale; reconstructions come back
    in the input's units.
    """

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
        for name, extra in get_arch(cfg.arch).tensors.items():
            shape = tuple(int(cfg.setting(s)) for s in extra.shape)
            init = float(cfg.setting(extra.init)) if isinstance(extra.init, str) else float(extra.init)
            value = torch.full(shape, init, dtype=dtype)
            if extra.kind == "parameter":
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
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
    def spec(self) -> ArchSpec:
        """This architecture's registration (what formats, trainer and tuner read)."""
        return get_arch(self.cfg.arch)

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether the trainer keeps decoder rows unit norm (from the registration)."""
        return self.spec.unit_norm_decoder

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
        return sparse_backend(self.device, self.dtype)

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
            assert self.cfg.norm_scaling_factor is not None, "expected_average_only_in needs norm_scaling_factor"
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
        x2, _ = flatten_tokens(x, self.cfg.d_in)
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
        x2, _ = flatten_tokens(x, self.cfg.d_in)
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
        x2, lead = flatten_tokens(x, self.cfg.d_in)
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
        x2, lead = flatten_tokens(x, self.cfg.d_in)
        x_n, state = self._norm_in(x2.to(self.dtype))
        y = self._norm_out(self._reconstruct(x_n), state)
        return y.reshape(*lead, self.cfg.d_in).to(x.dtype)

    def _reconstruct(self, x_n: Tensor) -> Tensor:
        return self._decode_raw(self._codes(x_n))

    def training_forward(self, x: Tensor, dead_mask: Tensor | None = None) -> TrainOutput:
        """Loss and logs for one batch ``[N, d_in]`` (or ``[..., d_in]``); ``dead_mask [d_sae]`` feeds AuxK."""
        x2, _ = flatten_tokens(x, self.cfg.d_in)
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


def mse_loss(x_hat: Tensor, x: Tensor) -> Tensor:
    """SAELens's training MSE: squared error summed over d_in, averaged over tokens."""
    return (x_hat - x).pow(2).sum(-1).mean()


def fired_dense(codes: Tensor) -> Tensor:
    return (codes > 0).sum(0, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------


def create_sae(cfg: SaeConfig, device: torch.device | str | None = None, seed: int | None = None) -> SparseAutoencoder:
    """Build the SAE ``cfg.arch`` names, initialised on the CPU (same weights on every device) and moved.

    ``seed`` makes the init reproducible without touching the global RNG.
    """
    cfg.validate()
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    sae = get_arch(cfg.arch).cls(cfg, generator)
    return sae.to(device) if device is not None else sae
