"""Numerical guards (issue 10): no NaN / inf from DoRA / BoRA zero rows and columns, LoLDU zero pivots, LoRA-Pro
singular Gram matrices, and C3A / SURM FFT kernels in half precision; every result against a float64 re-derivation.

Tolerances for half-precision outputs: the float64 reference is computed from the *same* (rounded) half inputs and
weights, so what remains is the half rounding of the base GEMM's output, of the adapter's effect and of their sum:
``|y - y_ref| <= HALF_ULPS · eps(dtype) · max|y_ref|`` with ``HALF_ULPS = 4`` (fp16 eps 9.8e-4, bf16 7.8e-3). Adapter
parameters stay fp32 and their gradients are computed in fp32 from exact half inputs: relative error ``<= 1e-4``.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from loraplex import adapt
from loraplex.adapter import Adapter
from loraplex.adapters._circulant import block_circulant_matmul, circulant
from loraplex.adapters._structured import circulant as circulant_first_column
from loraplex.adapters._structured import (
    circulant_matmul,
    ldr_matmul,
    skew_circulant,
    skew_circulant_matmul,
    toeplitz,
    toeplitz_matmul,
)
from loraplex.adapters._structured import ldr as ldr_dense
from loraplex.adapters.bora import BoRA
from loraplex.adapters.c3a import C3A
from loraplex.adapters.circulant import Circulant
from loraplex.adapters.dora import NORM_EPS, DoRA
from loraplex.adapters.ldr import LDR
from loraplex.adapters.loldu import INITS, LoLDU
from loraplex.adapters.toeplitz import Toeplitz
from loraplex.optim.lorapro import LoRAPro, adjusted_grads, equivalent_grad

D = torch.float64
HALF = (torch.float16, torch.bfloat16)
HALF_ULPS = 4


def finite(*ts: Tensor | None) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in ts)


def own_grads(a: Adapter) -> list[Tensor | None]:
    return [p.grad for _, p in a.own_parameters()]


def assert_half_close(y: Tensor, ref: Tensor) -> None:
    """``|y - ref| <= HALF_ULPS · eps(y.dtype) · max|ref|`` (see the module docstring)."""
    bound = HALF_ULPS * torch.finfo(y.dtype).eps * float(ref.abs().max()) + 1e-30
    err = float((y.to(D) - ref).abs().max())
    assert err <= bound, f"{y.dtype}: max error {err:.3g} > {bound:.3g}"


# 1. DoRA / BoRA: zero rows (and BoRA's zero columns) ----------------------------------------------------------------


def gain(norm: Tensor) -> Tensor:
    """The documented gain rule, written out: ``1 / norm`` above NORM_EPS, else 0 (float64)."""
    return torch.tensor([1.0 / v if v > NORM_EPS else 0.0 for v in norm.tolist()], dtype=D)


def dora_reference(a: DoRA) -> Tensor:
    """``W' = diag(m / ‖V‖_row) V`` in float64, a zero row of V giving a zero row of W'."""
    V = a.weight.to(D) + a.scale * a.B.detach().to(D) @ a.A.detach().to(D)
    return (a.m.detach().to(D) * gain(V.norm(dim=1)))[:, None] * V


def bora_reference(a: BoRA) -> Tensor:
    """``U = V diag(m_col / ‖V‖_col)``, ``W' = diag(m_row / ‖U‖_row) U`` in float64, zero norms giving zero gains."""
    V = a.weight.to(D) + a.scale * a.B.detach().to(D) @ a.A.detach().to(D)
    U = V * (a.m_col.detach().to(D) * gain(V.norm(dim=0)))[None, :]
    return (a.m_row.detach().to(D) * gain(U.norm(dim=1)))[:, None] * U


