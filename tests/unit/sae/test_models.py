"""The four SAE architectures: shapes, sparsity rules, gradients (sparse vs dense reference), init, training."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from xsae_cli.core.errors import XsaeError
from xsae_cli.sae import kernels, models
from xsae_cli.sae.metrics import fvu
from xsae_cli.sae.models import (
    ARCHITECTURES,
    SaeConfig,
    _GatherLinear,
    _Pattern,
    _SparseDecode,
    create_sae,
    geometric_median,
)

D_IN, D_SAE, K = 12, 48, 4


def make(arch: str, dtype: str = "float32", device: str | torch.device | None = None, **kw) -> models.SparseAutoencoder:
    k = K if models.get_arch(arch).uses_k else None
    if arch == "matryoshka_batchtopk":
        kw.setdefault("options", {"matryoshka_widths": [12, 24]})
    return create_sae(SaeConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=k, dtype=dtype, **kw), device=device, seed=0)


def data(n: int = 64, d: int = D_IN, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) + 0.3).to(device=device, dtype=dtype)


@pytest.fixture
def one_thread():
    """Tiny matmuls run faster on one thread, and a shared machine does not stall them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["bag", "gather"])
def backend(request, monkeypatch):
    """Run a test with each sparse backend (both exist on CPU)."""
    monkeypatch.setenv(models.SPARSE_BACKEND_ENV, request.param)
    return request.param


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def test_config_validation_names_the_fix():
    with pytest.raises(XsaeError, match="unknown SAE architecture"):
        SaeConfig(arch="matching_pursuit", d_in=4, d_sae=8)
    with pytest.raises(XsaeError, match="needs k"):
        SaeConfig(arch="topk", d_in=4, d_sae=8)
    with pytest.raises(XsaeError, match="larger than d_sae"):
        SaeConfig(arch="batchtopk", d_in=4, d_sae=8, k=9)
    with pytest.raises(XsaeError, match="normalize_activations"):
        SaeConfig(arch="relu", d_in=4, d_sae=8, normalize_activations="whiten")
    with pytest.raises(XsaeError, match="valid keys"):
        SaeConfig.from_dict({"arch": "relu", "d_in": 4, "d_sae": 8, "l1": 1.0})


def test_config_round_trip():
    cfg = SaeConfig(arch="topk", d_in=4, d_sae=8, k=2, metadata={"hook_name": "blocks.0.hook_resid_post"})
    again = SaeConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.metadata["hook_name"] == "blocks.0.hook_resid_post"
    assert cfg.effective_aux_k == 2  # d_in // 2


# ----------------------------------------------------------------------------------------------
# Init
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_init_decoder_unit_norm_encoder_transpose_and_seeded(arch):
    sae = make(arch)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert sae.W_enc.shape == (D_IN, D_SAE) and sae.W_dec.shape == (D_SAE, D_IN)
    assert torch.equal(make(arch).W_dec, sae.W_dec)
    other = create_sae(dataclasses.replace(sae.cfg), seed=1)
    assert not torch.equal(other.W_dec, sae.W_dec)
    if arch in ("jumprelu", "batchtopk"):
        assert sae.threshold.shape == (D_SAE,)


def test_init_b_dec_geometric_median_resists_outliers():
    x = data(200) * 0.1 + 2.0
    x[:5] = 1000.0  # a few massive-activation tokens
    sae = make("topk")
    sae.init_b_dec(x, method="geometric_median")
    assert (sae.b_dec - 2.0).abs().max() < 0.2
    sae.init_b_dec(x, method="mean")
    assert (sae.b_dec - 2.0).abs().min() > 10.0
    with pytest.raises(XsaeError):
        sae.init_b_dec(x, method="median-ish")


