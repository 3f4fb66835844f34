"""The SAE training step on the GPU against a CPU reference, for every architecture and numeric path.

The reference is the same SAE in float64 on the CPU, run through the CPU-tested code (ReLU, JumpReLU)
or written as dense autograd on the selection the GPU made (TopK, BatchTopK; the helpers of
tests/unit/sae/test_models.py). Paths, and the tolerance each allows in ||ours - ref|| / ||ref||, about
3x the worst of five seeds measured on a CPU (given in brackets):

- ``fp32``: fp32 weights, exact encoder: 1e-5 (2e-7);
- ``bf16-selection``: fp32 weights, bf16 encoder matmul in training (the CUDA default for TopK and
  BatchTopK). TopK/BatchTopK select on bf16 scores, which must be the exact pre-activations to bf16
  rounding, 1e-2 (2.9e-3), and recompute the values in fp32: loss and gradients at 1e-5 (1.7e-7).
  ReLU and JumpReLU train on the bf16 values themselves: 5e-2 (1.5e-2, entries crossing the ReLU kink);
- ``bf16``: bf16 weights, bf16 throughout: 3e-2 (8.8e-3).

JumpReLU's threshold pseudo-gradient is compared on the fp32 path only: it counts pre-activations in a
window, and bf16 rounding moves some across the window's edge (0.3 off on the CPU as well).

The sparse kernels (``bag``: embedding_bag + sampled_addmm; ``gather``: index_add) are checked against
dense autograd and by gradcheck on the device, with each backend forced as on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.sae.test_models import (
    D_IN,
    D_SAE,
    _dense_reference_loss,
    _recorded_selection,
    check_sparse_backward,
    check_sparse_gradcheck,
    data,
    make,
    selection_pre,
)
from xsae_cli.sae import models

pytestmark = pytest.mark.gpu

SELECTING = ("topk", "batchtopk")
# name: (weights dtype, bf16_encoder, tolerance of loss and gradients, of TopK selection scores)
PATHS = {
    "fp32": ("float32", False, 1e-5, 1e-5),
    "bf16-selection": ("float32", True, 1e-5, 1e-2),
    "bf16": ("bfloat16", None, 3e-2, 1e-2),
}
VALUE_TOL_BF16 = 5e-2  # ReLU / JumpReLU on the bf16-selection path train on bf16 values
# JumpReLU's threshold window is wide enough to hold several pre-activations per latent.
EXTRA = {"jumprelu": {"jumprelu_bandwidth": 0.05, "jumprelu_init_threshold": 0.05, "l0_coefficient": 1e-2}}


def _pair(arch: str, dtype: str, bf16: bool | None, device: torch.device) -> tuple[models.SparseAutoencoder, models.SparseAutoencoder]:
    """The SAE on ``device`` and its float64 CPU twin with the very same (dtype-rounded) weights."""
    extra = EXTRA.get(arch, {})
    sae = make(arch, dtype=dtype, bf16_encoder=bf16, **extra)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # biases off zero, so that a dropped bias term shows
        sae.b_enc.copy_(0.2 * torch.randn(D_SAE, generator=g))
        sae.b_dec.copy_(0.2 * torch.randn(D_IN, generator=g))
    ref = make(arch, dtype="float64", **extra)
    ref.load_state_dict({k: v.double() for k, v in sae.state_dict().items()})
    return sae.to(device), ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_training_step_matches_the_cpu_reference(arch: str, path: str, device: torch.device) -> None:
    dtype, bf16, tol, sel_tol = PATHS[path]
    sae, ref = _pair(arch, dtype, bf16, device)
    assert sae.use_bf16_encoder == (path == "bf16-selection")
    if arch not in SELECTING and path == "bf16-selection":
        tol = VALUE_TOL_BF16
    x = data(64).to(device=device, dtype=sae.dtype)
    x64 = x.double().cpu()  # the input as the SAE sees it (bf16-rounded on the bf16 path)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True  # 16 dead latents: AuxK runs (TopK, BatchTopK)
    masks = _recorded_selection(sae) if arch in SELECTING else []
    sel = selection_pre(sae, x)

    out = sae.training_forward(x, dead_mask=dead.to(device))
    names = [n for n, p in sae.named_parameters()]
    grads = torch.autograd.grad(out.loss, list(sae.parameters()))
    assert out.x_hat.device.type == device.type and all(g.device.type == device.type for g in grads)

    if arch in SELECTING:
        pre64 = (x64 - ref.b_dec) @ ref.W_enc + ref.b_enc
        assert _rel(sel, pre64) < sel_tol  # the device's selection scores are the pre-activations, to the path's rounding
        ref_loss = _dense_reference_loss(ref, x64, dead, [m.cpu() for m in masks], sel=sel.double().cpu())
        mask = masks[0].cpu()
        assert torch.equal(out.fired.cpu(), (mask & (pre64 > 0)).sum(0))
    else:
        ref_out = ref.training_forward(x64, dead_mask=dead)  # AuxK where the architecture has it (matryoshka_batchtopk)
        ref_loss = ref_out.loss
        if path == "fp32":  # on the bf16 paths an entry at the kink may fire on one side only
            assert torch.equal(out.fired.cpu() > 0, ref_out.fired > 0)
    ref_grads = dict(zip([n for n, _ in ref.named_parameters()], torch.autograd.grad(ref_loss, list(ref.parameters()))))
    loss, expected = float(out.loss.detach()), float(ref_loss.detach())
    assert abs(loss - expected) / max(abs(expected), 1.0) < tol, (loss, expected)
    for name, grad in zip(names, grads):
        if name == "threshold" and path != "fp32":
            continue  # see the module docstring
        assert _rel(grad, ref_grads[name]) < tol, (name, _rel(grad, ref_grads[name]))
    fvu = float(out.terms["fvu"])
    assert 0 < fvu < 10 and all(torch.isfinite(v).all() for v in out.terms.values())


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_inference_on_the_device_is_exact_and_matches_the_cpu(arch: str, device: torch.device) -> None:
    """encode/forward never take the bf16 path: a saved SAE gives the CPU's codes on the GPU (fp32 rounding)."""
    sae, ref = _pair(arch, "float32", True, device)
    with torch.no_grad():
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.05)
            ref.threshold.fill_(0.05)
        x = data(48)
        codes, x_hat = sae.encode(x.to(device)), sae(x.to(device))
        assert codes.dtype == torch.float32 and x_hat.device.type == device.type
        ref_codes = ref.encode(x.double())
        assert _rel(codes, ref_codes) < 1e-5 and _rel(x_hat, ref(x.double())) < 1e-5
        assert torch.equal(codes.cpu() > 0, ref_codes > 0)


