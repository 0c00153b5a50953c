"""BoRA: the two-sided decomposition against a step-by-step dense re-derivation, its invariants, and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplex.adapters.bora import BoRA


def reference(W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, m_col, m_row) -> torch.Tensor:
    """W' by the docstring's two steps, norm by norm, in loops (no shared code with the module)."""
    V = W0 + s * B @ A
    U = torch.stack([V[:, j] / V[:, j].norm() * m_col[j] for j in range(V.shape[1])], dim=1)
    return torch.stack([U[i] / U[i].norm() * m_row[i] for i in range(U.shape[0])])


@pytest.mark.parametrize(("d_in", "d_out"), [(6, 6), (5, 9), (9, 5)])
def test_forward_and_delta_match_the_reference(d_in: int, d_out: int) -> None:
    torch.manual_seed(0)
    a = BoRA(nn.Linear(d_in, d_out), rank=2, alpha=3.0).double()
    with torch.no_grad():
        for p in (a.A, a.B, a.m_col, a.m_row):
            p.add_(0.3 * torch.randn_like(p))
    W = reference(a.weight, a.A.detach(), a.B.detach(), a.scale, a.m_col.detach(), a.m_row.detach())
    torch.testing.assert_close(a.weight + a.delta_weight().detach(), W, rtol=1e-12, atol=1e-12)
    x = torch.randn(4, d_in, dtype=torch.float64)
    torch.testing.assert_close(a(x), x @ W.T + a.bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(W.norm(dim=1), a.m_row.detach(), rtol=1e-12, atol=1e-12)  # m_row: W' row norms


def test_magnitudes_start_at_the_base_norms() -> None:
    lin = nn.Linear(7, 4)
    a = BoRA(lin, rank=2)
    torch.testing.assert_close(a.m_col.detach(), lin.weight.norm(dim=0), rtol=0, atol=0)
    torch.testing.assert_close(a.m_row.detach(), lin.weight.norm(dim=1), rtol=0, atol=0)
    assert a.delta_weight().abs().max() < 1e-6


def test_norms_are_constants_in_the_backward_pass() -> None:
    """With the norms detached, the gradient of m_row is the product with V's normalised rows only."""
    torch.manual_seed(1)
    a = BoRA(nn.Linear(5, 3, bias=False), rank=2).double()
    with torch.no_grad():
        a.B.normal_()
    x = torch.randn(4, 5, dtype=torch.float64)
    g = torch.randn(4, 3, dtype=torch.float64)
    (a(x) * g).sum().backward()
    with torch.no_grad():
        V = a.weight + a.scale * a.B @ a.A
        U = V / V.norm(dim=0) * a.m_col
        want = ((x @ (U / U.norm(dim=1, keepdim=True)).T) * g).sum(0)
    torch.testing.assert_close(a.m_row.grad, want, rtol=1e-12, atol=1e-12)


def test_has_no_peft_codec_and_rejects_rewriting_inits() -> None:
    with pytest.raises(NotImplementedError, match="bora has no HuggingFace PEFT"):
        BoRA(nn.Linear(4, 4)).to_peft()
    with pytest.raises(ValueError, match="init='pissa'"):
        BoRA(nn.Linear(4, 4), init="pissa")


def _detached_v_loss(a: BoRA, x: torch.Tensor, g: torch.Tensor, m_col: torch.Tensor) -> torch.Tensor:
    """The loss as a function of m_col alone, V = W0 + s B A held fixed (the docstring's objective)."""
    with torch.no_grad():
        V = a.weight + a.scale * a.B @ a.A
        U = V * (m_col / V.norm(dim=0))
        W = U * (a.m_row / U.norm(dim=1))[:, None]
        return ((x @ W.T) * g).sum()


@pytest.mark.parametrize("path", ["fused", "unfused", "delta_weight"])
def test_m_col_gradient_matches_central_differences(path: str) -> None:
    """Issue 18: the row norm depends on m_col through c; detaching it gave a gradient 49-75 % off.

    W' is invariant to scaling m_col, so the true gradient is orthogonal to m_col (it was -8.57).
    """
    torch.manual_seed(3)
    a = BoRA(nn.Linear(20, 12, bias=False), rank=3).double()
    with torch.no_grad():
        for p in (a.A, a.B, a.m_col, a.m_row):
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(7, 20, dtype=torch.float64)
    g = torch.randn(7, 12, dtype=torch.float64)
    if path == "fused":
        out = a(x)
    elif path == "unfused":
        a.base.weight.requires_grad_(True)  # a trainable base takes the plain-autograd path
        out = a(x)
    else:
        out = x @ (a.weight + a.delta_weight()).T
    (out * g).sum().backward()
    got = a.m_col.grad
    assert got is not None
    m = a.m_col.detach().clone()
    h = 1e-6
    want = torch.empty_like(m)
    for j in range(m.numel()):
        e = torch.zeros_like(m)
        e[j] = h
        want[j] = (_detached_v_loss(a, x, g, m + e) - _detached_v_loss(a, x, g, m - e)) / (2 * h)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    assert abs(float(got @ m)) < 1e-8 * float(got.norm() * m.norm())  # scale invariance: <g, m_col> = 0


def test_zero_row_of_v_has_a_finite_m_col_gradient() -> None:
    a = BoRA(nn.Linear(4, 3, bias=False), rank=2).double()
    with torch.no_grad():
        a.base.weight[1] = 0.0  # B = 0: that row of V is zero, its gain 0
    x = torch.randn(5, 4, dtype=torch.float64)
    a(x).sum().backward()
    assert a.m_col.grad is not None and torch.isfinite(a.m_col.grad).all()