def test_geometric_median_matches_a_known_point():
    pts = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
    assert torch.allclose(geometric_median(pts), torch.tensor([1.0, 1.0], dtype=torch.float64), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Shapes and inference semantics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shapes_and_encode_decode_consistency(arch):
    sae = make(arch)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        if arch == "batchtopk":
            sae.threshold.fill_(0.3)
    x = data(30).reshape(5, 6, D_IN)
    codes = sae.encode(x)
    assert codes.shape == (5, 6, D_SAE)
    assert (codes >= 0).all() or arch == "jumprelu"
    x_hat = sae(x)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    assert torch.allclose(sae.decode(codes), x_hat, atol=1e-5)
    assert torch.allclose(sae.decode(codes), codes @ sae.W_dec + sae.b_dec, atol=1e-5)


def test_forward_keeps_input_dtype():
    sae = make("topk")
    x = data(8).to(torch.bfloat16)
    assert sae(x).dtype == torch.bfloat16


def test_wrong_width_is_a_user_error():
    with pytest.raises(XsaeError, match="d_in=12"):
        make("relu").encode(torch.zeros(3, 7))


def test_topk_has_at_most_k_nonzeros_per_row_and_they_are_the_largest():
    sae = make("topk")
    x = data(50)
    codes = sae.encode(x)
    nnz = (codes != 0).sum(-1)
    assert (nnz <= K).all() and (nnz == K).any()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    ref = torch.zeros_like(pre).scatter(1, pre.topk(K, dim=-1).indices, F.relu(pre.topk(K, dim=-1).values))
    assert torch.allclose(codes, ref, atol=1e-6)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_relu_before_selection_drops_negative_pre_activations(arch):
    sae = make(arch)
    with torch.no_grad():
        sae.b_enc.fill_(-50.0)
        sae.b_enc[:2] = 50.0  # only two latents can be positive
    x = data(20)
    out = sae.training_forward(x)
    assert int(out.fired.sum()) == 2 * 20 and float(out.terms["l0"]) == pytest.approx(2.0)
    if arch == "topk":
        codes = sae.encode(x)
        assert (codes >= 0).all() and ((codes != 0).sum(-1) == 2).all()
    ref = (F.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)[:, :2]) @ sae.W_dec[:2] + sae.b_dec
    assert torch.allclose(out.x_hat, ref, atol=1e-4)


