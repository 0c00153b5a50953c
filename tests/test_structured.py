"""SURM's structured kernels (loraplex/adapters/_structured.py) against their definitions.

Every dense matrix here is built from its definition (index and sign tables listed in Python), never with the
module's own index tricks; every FFT product and fast builder is compared with it, in values and in
gradients with respect to the input and to the generating vectors.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.adapters._structured import (
    circulant,
    circulant_matmul,
    fast_length,
    ldr,
    ldr_matmul,
    skew_circulant,
    skew_circulant_matmul,
    toeplitz,
    toeplitz_matmul,
    twist,
)

TOL = {torch.float64: {"rtol": 1e-9, "atol": 1e-10}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}
SIZES = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 16, 17])  # odd, even, prime, powers of two
DTYPES = st.sampled_from([torch.float64, torch.float32])


def from_definition(v: torch.Tensor, entry) -> torch.Tensor:  # noqa: ANN001
    """The d x d matrix whose (i, j) entry is ``sign * v[k]`` for ``(k, sign) = entry(i, j, d)``, listed in Python."""
    d = v.shape[0]
    table = [[entry(i, j, d) for j in range(d)] for i in range(d)]
    index = torch.tensor([[k for k, _ in row] for row in table])
    sign = torch.tensor([[s for _, s in row] for row in table], dtype=v.dtype)
    return v[index] * sign


def C(c: torch.Tensor) -> torch.Tensor:
    return from_definition(c, lambda i, j, d: ((i - j) % d, 1))


def T(v: torch.Tensor) -> torch.Tensor:
    return from_definition(v, lambda i, j, d: (abs(i - j), 1))


def S(h: torch.Tensor) -> torch.Tensor:
    return from_definition(h, lambda i, j, d: (i - j, 1) if i >= j else (i - j + d, -1))


def rand(*shape: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)


def assert_same_function(got: torch.Tensor, want: torch.Tensor, inputs: list[torch.Tensor], g, dtype) -> None:  # noqa: ANN001
    """Values, and gradients of a random linear functional with respect to every input, agree."""
    torch.testing.assert_close(got, want, **TOL[dtype])
    cot = torch.randn(got.shape, generator=g, dtype=dtype)
    gots = torch.autograd.grad(got, inputs, cot, allow_unused=True)
    wants = torch.autograd.grad(want, inputs, cot, allow_unused=True)
    for u, v in zip(gots, wants, strict=True):
        torch.testing.assert_close(u, v, **TOL[dtype])


# 1. Dense builders --------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(d=SIZES, R=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_builders_equal_the_definitions(d: int, R: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    v, w = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    assert torch.equal(circulant(v), C(v))  # exact copies of entries
    assert torch.equal(toeplitz(v), T(v))
    assert torch.equal(skew_circulant(v), S(v))
    assert torch.equal(circulant(torch.stack([v, w])), torch.stack([C(v), C(w)]))  # batched
    # the O(R d²) LDR builder: rounding only, against dense products of the definitions
    gs, hs = torch.randn(R, d, generator=g, dtype=torch.float64), torch.randn(R, d, generator=g, dtype=torch.float64)
    want = sum(C(gs[r]) @ S(hs[r]) for r in range(R))
    torch.testing.assert_close(ldr(gs, hs), want, rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(d=SIZES, R=st.integers(1, 3), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_the_ldr_builder_has_the_dense_gradients(d: int, R: int, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    gs, hs = rand(R, d, g=g, dtype=dtype), rand(R, d, g=g, dtype=dtype)
    want = sum(C(gs[r]) @ S(hs[r]) for r in range(R))
    assert_same_function(ldr(gs, hs), want, [gs, hs], g, dtype)


def test_the_ldr_builder_rounds_like_a_matmul_at_d384() -> None:
    """fp32 at a real layer size: the running sum stays as accurate as the dense products."""
    g = torch.Generator().manual_seed(0)
    gs, hs = torch.randn(2, 384, generator=g), torch.randn(2, 384, generator=g)
    exact = (circulant(gs.double()) @ skew_circulant(hs.double())).sum(0)
    assert (ldr(gs, hs).double() - exact).abs().max() / exact.abs().max() < 2e-6


# 2. FFT products ----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    d=SIZES,
    rows=st.integers(1, 4),
    R=st.integers(1, 3),
    dtype=DTYPES,
    seed=st.integers(0, 2**16),
)
def test_fft_products_equal_the_dense_products(d: int, rows: int, R: int, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = rand(2, rows, d, g=g, dtype=dtype)  # leading dims are rows too
    v = rand(d, g=g, dtype=dtype)
    assert_same_function(circulant_matmul(x, v), x @ C(v).T, [x, v], g, dtype)
    assert_same_function(toeplitz_matmul(x, v), x @ T(v).T, [x, v], g, dtype)
    assert_same_function(skew_circulant_matmul(x, v), x @ S(v).T, [x, v], g, dtype)
    gs, hs = rand(R, d, g=g, dtype=dtype), rand(R, d, g=g, dtype=dtype)
    want = x @ sum(C(gs[r]) @ S(hs[r]) for r in range(R)).T
    assert_same_function(ldr_matmul(x, gs, hs), want, [x, gs, hs], g, dtype)


def test_the_products_are_the_convolutions() -> None:
    """Orientation: C(c) v is the circular convolution c ⊛ v, S(h) v the negacyclic one."""
    d = 5
    c, v = torch.arange(1.0, d + 1, dtype=torch.float64), torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    cyclic = torch.stack([sum(c[(i - j) % d] * v[j] for j in range(d)) for i in range(d)])
    nega = torch.stack([sum((c[i - j] if j <= i else -c[i - j + d]) * v[j] for j in range(d)) for i in range(d)])
    torch.testing.assert_close(circulant_matmul(v, c), cyclic)
    torch.testing.assert_close(skew_circulant_matmul(v, c), nega)
    torch.testing.assert_close(circulant(c)[:, 0], c)  # first column
    torch.testing.assert_close(skew_circulant(c)[:, 0], c)


def test_the_reference_skew_product_and_its_root() -> None:
    """The reference's skew_mult formula, ``Re(conj(ψ) ifft(fft(hψ) fft(vψ)))``, is ``S(h) v`` only with
    ψ from a root of ``x^d = -1``; with its ``compute_root(d + 1)`` (a root of ``x^(d+1) = -1``) it is not
    even a negacyclic product; and its dense ``skew_circulant_matrix(h)`` (first row h) is ``S(h)^T``."""
    d = 6
    g = torch.Generator().manual_seed(0)
    h, v = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)

    def skew_mult(root: complex) -> torch.Tensor:
        psi = torch.tensor([root**k for k in range(d)], dtype=torch.complex128)
        return (psi.conj() * torch.fft.ifft(torch.fft.fft(h * psi) * torch.fft.fft(v * psi))).real

    torch.testing.assert_close(skew_mult(complex(math.cos(math.pi / d), math.sin(math.pi / d))), S(h) @ v)
    off_by_one = complex(math.cos(math.pi / (d + 1)), math.sin(math.pi / (d + 1)))
    assert not torch.allclose(skew_mult(off_by_one), S(h) @ v, atol=1e-3)
    first_row_form = torch.stack([torch.cat([-h.roll(i)[:i], h.roll(i)[i:]]) for i in range(d)])
    torch.testing.assert_close(first_row_form, S(h).T)


def test_odd_sizes_keep_their_length() -> None:
    """The reference's ``irfft(rfft(x) * rfft(c))`` loses an entry for odd d; ours passes n = d."""
    c, x = torch.randn(7), torch.randn(3, 7)
    assert torch.fft.irfft(torch.fft.rfft(x) * torch.fft.rfft(c)).shape[-1] == 6
    assert circulant_matmul(x, c).shape == (3, 7)


