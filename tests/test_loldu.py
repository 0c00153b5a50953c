"""LoLDU against the reference formulation (SKDDJ/LoLDU): W = W_res + σ P L_r diag(z) U_r."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from loraplex.adapters.loldu import LoLDU, ldu_factors


def reference_weight(W: torch.Tensor, rank: int, sigma: float, z: torch.Tensor) -> torch.Tensor:
    """The reference code's effective weight, with its dense P (minloldu/loldu.py)."""
    P, L, U = torch.linalg.lu(W)
    D = U.diagonal()
    U = U / D[:, None]
    L_r, D_r, U_r = L[:, :rank], D[:rank], U[:rank]
    W_res = W - sigma * P @ L_r @ torch.diag(D_r) @ U_r
    return W_res + sigma * P @ L_r @ torch.diag(z) @ U_r


@settings(max_examples=40, deadline=None)
@given(n_in=st.integers(1, 20), n_out=st.integers(1, 20), data=st.data())
def test_factors_rebuild_w_and_match_the_reference(n_in: int, n_out: int, data) -> None:
    rank = data.draw(st.integers(1, min(n_in, n_out)))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    W = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    PL, d, U = ldu_factors(W, min(n_in, n_out))
    torch.testing.assert_close(PL @ torch.diag(d) @ U, W)  # all pivots: the exact W
    layer = LoLDU(nn.Linear(n_in, n_out, bias=False), rank=rank, alpha=1.5).double()
    with torch.no_grad():
        layer.root.weight.copy_(W)
        layer.reset_parameters()
        layer.z.add_(torch.randn(rank, generator=g, dtype=torch.float64))
    want = reference_weight(W, rank, 1.5 / rank, layer.z.detach())
    torch.testing.assert_close(W + layer.delta_weight(), want)
    x = torch.randn(3, n_in, generator=g, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ want.T)


def test_only_z_trains_and_no_dense_permutation() -> None:
    layer = LoLDU(nn.Linear(64, 48), rank=5)
    assert [n for n, _ in layer.own_parameters()] == ["z"]
    assert all(b.numel() <= 64 * 5 for b in layer.buffers() if b is not layer.root.weight)
    assert LoLDU.num_params(64, 48, rank=5) == 5


def test_zero_pivots_give_no_nan() -> None:
    base = nn.Linear(6, 6)
    with torch.no_grad():
        base.weight[:, 2] = 0  # singular: a zero pivot
        base.weight[4] = 0
    layer = LoLDU(base, rank=6)
    x = torch.randn(3, 6)
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(layer.z.grad).all()
    torch.testing.assert_close(y, base(x))


def test_errors_name_the_value_and_constraint() -> None:
    with pytest.raises(ValueError, match=r"rank=9 must be <= min\(in_features=8, out_features=12\)"):
        LoLDU(nn.Linear(8, 12), rank=9)
    with pytest.raises(ValueError, match=r"alpha=0 must be a finite non-zero number"):
        LoLDU(nn.Linear(8, 12), alpha=0)
    with pytest.raises(ValueError, match=r"init='svd' must be one of"):
        LoLDU(nn.Linear(8, 12), init="svd")