def test_batchtopk_trains_on_k_times_batch_and_infers_by_threshold():
    sae = make("batchtopk")
    x = data(40)
    sel = selection_pre(sae, x)
    out = sae.training_forward(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert int(out.fired.sum()) == K * 40  # exactly k * N codes over the whole batch
    assert float(out.terms["l0"]) == pytest.approx(K)
    chosen = F.relu(pre).flatten()[F.relu(sel).flatten().topk(K * 40).indices]  # exact values of the selection
    assert torch.isclose(sae.threshold, chosen.min()).all()  # first step: the smallest kept code
    per_row = (pre >= chosen.min()).sum(-1)
    assert per_row.max() > K and per_row.min() < K  # not k per row: a batch-level budget
    with torch.no_grad():
        sae.threshold.fill_(0.5)
    codes = sae.encode(x)
    assert torch.allclose(codes, pre * (pre > 0.5), atol=1e-6)
    sae.training_forward(x)
    expected = 0.99 * 0.5 + 0.01 * float(chosen.min().detach())  # EMA moves 1% towards this batch's smallest code
    assert float(sae.threshold[0]) == pytest.approx(expected, rel=1e-6)


def test_global_topk_is_exact_on_the_fast_path_and_the_fallback():
    g = torch.Generator().manual_seed(0)
    vals = torch.randn(1100, 1000, generator=g)
    K = 1100 * 8
    ref = vals.flatten().topk(K).indices.sort().values
    assert torch.equal(models._global_topk(vals, K), ref)
    ties = torch.zeros(1100, 1000)  # sampled threshold admits everything: still exact count
    assert models._global_topk(ties, K).numel() == K
    skew = torch.full((1100, 1000), -1.0)
    skew[:, :9] = torch.rand(1100, 9, generator=g)  # top values sit in columns the stride may miss
    assert torch.equal(models._global_topk(skew, K), skew.flatten().topk(K).indices.sort().values)
    trap = torch.rand(1100, 1000, generator=g)
    trap.view(-1)[::251] += 10.0  # the strided sample sees only large values: threshold too high
    assert torch.equal(models._global_topk(trap, K), trap.flatten().topk(K).indices.sort().values)


@pytest.mark.parametrize("mode", ["constant_norm_rescale", "layer_norm"])
def test_per_token_normalisation_round_trips(mode):
    sae = make("relu", normalize_activations=mode)
    x = data(10) * 50
    codes = sae.encode(x)
    assert torch.allclose(sae.decode(codes), sae(x), atol=1e-3)
    with pytest.raises(XsaeError, match="cannot be folded"):
        sae.fold_normalization()


# ----------------------------------------------------------------------------------------------
# Gradients: custom sparse backward against dense autograd
# ----------------------------------------------------------------------------------------------


def selection_pre(sae, x):
    """The pre-activations a training step *selects* with: bf16 where the SAE's path is bf16.

    References select with these and compute values exactly, as the SAE does, so each test keeps
    the tolerance of exact arithmetic on either path (XSAE_BF16_ENCODER=on|off).
    """
    with torch.no_grad():
        return sae._pre(sae._centred(x), training=True)


def _recorded_selection(sae):
    """Wrap ``sae._select`` so each call's pattern is kept: [(mask [N, d_sae], training)]."""
    calls = []
    inner = sae._select

    def select(pre, training):
        pattern, vals = inner(pre, training)
        mask = torch.zeros(pattern.n_rows, pattern.n_cols, dtype=torch.bool, device=pattern.cols.device)
        mask[pattern.rows, pattern.cols] = True
        calls.append(mask)
        return pattern, vals

    sae._select = select
    return calls


def _assert_is_a_top_selection(scores, mask, per_row):
    """``mask`` picks largest entries of ``scores`` (per row, or over the batch); ties may go either way."""
    lo = torch.where(mask, scores, torch.full_like(scores, float("inf")))
    hi = torch.where(mask, torch.full_like(scores, -float("inf")), scores)
    if per_row:
        assert (lo.min(-1).values >= hi.max(-1).values).all()
    else:
        assert lo.min() >= hi.max()


def _dense_reference_loss(sae, x, dead_mask=None, masks=None, sel=None):
    """TopK/BatchTopK loss written with plain dense autograd, on the selection the SAE made.

    Where the selection ran on bf16 pre-activations, nearby values tie and either side of a tie is a
    right answer, so the SAE's own selection (``masks``, from :func:`_recorded_selection`) is used
    after checking that it is a valid top selection of the path's pre-activations (``sel``: those of
    another SAE, e.g. the GPU one a CPU reference checks; default: this SAE's own).
    """
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    sel = selection_pre(sae, x) if sel is None else sel
    n = x.shape[0]
    if sae.cfg.arch == "topk":
        mask = masks[0]
        assert (mask.sum(-1) == K).all()
        _assert_is_a_top_selection(sel, mask, per_row=True)
    else:
        mask = masks[0]
        assert int(mask.sum()) == K * n
        _assert_is_a_top_selection(F.relu(sel), mask, per_row=False)
    codes = F.relu(pre) * mask
    x_hat = codes @ sae.W_dec + sae.b_dec
    err = x_hat - x
    loss = err.pow(2).sum() / n
    if dead_mask is not None and dead_mask.any():
        dead = dead_mask.nonzero().squeeze(1)
        k_aux = min(sae.cfg.effective_aux_k, dead.numel())
        local = sel[:, dead].topk(k_aux, dim=-1).indices
        amask = torch.zeros_like(mask).scatter(1, dead[local], True)
        e_hat = (F.relu(pre) * amask) @ sae.W_dec
        scale = min(dead.numel() / sae.cfg.effective_aux_k, 1.0)
        loss = loss + sae.cfg.aux_k_coefficient * scale * (e_hat + err.detach()).pow(2).sum() / n
    return loss


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("with_dead", [0, 2, 16])  # none; fewer than aux_k (scaled); many
def test_sparse_backward_matches_dense_autograd(arch, dtype, tol, with_dead, backend):
    check_sparse_backward(arch, dtype, tol, with_dead)


def check_sparse_backward(arch, dtype, tol, with_dead, device="cpu"):
    """The sparse path's loss and gradients against dense autograd on the same selection, on ``device``
    (tests/gpu runs it on CUDA with both backends)."""
    sae = make(arch, dtype=dtype, device=device)
    x = data(24, dtype=sae.dtype, device=device)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.2)
        sae.b_enc.normal_(0, 0.2)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(3))[:with_dead]] = True
    dead = dead.to(device)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    masks = _recorded_selection(sae)
    out = sae.training_forward(x, dead_mask=dead)
    ours = torch.autograd.grad(out.loss, params)
    ref_loss = _dense_reference_loss(sae, x, dead, masks)
    ref = torch.autograd.grad(ref_loss, params)
    assert torch.allclose(out.loss, ref_loss, rtol=tol, atol=tol)
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec"], ours, ref):
        scale = b.abs().max().clamp_min(1.0)
        assert (a - b).abs().max() / scale < tol, name


