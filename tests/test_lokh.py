"""LoKH: ΔW = s · kron(W1, (B1 A1) ⊙ (B2 A2)) against its entry-wise definition, inits, shapes, options."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matrix import MODELS
from torch import nn

import loraplex
from loraplex.adapters.lokh import LoKH
from loraplex.adapters.lokr import factorization


def dense_lokh(a: LoKH) -> torch.Tensor:
    """``ΔW[i·out_k + k, j·in_n + l] = s · W1[i, j] · Σ_a B1[k, a] A1[a, l] · Σ_b B2[k, b] A2[b, l]``, spelled out."""
    H = torch.einsum("ka,al->kl", a.B1, a.A1) * torch.einsum("kb,bl->kl", a.B2, a.A2)
    (out_l, in_m), (out_k, in_n) = a.W1.shape, H.shape
    blocks = a.W1[:, None, :, None] * H[None, :, None, :]  # (out_l, out_k, in_m, in_n)
    return a.scale * blocks.reshape(out_l * out_k, in_m * in_n)


@settings(max_examples=30, deadline=None)
@given(
    d_in=st.integers(1, 24),
    d_out=st.integers(1, 24),
    rank=st.integers(1, 3),
    factor=st.sampled_from([-1, 1, 2, 3]),
    init=st.sampled_from(["zeros", "lycoris", "random"]),
    seed=st.integers(0, 2**16),
)
def test_forward_and_delta_weight_equal_the_definition(
    d_in: int, d_out: int, rank: int, factor: int, init: str, seed: int
) -> None:
    torch.manual_seed(seed)
    a = LoKH(nn.Linear(d_in, d_out), rank=rank, alpha=1.5, decompose_factor=factor, init=init).double()
    with torch.no_grad():
        for _, p in a.own_parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(2, 3, d_in, dtype=torch.float64, requires_grad=True)
    dense = dense_lokh(a)
    assert dense.shape == (d_out, d_in)
    torch.testing.assert_close(a.delta_weight(), dense, rtol=1e-12, atol=1e-12)
    y, want = a(x), a.base(x) + x @ dense.T
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y)
    own = [x] + [p for _, p in a.own_parameters()]
    for u, v in zip(torch.autograd.grad(y, own, gy), torch.autograd.grad(want, own, gy), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


def test_shapes_and_parameter_count() -> None:
    a = LoKH(nn.Linear(384, 384))
    assert a.W1.shape == (16, 16) and a.B1.shape == a.B2.shape == (24, 4) and a.A1.shape == a.A2.shape == (4, 24)
    assert LoKH.num_params(384, 384) == sum(p.numel() for _, p in a.own_parameters()) == 640  # LoKr's default count
    b = LoKH(nn.Linear(13, 29), rank=2, decompose_factor=2)  # primes split as 1 · p
    assert b.W1.shape == (1, 1) and b.B1.shape == (29, 2) and b.A1.shape == (2, 13)
    assert LoKH.num_params(13, 29, rank=2) == 1 + 2 * 2 * (29 + 13)
    assert factorization(40, 4) == (4, 10) and LoKH(nn.Linear(16, 40), decompose_factor=4).W1.shape == (4, 4)


@pytest.mark.parametrize(("init", "identity"), [("zeros", True), ("lycoris", True), ("random", False)])
def test_inits(init: str, identity: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(1536, 1536)  # W1 (32, 32), H (48, 48)
    a = LoKH(layer, init=init)
    x = torch.randn(3, 1536)
    assert torch.equal(a(x), layer(x)) == identity
    assert (init == "zeros") == (not a.W1.any()) and (init == "lycoris") == (not a.A2.any())
    if init != "zeros":  # W1 as nn.Linear's weight
        assert 0.8 / 32**0.5 < a.W1.abs().max() <= 1 / 32**0.5
    if init != "lycoris":  # H has the variance 1 / (3 in_n) of a kaiming (out_k, in_n) factor
        var = torch.stack([LoKH(layer, init=init).hadamard().var() for _ in range(8)]).mean()
        assert 0.6 < var.item() * 3 * 48 < 1.6


def test_zero_init_trains_w1_at_once() -> None:
    torch.manual_seed(0)
    a = LoKH(nn.Linear(12, 20))
    a(torch.randn(4, 12)).square().sum().backward()
    assert a.W1.grad is not None and a.W1.grad.abs().max() > 0
    assert all(p.grad is not None and not p.grad.any() for p in (a.B1, a.A1, a.B2, a.A2))  # W1 = 0: none yet


def test_stacked_and_half_precision() -> None:
    spec = MODELS[1]
    model = loraplex.adapt(spec.make().to(torch.bfloat16), "lokh", init="random", rank=2)
    loraplex.adapt(model, "lokh", targets=["up"], name="b", init="random")
    y = model(spec.input(dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().square().mean().backward()
    for _, a in loraplex.adapters(model):
        assert all(p.dtype == torch.float32 and p.grad is not None for _, p in a.own_parameters())


def test_no_peft_export() -> None:
    model = loraplex.adapt(MODELS[0].make(), "lokh")
    with pytest.raises(ValueError, match="no equivalent"):
        loraplex.export_peft(model, "unused")


def test_bad_options_are_value_errors() -> None:
    layer = nn.Linear(8, 8)
    for kw, match in [
        ({"rank": 0}, "rank=0 must be an integer >= 1"),
        ({"alpha": float("inf")}, "alpha=inf must be a finite number"),
        ({"decompose_factor": -2}, "decompose_factor=-2 must be -1"),
        ({"init": "kaiming"}, "init='kaiming' must be one of 'zeros', 'lycoris', 'random'"),
    ]:
        with pytest.raises(ValueError, match=match):
            LoKH(layer, **kw)