def make_norm_adapter(
    cls: type[DoRA] | type[BoRA], dtype: torch.dtype, dropout: float, m: str, b_state: str
) -> tuple[DoRA | BoRA, nn.Linear]:
    """An adapter over a (6, 8) layer with zero rows 1 and 4 (and for BoRA zero columns 2 and 5)."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    with torch.no_grad():
        base.weight[[1, 4]] = 0
        if cls is BoRA:
            base.weight[:, [2, 5]] = 0
    base = base.to(dtype)
    a = cls(base, rank=2, dropout=dropout)
    with torch.no_grad():
        mags = [a.m] if isinstance(a, DoRA) else [a.m_row, a.m_col]
        for p in mags:
            if m == "one":
                p.fill_(1.0)
            elif m == "big":  # a gain of 1e8 / 1e-12 squared overflowed fp32 in BoRA's row norm
                p.fill_(1e8)
        if b_state != "zero":
            a.B.normal_()
        if b_state == "zero_rows":  # the zero rows of W0 stay zero rows of V after B moved
            a.B[[1, 4]] = 0
    return a, base


@pytest.mark.parametrize(
    ("cls", "dtype", "dropout", "m", "b_state"),
    list(
        itertools.product(
            (DoRA, BoRA),
            (torch.float32, torch.bfloat16, torch.float16),
            (0.0, 0.1),
            ("init", "one", "big"),
            ("zero", "random", "zero_rows"),
        )
    ),
)
def test_dora_bora_zero_rows_and_columns_stay_finite(
    cls: type[DoRA] | type[BoRA], dtype: torch.dtype, dropout: float, m: str, b_state: str
) -> None:
    """Forward (fused fp32 node and unfused path), backward, delta_weight and merge: finite and as re-derived.

    Before the fix: DoRA fp16 with m = 1 on a zero row gave a NaN input gradient (gain 1e12 cast to fp16);
    BoRA fp16 with m_col = 1 on a zero column a NaN output; BoRA fp32 with m = 1e8 NaN everywhere.
    """
    if m == "big" and dtype == torch.float16:
        pytest.skip("gains of 1e8 overflow fp16 outputs legitimately")
    a, base = make_norm_adapter(cls, dtype, dropout, m, b_state)
    a.train()
    x = torch.randn(5, 8, dtype=dtype, requires_grad=True)
    assert a.fusable(x) == (dtype == torch.float32 and not dropout) or cls is BoRA
    y = a(x)
    gy = torch.randn_like(y)
    (y.float() * gy.float()).sum().backward()
    dw = a.delta_weight()
    assert y.dtype == dtype
    assert finite(y, x.grad, dw, *own_grads(a))
    ref = dora_reference(a) if isinstance(a, DoRA) else bora_reference(a)
    # delta_weight against the re-derivation; the zero rows of W0 that are zero in V stay exactly zero
    torch.testing.assert_close(
        base.weight.to(D) + dw.detach().to(D), ref, rtol=1e-5, atol=1e-5 * (1 + float(ref.abs().max()))
    )
    if b_state != "random":
        assert torch.equal(dw.detach()[[1, 4]], torch.zeros_like(dw[[1, 4]]))
    if not dropout:  # deterministic: the output against x W'^T + b, from the same rounded inputs
        y_ref = x.detach().to(D) @ ref.T + base.bias.to(D)
        if dtype == torch.float32:
            torch.testing.assert_close(y.to(D), y_ref, rtol=1e-5, atol=1e-5 * float(y_ref.abs().max()))
        else:
            assert_half_close(y.detach(), y_ref)
    # merge: W0 + ΔW is finite and stays so in the base dtype
    assert finite((base.weight.float() + dw.detach().float()).to(dtype))


@settings(max_examples=30, deadline=None)
@given(
    n_in=st.integers(1, 7),
    n_out=st.integers(1, 7),
    data=st.data(),
)
def test_dora_bora_random_zero_patterns(n_in: int, n_out: int, data: st.DataObject) -> None:
    """Hypothesis over shapes, zero rows / columns (all of them included), magnitudes and dtypes."""
    cls = data.draw(st.sampled_from(["dora", "bora"]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    rows = data.draw(st.sets(st.integers(0, n_out - 1)))
    cols = data.draw(st.sets(st.integers(0, n_in - 1)))
    mag = data.draw(st.sampled_from([0.0, 1.0, None]))  # None: the init magnitudes
    seed = data.draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out)
    with torch.no_grad():
        base.weight[sorted(rows)] = 0
        base.weight[:, sorted(cols)] = 0
    base = base.to(dtype)
    a: DoRA | BoRA = DoRA(base, rank=1) if cls == "dora" else BoRA(base, rank=1)
    with torch.no_grad():
        if mag is not None:
            for _, p in a.own_parameters():
                if p.ndim == 1:
                    p.fill_(mag)
        a.B.normal_()
        a.B[sorted(rows)] = 0
    x = torch.randn(3, n_in, dtype=dtype, requires_grad=True)
    y = a(x)
    y.float().sum().backward()
    dw = a.delta_weight()
    assert finite(y, x.grad, dw, *own_grads(a))
    ref = dora_reference(a) if isinstance(a, DoRA) else bora_reference(a)
    torch.testing.assert_close(
        base.weight.to(D) + dw.detach().to(D), ref, rtol=1e-5, atol=1e-5 * (1 + float(ref.abs().max()))
    )


def test_zero_row_gain_is_zero_not_m_over_eps() -> None:
    """The documented decision: a zero row of V gets gain 0, so m's gradient there is 0 and B's row gets none."""
    a, _ = make_norm_adapter(DoRA, torch.float32, 0.0, "one", "zero_rows")
    x = torch.randn(4, 8)
    a(x).sum().backward()
    gB, gm = a.B.grad, a.m.grad
    assert isinstance(gB, Tensor) and isinstance(gm, Tensor)
    assert torch.equal(gB[[1, 4]], torch.zeros(2, 2))
    assert torch.equal(gm[[1, 4]], torch.zeros(2))
    assert float(gB.abs().max()) < 1e3  # an eps floor made these rows' gradient about m · 1e12


# 2. LoLDU: zero pivots -------------------------------------------------------------------------------------------


def singular_weights() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(3)
    w = {
        "zero": torch.zeros(6, 5),
        "rank1": torch.outer(torch.randn(6, generator=gen), torch.randn(5, generator=gen)),
        "zero_first_row": torch.randn(6, 5, generator=gen),
        "zero_first_col": torch.randn(6, 5, generator=gen),
        "dependent_rows": torch.randn(5, 5, generator=gen),
        "wide_rank2": (torch.randn(4, 2, generator=gen) @ torch.randn(2, 7, generator=gen)),
        # a pivot of 1e-37 under an entry of 1e3: dividing gave U = 1e40 = inf in fp32, then a NaN output
        "tiny_pivot": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1e-37, 1e3], [0.0, 0.0, 1.0]]),
    }
    w["zero_first_row"][0] = 0
    w["zero_first_col"][:, 0] = 0
    w["dependent_rows"][3] = w["dependent_rows"][1] + w["dependent_rows"][2]
    return w


@pytest.mark.parametrize("name", list(singular_weights()))
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_loldu_zero_pivots_stay_finite(name: str, init: str, dtype: torch.dtype) -> None:
    W = singular_weights()[name]
    lin = nn.Linear(W.shape[1], W.shape[0]).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
    r = min(W.shape)
    torch.manual_seed(0)
    a = LoLDU(lin, rank=r, init=init)
    if dtype == torch.float64:
        a.double()
    assert finite(a.PL, a.U, a.d, a.z)
    x = torch.randn(3, W.shape[1], dtype=dtype, requires_grad=True)
    y = a(x)
    y.float().sum().backward()
    dw = a.delta_weight()
    assert finite(y, x.grad, a.z.grad, dw)
    # the factors rebuild W0 (a zero pivot's row is kept undivided: coefficient 1 instead of d)
    Wq = lin.weight.detach().to(D)
    coef = torch.where(a.d != 0, a.d, torch.ones_like(a.d)).to(D)
    rebuilt = a.PL.to(D) @ (coef[:, None] * a.U.to(D))
    torch.testing.assert_close(rebuilt, Wq, rtol=1e-5, atol=1e-5 * (1 + float(Wq.abs().max())))
    # ΔW = σ PL diag(z - d) U, re-derived; zero at the "lu" init
    want = a.scale * a.PL.to(D) @ ((a.z.detach() - a.d).to(D)[:, None] * a.U.to(D))
    torch.testing.assert_close(dw.detach().to(D), want, rtol=1e-5, atol=1e-5 * (1 + float(want.abs().max())))
    if init == "lu":
        assert torch.equal(dw.detach(), torch.zeros_like(dw))
    # unit-diagonal U where the pivot is kept, bounded by 1 / eps everywhere (no overflow in x U^T)
    assert float(a.U.abs().max()) <= 1.0 / torch.finfo(a.U.dtype).eps * (1 + float(Wq.abs().max()))


@settings(max_examples=30, deadline=None)
@given(n_in=st.integers(1, 8), n_out=st.integers(1, 8), data=st.data())
def test_loldu_random_rank_deficient(n_in: int, n_out: int, data: st.DataObject) -> None:
    """Hypothesis: products of random factors of every smaller rank, with zeroed rows / columns."""
    k = data.draw(st.integers(0, min(n_in, n_out)))
    seed = data.draw(st.integers(0, 2**16))
    init = data.draw(st.sampled_from(INITS))
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n_out, k, generator=gen) @ torch.randn(k, n_in, generator=gen)
    W[sorted(data.draw(st.sets(st.integers(0, n_out - 1))))] = 0  # zero rows, the first one included at times
    lin = nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.copy_(W)
    a = LoLDU(lin, rank=min(n_in, n_out), init=init)
    x = torch.randn(2, n_in, requires_grad=True)
    y = a(x)
    y.sum().backward()
    assert finite(a.PL, a.U, a.d, y, x.grad, a.z.grad, a.delta_weight())


# 3. LoRA-Pro: singular BᵀB / AAᵀ ----------------------------------------------------------------------------------


def sylvester_reference(P: Tensor, Q: Tensor, C: Tensor, ridge: float) -> Tensor:
    """``(P ⊗ I + I ⊗ Qᵀ + ridge I) vec X = vec C`` (row-major vec); pseudo-inverted when ``ridge = 0``."""
    r, q = C.shape
    K = torch.kron(P, torch.eye(q, dtype=D)) + torch.kron(torch.eye(r, dtype=D), Q.T.contiguous())
    K = K + ridge * torch.eye(r * q, dtype=D)
    sol = torch.linalg.pinv(K, hermitian=True) @ C.reshape(-1) if ridge == 0 else torch.linalg.solve(K, C.reshape(-1))
    return sol.reshape(r, q)


def gram_inverse(M: Tensor, ridge: float) -> Tensor:
    """The documented ``(M + ridge I)⁻¹`` (pseudo-inverse when ``ridge = 0``)."""
    eye = torch.eye(M.shape[0], dtype=D)
    return torch.linalg.pinv(M, hermitian=True) if ridge == 0 else torch.linalg.inv(M + ridge * eye)


def lorapro_reference(A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, s: float, ridge: float) -> tuple[Tensor, Tensor]:
    """The module docstring's closed form in float64 (methods.md section 5), B = 0 by the step-0 rule."""
    A, B, gA, gB = (t.to(D) for t in (A, B, gA, gB))
    AAt_inv = gram_inverse(A @ A.T, ridge)
    if not bool(B.any()):
        return gA, gB @ AAt_inv / s**2
    BtB = B.T @ B
    BtB_inv = gram_inverse(BtB, ridge)
    X = sylvester_reference(BtB, A @ A.T, -(BtB_inv @ gA @ A.T) / s**2, ridge)
    new_A = BtB_inv @ gA / s**2 + X @ A
    new_B = (torch.eye(B.shape[0], dtype=D) - B @ BtB_inv @ B.T) @ gB @ AAt_inv / s**2 - B @ X
    return new_A, new_B