@pytest.mark.parametrize("arch", SELECTING)
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("with_dead", [0, 2, 16])
def test_sparse_backends_match_dense_autograd_on_the_device(arch: str, dtype: str, tol: float, with_dead: int, backend: str, device: torch.device) -> None:
    check_sparse_backward(arch, dtype, tol, with_dead, device=device)


def test_sparse_functions_pass_gradcheck_on_the_device(backend: str, device: torch.device) -> None:
    check_sparse_gradcheck(backend, device=device)


def test_default_backend_and_bf16_choice_on_the_device(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """bag for fp32/fp64 on CPU and CUDA, gather for bf16; bf16 selection by default where CUDA has bf16."""
    monkeypatch.delenv(models.SPARSE_BACKEND_ENV, raising=False)
    monkeypatch.delenv(models.BF16_ENCODER_ENV, raising=False)
    assert make("topk", device=device).sparse_backend == "bag"
    assert make("topk", dtype="bfloat16", device=device).sparse_backend == "gather"
    if device.type == "cuda":
        assert make("topk", device=device).use_bf16_encoder == torch.cuda.is_bf16_supported()
        assert not make("relu", device=device).use_bf16_encoder


def test_global_topk_on_the_device_equals_the_cpu(device: torch.device) -> None:
    """BatchTopK's sampled-threshold top-k (taken at >= 2^20 entries) and its fallback, against the CPU."""
    g = torch.Generator().manual_seed(0)
    K = 1100 * 8
    cases = {
        "random": torch.randn(1100, 1000, generator=g),
        "ties": torch.zeros(1100, 1000),
        "trap": torch.rand(1100, 1000, generator=g),
    }
    cases["trap"].view(-1)[::251] += 10.0  # the strided sample sees only large values: the fallback runs
    for name, vals in cases.items():
        got = models._global_topk(vals.to(device), K)
        assert got.device.type == device.type and got.numel() == K, name
        if name == "ties":
            continue  # any K of the tied entries are right
        assert torch.equal(got.cpu(), models._global_topk(vals, K)), name


def test_trainer_step_on_the_device_keeps_decoder_rows_unit_norm(device: torch.device, tmp_path) -> None:
    """One SaeTrainer step per architecture on the device: b_dec init, AuxK, Adam, decoder renorm, firing counts."""
    from xsae_cli.sae.settings import SaeTrainSettings as TrainSettings
    from xsae_cli.sae.train import SaeTrainer

    for arch in models.ARCHITECTURES:
        widths = (12, 24) if arch == "matryoshka_batchtopk" else None
        settings = TrainSettings(arch=arch, k=4, expansion=4, batch_size=64, tokens=128, optimizer="adam", l1_coefficient=0.01, dead_tokens_threshold=32, matryoshka_widths=widths)
        trainer = SaeTrainer(settings, {"h": D_IN}, tmp_path / arch, device=device)
        batch = {"h": data(64)}
        trainer.train_step(batch)
        logs = trainer.train_step({"h": data(64, seed=1)})["h"]
        sae = trainer.saes()["h"]
        assert sae.W_enc.device.type == device.type and trainer.step == 2
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values()), logs
        if sae.unit_norm_decoder:
            torch.testing.assert_close(sae.W_dec.norm(dim=1).cpu(), torch.ones(sae.cfg.d_sae), atol=1e-5, rtol=0)