def test_sparse_functions_pass_gradcheck(backend):
    check_sparse_gradcheck(backend)


def check_sparse_gradcheck(backend, device="cpu"):
    """gradcheck (float64) of both sparse autograd functions on a random pattern, on ``device``."""
    g = torch.Generator().manual_seed(0)
    n, d, m, k = 5, 4, 7, 3

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g).to(device).requires_grad_()

    x, b_dec, W_enc, b_enc, W_dec = leaf(n, d), leaf(d), leaf(d, m), leaf(m), leaf(m, d)
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)]).to(device)
    p = _Pattern.from_topk(idx, m, backend)

    def enc(x, b_dec, W_enc, b_enc):
        return _GatherLinear.apply(x, b_dec, W_enc, b_enc, (x - b_dec).detach(), p, None)

    assert torch.autograd.gradcheck(enc, (x, b_dec, W_enc, b_enc))
    vals = leaf(n * k)
    assert torch.autograd.gradcheck(lambda v, w: _SparseDecode.apply(v, w, p), (vals, W_dec))


def test_sorted_csr_mask_meets_torch_invariants_and_samples_the_same_products():
    """Off the CPU the sampled products run on a CSR mask with each row's columns sorted (torch's CSR
    invariant, cuSPARSE's SDDMM); TopK's own columns come unsorted. Both give the same products."""
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(40, generator=g)[:5] for _ in range(7)])
    p = _Pattern.from_topk(idx, 40, "bag")
    a, b = torch.randn(7, 6, generator=g, dtype=torch.float64), torch.randn(40, 6, generator=g, dtype=torch.float64)
    ref = (a[p.rows] * b[p.cols]).sum(-1)
    mask, order = p.csr_mask(a, sort=True)
    torch.sparse_csr_tensor(mask.crow_indices(), mask.col_indices(), mask.values(), mask.shape, check_invariants=True)
    assert torch.equal(p.cols[order], mask.col_indices()) and not torch.equal(order, torch.arange(35))
    with pytest.raises(RuntimeError, match="sorted"):  # the unsorted mask the CPU uses breaks the invariant
        unsorted, _ = p.csr_mask(a, sort=False)
        torch.sparse_csr_tensor(unsorted.crow_indices(), unsorted.col_indices(), unsorted.values(), unsorted.shape, check_invariants=True)
    for sort in (False, True):
        torch.testing.assert_close(kernels._sddmm(p, a, b, sort=sort), ref, rtol=1e-12, atol=1e-12)