def singular_pair(kind_a: str, kind_b: str, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    r, n_in, n_out = 3, 7, 6
    A = torch.randn(r, n_in, generator=gen, dtype=D)
    B = torch.randn(n_out, r, generator=gen, dtype=D)
    if kind_a == "zero_row":
        A[2] = 0
    elif kind_a == "dependent":
        A[2] = A[0] - 2 * A[1]
    if kind_b == "zero":
        B.zero_()
    elif kind_b == "zero_col":
        B[:, 1] = 0
    elif kind_b == "rank1":
        B = torch.randn(n_out, 1, generator=gen, dtype=D) @ torch.randn(1, r, generator=gen, dtype=D)
    g = torch.randn(n_out, n_in, generator=gen, dtype=D)
    return A, B, g


@pytest.mark.parametrize("kind_a", ["full", "zero_row", "dependent"])
@pytest.mark.parametrize("kind_b", ["zero", "zero_col", "rank1", "full"])
@pytest.mark.parametrize("ridge", [1e-8, 1e-3, 0.0])
def test_lorapro_singular_grams_match_the_float64_solution(kind_a: str, kind_b: str, ridge: float) -> None:
    """Finite, and equal to the documented regularised (ridge > 0) or pseudo-inverse (ridge = 0) solution.

    Before the fix, ridge = 0 with an exactly singular BᵀB and AAᵀ gave 0 / 0 = NaN in the Sylvester solve.

    One case is compared through its equivalent gradient only: B and A both singular to rounding (not exactly) with
    ridge 1e-8. There the documented formula multiplies rounding noise (1e-16) in the null spaces by 1 / ridge twice
    (through (BᵀB + ridge I)⁻¹, then (AAᵀ + ridge I)⁻¹): g^B's part along null(Aᵀ) is noise of order 0.1 in any
    float64 evaluation (ours and this re-derivation differ there by 0.15), but A annihilates it, so the equivalent
    gradient, the step on W, is determined and matches.
    """
    s = 2.0
    A, B, g = singular_pair(kind_a, kind_b, seed=7)
    gA, gB = s * B.T @ g, s * g @ A.T
    got_A, got_B = adjusted_grads(A, B, gA, gB, s, ridge)
    assert finite(got_A, got_B)
    want_A, want_B = lorapro_reference(A, B, gA, gB, s, ridge)
    if ridge == 1e-8 and kind_a == "dependent" and kind_b == "rank1":
        want = equivalent_grad(A, B, want_A, want_B, s)
        torch.testing.assert_close(equivalent_grad(A, B, got_A, got_B, s), want, rtol=1e-6, atol=1e-6)
        return
    scale = 1 + float(max(want_A.abs().max(), want_B.abs().max()))
    torch.testing.assert_close(got_A, want_A, rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(got_B, want_B, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("kind_a", ["full", "zero_row"])
@pytest.mark.parametrize("kind_b", ["zero_col", "rank1"])
def test_lorapro_pseudo_inverse_gives_the_projected_gradient(kind_a: str, kind_b: str) -> None:
    """Ground truth for ridge = 0: the equivalent gradient is ``P_B g + g P_A - P_B g P_A``, pinv projectors."""
    s = 1.5
    A, B, g = singular_pair(kind_a, kind_b, seed=11)
    new_A, new_B = adjusted_grads(A, B, s * B.T @ g, s * g @ A.T, s, ridge=0.0)
    P_B = B @ torch.linalg.pinv(B)
    P_A = torch.linalg.pinv(A) @ A
    want = P_B @ g + g @ P_A - P_B @ g @ P_A
    torch.testing.assert_close(equivalent_grad(A, B, new_A, new_B, s), want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("mode", ["full", "low"])
@pytest.mark.parametrize("ridge", [1e-8, 0.0])
def test_lorapro_steps_from_zero_b_with_rank_one_gradients(mode: str, ridge: float) -> None:
    """B = 0 at init, then one token per batch: a rank-1 B whose BᵀB is singular; every step stays finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    adapt(model, "lora", rank=3)
    opt = LoRAPro(model, lr=1e-2, mode=mode, ridge=ridge)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(1, 6)).square().sum().backward()
        opt.step()
        assert all(finite(p) for p in model.parameters())


def test_lorapro_step_zero_b_matches_the_reference_rule() -> None:
    """B exactly zero: ``g^A = g_A``, ``g^B = (1/s²) g_B (AAᵀ + ridge I)⁻¹`` (the reference's step 0)."""
    A, B, g = singular_pair("full", "zero", seed=5)
    s = 2.0
    gA, gB = s * B.T @ g, s * g @ A.T
    got_A, got_B = adjusted_grads(A, B, gA, gB, s, 1e-8)
    assert torch.equal(got_A, gA)
    torch.testing.assert_close(got_B, gB @ torch.linalg.inv(A @ A.T + 1e-8 * torch.eye(3, dtype=D)) / s**2)


# 4. C3A and the SURM FFT kernels in half precision ---------------------------------------------------------------


def fft_adapters() -> dict[str, tuple[type[Adapter], dict[str, object]]]:
    return {
        "c3a": (C3A, {"block_size": 32}),
        "circulant": (Circulant, {}),
        "toeplitz": (Toeplitz, {}),
        "ldr": (LDR, {"displacement_rank": 2}),
    }


def set_params(a: Adapter, name: str, gen: torch.Generator) -> None:
    """Non-trivial parameters whose ΔW keeps outputs of inputs near 1e3 well inside fp16 (|ΔW| ~ 1 / d)."""
    d = a.in_features
    with torch.no_grad():
        if isinstance(a, C3A):
            a.kernel.copy_(torch.randn(a.kernel.shape, generator=gen))  # ΔW = C(w) / d_in
        elif isinstance(a, Circulant):
            assert a.b is not None
            a.a.copy_(torch.randn(d, generator=gen))
            a.b.copy_(torch.randn(d, generator=gen) / d)
        elif isinstance(a, Toeplitz):
            # x T(a) ≈ 1e3 · d = 1.28e5 for positive inputs: past fp16's 65504 unless kept in fp32
            a.a.copy_(1 + 0.1 * torch.randn(d, generator=gen))
            a.b.copy_(torch.randn(d, generator=gen) / d**2)
        else:
            assert isinstance(a, LDR)
            a.g.copy_(torch.randn(a.g.shape, generator=gen) / d)
            a.h.copy_(torch.randn(a.h.shape, generator=gen) / d)


def float64_reference(a: Adapter, x: Tensor, gy: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Output, input gradient and parameter gradients of a float64 copy (same rounded half weights and inputs)."""
    ref = copy.deepcopy(a).double()
    ref.zero_grad()
    x64 = x.detach().to(D).requires_grad_()
    y = ref(x64)
    (y * gy.to(D)).sum().backward()
    assert x64.grad is not None
    return y.detach(), x64.grad, [p.grad for _, p in ref.own_parameters()]  # type: ignore[misc]


@pytest.mark.parametrize("method", list(fft_adapters()))
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("magnitude", [1.0, 1e3])
@pytest.mark.parametrize("where", ["base", "all"])
@pytest.mark.parametrize("rows", [4, 160])
def test_fft_adapters_in_half_precision(
    method: str, dtype: torch.dtype, magnitude: float, where: str, rows: int
) -> None:
    """fp16 / bf16 base model (fp32 adapter) or everything half (``model.half()`` after adapting), FFT and merged paths.

    Output dtype = input dtype, finite forward and backward, output and gradients close to float64. Before the fixes:
    C3A and Circulant with a half kernel raised ``RuntimeError: Unsupported dtype Half`` (CPU FFTs), and Toeplitz
    rounded ``x T(a)`` to fp16 (inf, then NaN, at magnitude 1e3).
    """
    cls, opts = fft_adapters()[method]
    gen = torch.Generator().manual_seed(1)
    base = nn.Linear(128, 128)
    a = cls(base.to(dtype), **opts)  # type: ignore[call-arg]
    set_params(a, method, gen)
    if where == "all":
        a.to(dtype)
    x = (magnitude * (1 + 0.1 * torch.randn(rows, 128, generator=gen))).to(dtype).requires_grad_()
    y = a(x)
    gy = torch.randn(y.shape, generator=gen).to(dtype)
    (y * gy).float().sum().backward()
    assert y.dtype == dtype
    assert x.grad is not None and x.grad.dtype == dtype
    assert finite(y, x.grad)
    y_ref, gx_ref, gp_ref = float64_reference(a, x, gy)
    assert_half_close(y.detach(), y_ref)
    assert_half_close(x.grad, gx_ref)
    for got, want in zip(own_grads(a), gp_ref, strict=True):
        assert got is not None and want is not None
        if where == "base":  # fp32 parameters: gradients computed in fp32 from exact half inputs
            assert finite(got)
            torch.testing.assert_close(got.to(D), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        elif magnitude == 1.0:
            # Half parameters: only where no intermediate gradient nears the half range. At 1e3 the fp16 gradient of
            # ΔW (gy^T x, merged path) or of c = a ⊙ b overflows even where the parameter's own gradient would fit:
            # ordinary fp16 training overflow, which a GradScaler detects; adapters are fp32 unless cast.
            assert finite(got)
            assert_half_close(got, want)


def test_toeplitz_fp16_intermediate_would_overflow() -> None:
    """The case the fix is for: ``x T(a)`` beyond 65504 while ``x T(a) T(αb)`` fits fp16."""
    a = Toeplitz(nn.Linear(128, 128).half())
    set_params(a, "toeplitz", torch.Generator().manual_seed(2))
    x = torch.full((2, 128), 1e3, dtype=torch.float16)
    inner = x.double() @ toeplitz(a.a.detach().double())
    assert float(inner.abs().max()) > torch.finfo(torch.float16).max
    y = a(x)
    assert finite(y)
    assert_half_close(y.detach(), float64_reference(a, x, torch.ones_like(y))[0])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("magnitude", [1.0, 1e3])
def test_fft_kernels_take_half_inputs_and_generators(dtype: torch.dtype, magnitude: float) -> None:
    """Every FFT product of _structured.py and _circulant.py, inputs and generators half: finite, x's dtype, close.

    d = 128 and inputs near 1e3: the DC term of rfft(x) is about 1.3e5, past fp16's range if computed in fp16.
    """
    gen = torch.Generator().manual_seed(4)
    d = 128
    x = (magnitude * (1 + 0.1 * torch.randn(3, d, generator=gen))).to(dtype)
    c = (torch.randn(d, generator=gen) / d).to(dtype)
    g, h = ((torch.randn(2, d, generator=gen) / d).to(dtype) for _ in range(2))
    w = (torch.randn(4, 4, 32, generator=gen) / d).to(dtype)
    x64 = x.to(D)
    cases = {
        "circulant": (circulant_matmul(x, c), x64 @ circulant_first_column(c.to(D)).T),
        "toeplitz": (toeplitz_matmul(x, c), x64 @ toeplitz(c.to(D))),
        "skew": (skew_circulant_matmul(x, c), x64 @ skew_circulant(c.to(D)).T),
        "ldr": (ldr_matmul(x, g, h), x64 @ ldr_dense(g.to(D), h.to(D)).T),
        "block_circulant": (block_circulant_matmul(x, w, 0.5), 0.5 * x64 @ circulant(w.to(D)).T),
    }
    for name, (got, want) in cases.items():
        assert got.dtype == dtype, name
        assert finite(got), name
        assert_half_close(got, want)


@pytest.mark.parametrize("dtype", HALF)
def test_block_circulant_backward_with_half_kernel(dtype: torch.dtype) -> None:
    """Gradients of the C3A kernel op with a half kernel: finite, in the kernel's dtype, close to float64."""
    gen = torch.Generator().manual_seed(6)
    x = (1e3 * torch.randn(5, 64, generator=gen)).to(dtype).requires_grad_()
    w = (torch.randn(2, 2, 32, generator=gen) / 64).to(dtype).requires_grad_()
    y = block_circulant_matmul(x, w)
    gy = torch.randn(y.shape, generator=gen).to(dtype)
    (y * gy).float().sum().backward()
    x64, w64 = x.detach().to(D).requires_grad_(), w.detach().to(D).requires_grad_()
    (x64 @ circulant(w64).T * gy.to(D)).sum().backward()
    assert x.grad is not None and w.grad is not None and x64.grad is not None and w64.grad is not None
    assert w.grad.dtype == dtype and finite(x.grad, w.grad)
    assert_half_close(x.grad, x64.grad)
    assert_half_close(w.grad, w64.grad)
