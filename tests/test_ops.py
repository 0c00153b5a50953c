"""Fused kernels against plain autograd on the dense formula, over shapes (hypothesis)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.adapters._ops import lowrank_linear

shapes = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 23), st.integers(1, 23), st.integers(1, 6))


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes, bias=st.booleans(), dora=st.booleans(), given_v=st.booleans(), x_grad=st.booleans(),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_lowrank_linear_matches_autograd(shape, bias, dora, given_v, x_grad, seed) -> None:
    batch, seq, n_in, n_out, r = shape
    g = torch.Generator().manual_seed(seed)

    def rand(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, dtype=torch.float64)

    x = rand(batch, seq, n_in).requires_grad_(x_grad)
    W, b = rand(n_out, n_in), rand(n_out) if bias else None
    A, B = rand(r, n_in).requires_grad_(), rand(n_out, r).requires_grad_()
    m = rand(n_out).requires_grad_() if dora else None
    inv = 1 / rand(n_out).abs().add(0.5) if dora else None
    s = 0.7
    leaves = [t for t in (x, A, B, m) if t is not None and t.requires_grad]
    gy = rand(batch, seq, n_out)

    V = torch.addmm(W, B, A, alpha=s).detach() if dora and given_v else None  # DoRA's direction, if the caller has it
    got = lowrank_linear(x, W, b, A, B, s, m, inv, V)
    z = F.linear(x, W) + s * F.linear(F.linear(x, A), B)
    want = (z * (m * inv) if dora else z) + (b if bias else 0)
    torch.testing.assert_close(got, want)
    for u, v in zip(torch.autograd.grad(got, leaves, gy), torch.autograd.grad(want, leaves, gy), strict=True):
        torch.testing.assert_close(u, v)