def test_auxk_is_zero_without_dead_latents_and_trains_the_dead_ones():
    sae = make("topk")
    x = data(32)
    none_dead = sae.training_forward(x, dead_mask=torch.zeros(D_SAE, dtype=torch.bool))
    assert float(none_dead.terms["aux"]) == 0.0
    assert float(sae.training_forward(x).terms["aux"]) == 0.0
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[D_SAE // 2 :] = True
    out = sae.training_forward(x, dead_mask=dead)
    assert float(out.terms["aux"]) > 0.0
    assert float(out.loss.detach()) > float(none_dead.loss.detach())
    out.loss.backward()
    mse_only = make("topk")
    mse_only.training_forward(x, dead_mask=torch.zeros(D_SAE, dtype=torch.bool)).loss.backward()
    changed = (sae.W_enc.grad - mse_only.W_enc.grad).abs().sum(0) > 0
    assert changed[dead].any() and not changed[~dead].any()  # AuxK reaches dead latents' encoders only


def test_jumprelu_threshold_gets_ste_gradients():
    sae = make("jumprelu", jumprelu_bandwidth=0.5, jumprelu_init_threshold=0.2, l0_coefficient=1.0)
    x = data(64)
    out = sae.training_forward(x)
    out.loss.backward()
    assert sae.threshold.grad is not None and sae.threshold.grad.abs().sum() > 0
    # The L0 term alone pushes up every threshold with pre-activations in its window, by the kernel's count.
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    from xsae_cli.sae.architectures.jumprelu import _Step

    l0 = _Step.apply(pre, sae.threshold, 0.5).sum(-1).mean()
    (grad,) = torch.autograd.grad(l0, sae.threshold)
    in_window = ((pre - sae.threshold).abs() < 0.25).any(0)
    assert (grad[in_window] < 0).all() and (grad[~in_window] == 0).all()
    expected = -(((pre - sae.threshold).abs() < 0.25).double().sum(0) / 0.5 / 64).float()
    assert torch.allclose(grad, expected, atol=1e-6)


def test_decoder_norm_hooks():
    sae = make("topk")
    sae.training_forward(data(16)).loss.backward()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() > 1e-3
    sae.remove_gradient_parallel_to_decoder_directions()  # rows are unit norm here, as after each step
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) * 3 + 0.1)
    sae.set_decoder_norm_to_unit_norm()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-6)
    assert make("topk").unit_norm_decoder and not make("relu").unit_norm_decoder


def test_bf16_selection_keeps_exact_fp32_values():
    sae = make("topk", bf16_encoder=True)
    assert sae.use_bf16_encoder
    x = data(16)
    out = sae.training_forward(x)
    exact = make("topk", bf16_encoder=False).training_forward(x)
    # Same selection on this data; the values are recomputed in fp32, so the loss matches to fp32 rounding.
    assert torch.allclose(out.loss, exact.loss, rtol=1e-5)
    out.loss.backward()
    assert sae.W_enc.grad.dtype == torch.float32


def test_bf16_auto_is_off_where_it_would_be_slow(monkeypatch):
    monkeypatch.delenv(models.BF16_ENCODER_ENV, raising=False)
    cpu_fast = models.bf16_encoder_is_fast("cpu")
    assert make("topk").use_bf16_encoder == cpu_fast
    assert make("batchtopk").use_bf16_encoder == cpu_fast
    assert make("relu").use_bf16_encoder is False  # would train on bf16 values: fp32 unless asked
    assert make("jumprelu").use_bf16_encoder is False
    assert make("topk", bf16_encoder=False).use_bf16_encoder is False
    assert make("relu", bf16_encoder=True).use_bf16_encoder is True
    assert make("topk", dtype="float64", bf16_encoder=True).use_bf16_encoder is False


