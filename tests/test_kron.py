"""The Kronecker kernel ``kron_linear`` against ``x @ torch.kron(B, A).T`` (values, gradients, dtypes), and the
Kronecker LoRA adapter (SURM) against its reference formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from matrix import MODELS
from torch import nn

import loraplex
from loraplex.adapters._kron import kron_flops, kron_linear
from loraplex.adapters.kronecker import Kronecker, auto_factor, rank_bound

TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}


@settings(max_examples=60, deadline=None)
@given(
    p=st.integers(1, 6),
    q=st.integers(1, 6),
    s=st.integers(1, 6),
    t=st.integers(1, 6),
    lead=st.sampled_from([(), (0,), (1,), (4,), (2, 3)]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_equals_the_dense_kronecker_product(
    p: int, q: int, s: int, t: int, lead: tuple[int, ...], dtype: torch.dtype, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(p, q, generator=g, dtype=dtype, requires_grad=True)
    A = torch.randn(s, t, generator=g, dtype=dtype, requires_grad=True)
    x = torch.randn(*lead, q * t, generator=g, dtype=dtype, requires_grad=True)
    got, want = kron_linear(x, B, A), x @ torch.kron(B, A).T
    assert got.shape == (*lead, p * s) and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])
    gy = torch.randn(*lead, p * s, generator=g, dtype=dtype)
    for u, v in zip(torch.autograd.grad(got, [x, B, A], gy), torch.autograd.grad(want, [x, B, A], gy), strict=True):
        torch.testing.assert_close(u, v, **TOL[dtype])


@pytest.mark.parametrize(
    ("p", "q", "s", "t", "order"),
    [(2, 8, 8, 2, "left"), (8, 2, 2, 8, "right"), (1, 1, 5, 5, "tie"), (3, 3, 3, 3, "tie")],
)
def test_both_contraction_orders_are_exercised_and_exact(p: int, q: int, s: int, t: int, order: str) -> None:
    right, left = kron_flops(p, q, s, t)
    assert order == ("tie" if right == left else "right" if right < left else "left")
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(p, q, generator=g, dtype=torch.float64), torch.randn(s, t, generator=g, dtype=torch.float64)
    x = torch.randn(3, q * t, generator=g, dtype=torch.float64)
    torch.testing.assert_close(kron_linear(x, B, A), x @ torch.kron(B, A).T, rtol=1e-12, atol=1e-12)


def test_flop_counts() -> None:
    # B (p, q) = (4, 96), A (s, t) = (96, 4): 384 -> 384 with the small factor first.
    assert kron_flops(4, 96, 96, 4) == (96 * 96 * 8, 4 * 4 * 192)
    assert min(kron_flops(4, 96, 96, 4)) < 4 * 96 * 96 * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_computed_in_fp32_returned_in_its_dtype(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    B = torch.randn(3, 4, generator=g, requires_grad=True)
    A = torch.randn(5, 2, generator=g, requires_grad=True)
    x = torch.randn(6, 8, generator=g).to(dtype).requires_grad_()
    y = kron_linear(x, B, A)
    assert y.dtype == dtype
    want = x.float() @ torch.kron(B, A).T
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype
    assert B.grad is not None and B.grad.dtype == torch.float32 and A.grad is not None
    # All-half factors too: still computed in fp32.
    y16 = kron_linear(x.detach(), B.detach().to(dtype), A.detach().to(dtype))
    assert y16.dtype == dtype


def test_wrong_width_is_an_error() -> None:
    with pytest.raises(ValueError, match="expects 3 \\* 2 = 6"):
        kron_linear(torch.randn(2, 5), torch.randn(4, 3), torch.randn(1, 2))


# The Kronecker LoRA adapter (SURM) -------------------------------------------------------------------


@pytest.mark.parametrize(("d_in", "d_out", "factor"), [(12, 20, 2), (12, 20, 4), (16, 40, 8), (13, 29, 1), (6, 6, 6)])
def test_kronecker_adapter_is_the_reference_formula(d_in: int, d_out: int, factor: int) -> None:
    torch.manual_seed(0)
    a = Kronecker(nn.Linear(d_in, d_out), factor=factor, alpha=3.0, dropout=0.25).double()
    with torch.no_grad():
        a.B.normal_()
    assert a.A.shape == (factor, d_in // factor) and a.B.shape == (d_out // factor, factor)
    dense = 3.0 / factor * torch.kron(a.B, a.A)  # the reference's (kronecker_alpha / r) * kron(B, A)
    torch.testing.assert_close(a.delta_weight(), dense, rtol=0, atol=0)
    x = torch.randn(4, d_in, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    y = a(x)  # training mode: dropout on the adapter's input, as the reference
    torch.manual_seed(5)
    want = a.base(x) + F.dropout(x, 0.25, training=True) @ dense.T
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    a.eval()
    torch.testing.assert_close(a(x), a.base(x) + x @ dense.T, rtol=1e-12, atol=1e-12)


def test_kronecker_factor_choice_and_errors() -> None:
    assert [auto_factor(*s) for s in [(384, 384), (384, 1536), (1536, 384), (12, 20), (13, 29)]] == [16, 24, 24, 4, 1]
    assert Kronecker(nn.Linear(384, 384)).factor == 16
    with pytest.raises(
        ValueError, match="factor=5 must divide in_features=12 and out_features=20; valid factors: 1, 2, 4"
    ):
        Kronecker(nn.Linear(12, 20), factor=5)
    with pytest.raises(ValueError, match=r"valid factors: 1, 2, 3, 4, 6, 8, 12, 16, 24, \.\.\., 192, 384"):
        Kronecker(nn.Linear(384, 1536), factor=7)
    with pytest.raises(ValueError, match="factor=0 must be an integer >= 1"):
        Kronecker(nn.Linear(12, 20), factor=0)
    with pytest.raises(ValueError, match="alpha="):
        Kronecker(nn.Linear(12, 20), alpha=None)


def test_kronecker_init_count_and_rank() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(384, 384)
    x = torch.randn(3, 384)
    for factor in (1, 16, 24, 384):
        a = Kronecker(layer, factor=factor)
        assert torch.equal(a(x), layer(x)) and not a.B.any()  # B = 0: the base model at init
        bound = 1 / math.sqrt(384 // factor)  # A as nn.Linear's weight: kaiming_uniform(a=sqrt(5))
        assert 0.5 * bound < a.A.abs().max() <= bound
        assert Kronecker.num_params(384, 384, factor=factor) == a.A.numel() + a.B.numel() == 768
    a = Kronecker(layer, factor=16).double()  # fp64: fp32 rounding of the products would look full rank
    with torch.no_grad():
        a.B.normal_()
    assert torch.linalg.matrix_rank(a.delta_weight()).item() == rank_bound(384, 384, 16) == 256


def test_kronecker_half_precision_and_no_peft_export() -> None:
    model = loraplex.adapt(MODELS[1].make().to(torch.float16), "kronecker", factor=2)
    y = model(MODELS[1].input(dtype=torch.float16))
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    y.float().sum().backward()
    assert all(a.B.grad is not None and a.B.dtype == torch.float32 for _, a in loraplex.adapters(model))
    with pytest.raises(ValueError, match="no equivalent"):
        loraplex.export_peft(model, "unused")