def test_twist_is_a_primitive_2d_th_root() -> None:
    for d in (1, 2, 3, 7, 384):
        psi = twist(d, torch.float64)
        root = psi[1] if d > 1 else torch.tensor(-1 + 0j, dtype=torch.complex128)  # d = 1: ψ_1 = -1
        torch.testing.assert_close(root**d, torch.tensor(-1 + 0j, dtype=torch.complex128))
        assert all(abs(root**k - 1) > 1e-9 for k in range(1, 2 * d))  # primitive: order exactly 2d
        torch.testing.assert_close(psi.abs(), torch.ones(d, dtype=torch.float64))
    assert twist(5).dtype == torch.complex64


def test_fast_length_is_the_smallest_5_smooth() -> None:
    def smooth(n: int) -> bool:
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        return n == 1

    for n in range(1, 400):
        got = fast_length(n)
        assert got >= n and smooth(got) and not any(smooth(m) for m in range(n, got))
    assert fast_length(2 * 384 - 1) == 768  # the reference's power of two would be 1024


# 3. Dtypes, empty inputs, errors ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_inputs_compute_in_fp32(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    d = 12
    v = rand(d, g=g, dtype=torch.float32)
    gs, hs = rand(2, d, g=g, dtype=torch.float32), rand(2, d, g=g, dtype=torch.float32)
    x = torch.randn(5, d, generator=g).to(dtype).requires_grad_(True)
    for fn, dense in [
        (lambda x: circulant_matmul(x, v), C(v)),
        (lambda x: toeplitz_matmul(x, v), T(v)),
        (lambda x: skew_circulant_matmul(x, v), S(v)),
        (lambda x: ldr_matmul(x, gs, hs), sum(C(gs[r]) @ S(hs[r]) for r in range(2))),
    ]:
        y = fn(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), x.float() @ dense.T, rtol=2e-2, atol=2e-2)
        y.float().sum().backward()
        assert x.grad is not None and x.grad.dtype == dtype
        x.grad = None
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in (v, gs, hs))


def test_empty_inputs() -> None:
    v, gs, hs = torch.randn(6, requires_grad=True), torch.randn(2, 6, requires_grad=True), torch.randn(2, 6)
    x = torch.zeros(0, 6)
    for y in (circulant_matmul(x, v), toeplitz_matmul(x, v), skew_circulant_matmul(x, v), ldr_matmul(x, gs, hs)):
        assert y.shape == (0, 6)
        y.sum().backward()
    assert torch.equal(v.grad, torch.zeros(6)) and torch.equal(gs.grad, torch.zeros(2, 6))


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"g and h must both be \(R, d\), got \(2, 4\) and \(3, 4\)"):
        ldr(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="g and h must both be"):
        ldr_matmul(torch.zeros(1, 4), torch.zeros(4), torch.zeros(4))