def test_bf16_env_switch_decides_auto_only(monkeypatch):
    monkeypatch.setenv(models.BF16_ENCODER_ENV, "on")
    assert make("topk").use_bf16_encoder and make("relu").use_bf16_encoder
    assert make("topk", bf16_encoder=False).use_bf16_encoder is False  # an explicit setting wins
    monkeypatch.setenv(models.BF16_ENCODER_ENV, "off")
    assert not make("topk").use_bf16_encoder
    assert make("topk", bf16_encoder=True).use_bf16_encoder
    monkeypatch.setenv(models.BF16_ENCODER_ENV, "sometimes")
    with pytest.raises(XsaeError, match="XSAE_BF16_ENCODER"):
        _ = make("topk").use_bf16_encoder


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_inference_is_exact_whatever_the_training_path(arch):
    """encode/decode/forward never use bf16: a saved SAE gives the same codes on every CPU and GPU."""
    fast, exact = make(arch, bf16_encoder=True), make(arch, bf16_encoder=False)
    with torch.no_grad():
        for sae in (fast, exact):
            sae.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
            if hasattr(sae, "threshold"):
                sae.threshold.fill_(0.05)
    x = data(32)
    with torch.no_grad():
        torch.testing.assert_close(fast.encode(x), exact.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(fast(x), exact(x), rtol=0, atol=0)
        pre = (x - exact.b_dec) @ exact.W_enc + exact.b_enc
        if arch == "gated":  # its values come from the magnitude path
            pre = (x - exact.b_dec) @ exact.W_enc * exact.r_mag.exp() + exact.b_mag
        codes = exact.encode(x)
        on = codes > 0
        torch.testing.assert_close(codes[on], pre[on], rtol=1e-6, atol=1e-6)  # the fp32 values themselves


# ----------------------------------------------------------------------------------------------
# Normalisation folding
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fold_normalization_keeps_reconstructions(arch):
    sae = make(arch, normalize_activations="expected_average_only_in")
    x = data(40) * 37.0
    with pytest.raises(XsaeError, match="fit_normalization"):
        sae(x)
    s = sae.fit_normalization(x)
    assert s == pytest.approx(D_IN**0.5 / float(x.norm(dim=1).mean()), rel=1e-5)
    sae.init_b_dec(x)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        if arch == "batchtopk":
            sae.threshold.fill_(0.1)
    before, codes = sae(x), sae.encode(x)
    sae.fold_normalization()
    assert sae.cfg.normalize_activations == "none" and sae.cfg.norm_scaling_factor is None
    assert torch.allclose(sae(x), before, rtol=1e-4, atol=1e-3)
    assert torch.allclose(sae.encode(x), codes, rtol=1e-4, atol=1e-5)
    assert (before - x).abs().max() > 1.0  # a random SAE: identity would not pass the test above


# ----------------------------------------------------------------------------------------------
# Training on data with a ground-truth dictionary
# ----------------------------------------------------------------------------------------------


def _sparse_dictionary_data(n, d_in, n_feat, active, seed):
    dictionary = F.normalize(torch.randn(n_feat, d_in, generator=torch.Generator().manual_seed(123)), dim=1)
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n_feat, generator=g)[:active] for _ in range(n)])
    mag = torch.rand(n, active, generator=g) * 2 + 0.5
    return F.embedding_bag(idx, dictionary, per_sample_weights=mag, mode="sum") + 1.0


@pytest.mark.parametrize(
    "arch,extra,limit",
    [
        ("topk", {"k": 4}, 0.12),
        ("batchtopk", {"k": 4}, 0.12),
        ("relu", {"l1_coefficient": 0.02}, 0.12),
        ("jumprelu", {"l0_coefficient": 1e-3, "jumprelu_bandwidth": 0.05, "jumprelu_init_threshold": 0.05}, 0.15),
        ("gated", {"options": {"gated_l1_coefficient": 0.02}}, 0.12),
    ],
)
def test_training_recovers_a_sparse_dictionary(arch, extra, limit, one_thread):
    torch.manual_seed(0)
    d_in, n_feat = 16, 32
    train = _sparse_dictionary_data(256 * 300, d_in, n_feat, 3, seed=1)
    held = _sparse_dictionary_data(2048, d_in, n_feat, 3, seed=2)
    sae = create_sae(SaeConfig(arch=arch, d_in=d_in, d_sae=64, **extra), seed=0)
    sae.init_b_dec(train[:256])
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    start = float(fvu(held, sae(held).detach()))
    for i in range(300):
        out = sae.training_forward(train[i * 256 : (i + 1) * 256])
        out.loss.backward()
        if sae.unit_norm_decoder:
            sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if sae.unit_norm_decoder:
            sae.set_decoder_norm_to_unit_norm()
    end = float(fvu(held, sae(held).detach()))
    assert end < limit < start, (start, end)
