"""LoRA-Pro: the closed-form adjustment, the Sylvester solve, and the optimizer's full / low modes."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import loraplex
from loraplex.adapters.gralora import GraLoRA
from loraplex.optim.lorapro import LoRAPro, adjusted_grads, equivalent_grad, solve_sylvester, split_blocks

D = torch.float64


def factors(seed: int, n_in: int, n_out: int, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Random A (r, in), B (out, r), full gradient g (out, in), float64."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n_in, generator=gen, dtype=D)
    B = torch.randn(n_out, r, generator=gen, dtype=D)
    g = torch.randn(n_out, n_in, generator=gen, dtype=D)
    return A, B, g


def projectors(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    P_B = B @ torch.linalg.inv(B.T @ B) @ B.T
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
    return P_B, P_A


def sylvester_kron(P: Tensor, Q: Tensor, C: Tensor) -> Tensor:
    """P X + X Q = C by the Kronecker form (row-major vec): (P ⊗ I + I ⊗ Qᵀ) vec(X) = vec(C)."""
    r, q = C.shape
    K = torch.kron(P, torch.eye(q, dtype=D)) + torch.kron(torch.eye(r, dtype=D), Q.T.contiguous())
    return torch.linalg.solve(K, C.reshape(-1)).reshape(r, q)


shapes = st.tuples(st.integers(1, 4), st.integers(0, 8), st.integers(0, 8), st.integers(0, 2**16))
scales = st.floats(0.25, 4.0)


@settings(max_examples=25, deadline=None)
@given(shapes, scales)
def test_factor_grads_from_autograd(shape: tuple[int, int, int, int], s: float) -> None:
    """g_A = s Bᵀ g and g_B = s g Aᵀ for a linear layer with W = W0 + s B A."""
    r, di, do, seed = shape
    n_in, n_out = r + di, r + do
    A, B, _ = factors(seed, n_in, n_out, r)
    gen = torch.Generator().manual_seed(seed + 1)
    W0, x, y = (torch.randn(*sh, generator=gen, dtype=D) for sh in ((n_out, n_in), (5, n_in), (5, n_out)))
    A.requires_grad_(True), B.requires_grad_(True)
    ((x @ (W0 + s * B @ A).T - y) ** 2).sum().backward()
    W = (W0 + s * B.detach() @ A.detach()).requires_grad_(True)
    ((x @ W.T - y) ** 2).sum().backward()
    g = W.grad
    assert A.grad is not None and B.grad is not None and g is not None
    torch.testing.assert_close(A.grad, s * B.detach().T @ g, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(B.grad, s * g @ A.detach().T, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(shapes, scales)
def test_adjusted_equivalent_gradient(shape: tuple[int, int, int, int], s: float) -> None:
    """The adjusted step moves W by P_B g + g P_A − P_B g P_A, at least as close to g as plain LoRA's."""
    r, di, do, seed = shape
    A, B, g = factors(seed, r + di, r + do, r)
    gA, gB = s * B.T @ g, s * g @ A.T
    nA, nB = adjusted_grads(A, B, gA, gB, s, ridge=0.0)
    assert nA.shape == A.shape and nB.shape == B.shape and nA.dtype == D
    P_B, P_A = projectors(A, B)
    pro = equivalent_grad(A, B, nA, nB, s)
    torch.testing.assert_close(pro, P_B @ g + g @ P_A - P_B @ g @ P_A, rtol=1e-7, atol=1e-7 * g.norm().item())
    torch.testing.assert_close(equivalent_grad(A, B, gA, gB, s), s * (B @ gA + gB @ A))
    assert (pro - g).norm() <= (equivalent_grad(A, B, gA, gB, s) - g).norm() * (1 + 1e-9) + 1e-9
    # X does not change the equivalent gradient
    xA, xB = adjusted_grads(A, B, gA, gB, s, ridge=0.0, sylvester=False)
    torch.testing.assert_close(equivalent_grad(A, B, xA, xB, s), pro, rtol=1e-7, atol=1e-7 * g.norm().item())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**16))
def test_sylvester_residual(r: int, q: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    M, N = torch.randn(r, r + 2, generator=gen, dtype=D), torch.randn(q, q + 2, generator=gen, dtype=D)
    P, Q, C = M @ M.T, N @ N.T, torch.randn(r, q, generator=gen, dtype=D)
    X = solve_sylvester(P, Q, C, ridge=0.0)
    assert X.dtype == D and X.shape == (r, q)
    assert (P @ X + X @ Q - C).norm() <= 1e-9 * (1 + C.norm())
    torch.testing.assert_close(X, sylvester_kron(P, Q, C), rtol=1e-8, atol=1e-8)
    # the default ridge changes nothing visible at these eigenvalues, and fp32 input stays fp32 (solved in float64)
    torch.testing.assert_close(solve_sylvester(P, Q, C), X, rtol=1e-6, atol=1e-6)
    assert solve_sylvester(P.float(), Q.float(), C.float()).dtype == torch.float32


@settings(max_examples=25, deadline=None)
@given(shapes, scales)
def test_step_zero_b_is_zero(shape: tuple[int, int, int, int], s: float) -> None:
    """B = 0: g^A = g_A, g^B = (1/s²) g_B (AAᵀ)⁻¹, finite, and the step moves W by g P_A."""
    r, di, do, seed = shape
    A, _, g = factors(seed, r + di, r + do, r)
    B = torch.zeros(r + do, r, dtype=D)
    gA, gB = s * B.T @ g, s * g @ A.T
    assert all(torch.isfinite(t).all() for t in adjusted_grads(A, B, gA, gB, s))  # default ridge
    nA, nB = adjusted_grads(A, B, gA, gB, s, ridge=0.0)
    assert torch.isfinite(nA).all() and torch.isfinite(nB).all()
    torch.testing.assert_close(nA, gA)
    torch.testing.assert_close(nB, gB @ torch.linalg.inv(A @ A.T) / s**2, rtol=1e-6, atol=1e-9)
    _, P_A = projectors(A, torch.eye(r + do, r, dtype=D))
    torch.testing.assert_close(equivalent_grad(A, B, nA, nB, s), g @ P_A, rtol=1e-6, atol=1e-8)


def tiny(seed: int = 0, **options: object) -> nn.Module:
    """Linear 6 -> 5 with a head, LoRA (float64) on the first layer."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    return loraplex.adapt(model, "lora", targets=["0"], train=["2"], **options).double()


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return ((model(x) - y) ** 2).mean()


def data(seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=gen, dtype=D), torch.randn(16, 3, generator=gen, dtype=D)


@pytest.mark.parametrize("rslora", [False, True])
def test_full_mode_one_step_by_hand(rslora: bool) -> None:
    """One full-mode step equals methods.md steps 1-5 written out (projections, Kronecker Sylvester)."""
    model = tiny(rank=2, alpha=6.0, rslora=rslora)
    layer = loraplex.adapters(model)[0][1]
    s = 6.0 / math.sqrt(2) if rslora else 3.0
    assert layer.scale == pytest.approx(s)
    with torch.no_grad():
        layer.B.normal_()  # general case (B ≠ 0)
    A, B = layer.A.detach().clone(), layer.B.detach().clone()
    lr, wd, (b1, b2), eps = 0.05, 0.1, (0.9, 0.99), 1e-8
    opt = LoRAPro(model, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, mode="full", ridge=0.0)
    assert opt.param_groups[0]["scale"] == pytest.approx(s)
    x, y = data()
    loss_of(model, x, y).backward()
    # the full gradient g = dL/dW, by autograd through the merged weight
    W = (layer.weight.detach() + s * B @ A).requires_grad_(True)
    y_hat = model[2](torch.tanh(x @ W.T + layer.bias.detach()))
    ((y_hat - y) ** 2).mean().backward()
    g = W.grad
    assert g is not None
    P_B, P_A = projectors(A, B)
    g_tilde = P_B @ g + g @ P_A - P_B @ g @ P_A  # step 1
    m, v = (1 - b1) * g_tilde, (1 - b2) * g_tilde**2  # step 2
    g_hat = (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    pA, pB = s * B.T @ g_hat, s * g_hat @ A.T  # step 3
    BtB_inv, AAt_inv = torch.linalg.inv(B.T @ B), torch.linalg.inv(A @ A.T)  # step 4
    X = sylvester_kron(B.T @ B, A @ A.T, -BtB_inv @ pA @ A.T / s**2)
    fA = BtB_inv @ pA / s**2 + X @ A
    fB = (torch.eye(5, dtype=D) - P_B) @ pB @ AAt_inv / s**2 - B @ X
    opt.step()
    torch.testing.assert_close(layer.A.detach(), A * (1 - lr * wd) - lr * fA, rtol=1e-8, atol=1e-10)  # step 5
    torch.testing.assert_close(layer.B.detach(), B * (1 - lr * wd) - lr * fB, rtol=1e-8, atol=1e-10)
    # the scale matters: the same computation with alpha / r would differ under rsLoRA
    if rslora:
        wrong, _ = adjusted_grads(A, B, 3.0 * B.T @ g_hat, 3.0 * g_hat @ A.T, 3.0)
        assert not torch.allclose(A * (1 - lr * wd) - lr * wrong, layer.A.detach())


@pytest.mark.parametrize("mode", ["full", "low"])
def test_modes_reduce_least_squares(mode: str) -> None:
    torch.manual_seed(0)
    model = loraplex.adapt(nn.Sequential(nn.Linear(8, 6)), "lora", targets=["0"], rank=2).double()
    x = torch.randn(32, 8, dtype=D)
    y = model(x).detach() + x @ (0.3 * torch.randn(6, 2, dtype=D) @ torch.randn(2, 8, dtype=D)).T
    opt = LoRAPro(model, lr=0.01 if mode == "full" else 0.02, mode=mode)
    first = loss_of(model, x, y).item()
    for _ in range(30):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    last = loss_of(model, x, y).item()
    assert math.isfinite(last) and last < 0.5 * first, (first, last)
    layer = loraplex.adapters(model)[0][1]
    state = opt.state[layer.A]
    shapes = [tuple(t.shape) for t in state["exp_avg"]]
    assert shapes == ([(6, 8)] if mode == "full" else [(2, 8), (6, 2)])  # 2 out·in vs 2 r (in + out) floats


@pytest.mark.parametrize("mode", ["full", "low"])
def test_head_follows_adamw(mode: str) -> None:
    model = tiny(rank=2)
    head = copy.deepcopy(model[2])
    ref = torch.optim.AdamW(head.parameters(), lr=0.03, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2, foreach=False)
    opt = LoRAPro(model, lr=0.03, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2, mode=mode)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    x, y = data()
    for _ in range(3):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        for mine, theirs in zip(model[2].parameters(), head.parameters(), strict=True):
            theirs.grad = mine.grad.clone()  # type: ignore[union-attr]
        opt.step()
        ref.step()
    for mine, theirs in zip(model[2].parameters(), head.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_dora_is_refused_or_left_to_adamw() -> None:
    """DoRA's ΔW is not s B A (no factor pairs): refused by default; others="adamw" steps all of it by AdamW."""
    torch.manual_seed(0)
    model = loraplex.adapt(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3)), "dora", targets=["0"], rank=2)
    with pytest.raises(ValueError, match=r"layer '0' \(dora\) has no factor pairs"):
        LoRAPro(model, mode="low")
    model = loraplex.adapt(model, "lora", targets=["1"], rank=2)
    opt = LoRAPro(model, mode="low", others="adamw")
    dora, lora = (a for _, a in loraplex.adapters(model))
    assert [g["pair"] for g in opt.param_groups] == [True, False]
    assert opt.param_groups[0]["params"] == [lora.A, lora.B]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(dora.A), id(dora.B), id(dora.m)}
    model(torch.randn(4, 6)).sum().backward()
    before = dora.B.detach().clone()
    opt.step()
    assert not torch.equal(before, dora.B)
    with pytest.raises(ValueError, match="others='sgd' must be one of 'refuse', 'adamw'"):
        LoRAPro(model, others="sgd")


def test_stacked_groups() -> None:
    """Stacked LoRAs on one layer: one pair group each."""
    torch.manual_seed(0)
    model = loraplex.adapt(nn.Sequential(nn.Linear(6, 5)), "lora", rank=2, name="a")
    model = loraplex.adapt(model, "lora", rank=3, name="b")
    opt = LoRAPro(model, mode="low")
    pairs = [(a.A, a.B) for _, a in loraplex.adapters(model)]
    assert [tuple(g["params"]) for g in opt.param_groups] == pairs and len(pairs) == 2
    model(torch.randn(4, 6)).sum().backward()
    opt.step()


def test_no_factorized_adapter() -> None:
    with pytest.raises(ValueError, match="factorized adapter"):
        LoRAPro(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="mode='adam'"):
        LoRAPro(tiny(rank=2), mode="adam")


@pytest.mark.parametrize(
    ("option", "value", "constraint"),
    [
        ("eps", -1.0, "must be a finite number > 0"),
        ("eps", 0.0, "must be a finite number > 0"),
        ("eps", math.nan, "must be a finite number > 0"),
        ("eps", math.inf, "must be a finite number > 0"),
        ("weight_decay", math.nan, "must be a finite number >= 0"),
        ("weight_decay", math.inf, "must be a finite number >= 0"),
        ("weight_decay", -0.1, "must be a finite number >= 0"),
        ("lr", math.inf, "must be a finite number >= 0"),
        ("ridge", math.inf, "must be a finite number >= 0"),
        ("betas", (0.9,), "must be a pair of numbers in \\[0, 1\\)"),
    ],
)
def test_bad_hyper_parameters_are_refused(option: str, value: object, constraint: str) -> None:
    """Before: all accepted silently (eps=-1 / NaN and weight_decay=NaN then give NaN parameters at the first
    step), except betas=(0.9,): IndexError "tuple index out of range"."""
    with pytest.raises(ValueError, match=rf"^{option}={re.escape(repr(value))} {constraint}"):
        LoRAPro(tiny(rank=2), **{option: value})


def test_gralora_blocks_are_lora_pairs() -> None:
    """GraLoRA's grid splits into LoRA pairs (one scale) whose gradients are the views of the parameters' grads."""
    torch.manual_seed(0)
    layer = GraLoRA(nn.Linear(8, 12), rank=4, alpha=6.0, k=2).double()
    with torch.no_grad():
        layer.blocks_B.normal_()
    s, x = layer.scale, torch.randn(5, 8, dtype=D)
    layer(x).square().sum().backward()
    W = (layer.weight.detach() + layer.delta_weight().detach()).requires_grad_(True)
    (x @ W.T + layer.bias.detach()).square().sum().backward()
    g = W.grad
    assert g is not None and layer.blocks_A.grad is not None and layer.blocks_B.grad is not None
    blocks = split_blocks(layer.blocks_A.detach(), layer.blocks_B.detach(), 2)
    grads = split_blocks(layer.blocks_A.grad, layer.blocks_B.grad, 2)
    assert len(blocks) == 4 and blocks[0][0].shape == (2, 4) and blocks[0][1].shape == (6, 2)
    dW = torch.zeros(12, 8, dtype=D)
    for (a, b, rows, cols), (ga, gb, _, _) in zip(blocks, grads, strict=True):
        dW[rows, cols] = s * b @ a
        torch.testing.assert_close(ga, s * b.T @ g[rows, cols])
        torch.testing.assert_close(gb, s * g[rows, cols] @ a.T)
    torch.testing.assert_close(dW, layer.delta_weight().detach())


@pytest.mark.parametrize("mode", ["full", "low"])
def test_gralora_reduces_least_squares(mode: str) -> None:
    torch.manual_seed(0)
    model = loraplex.adapt(nn.Sequential(nn.Linear(8, 6)), "gralora", targets=["0"], rank=4, k=2, hybrid_rank=2)
    model = model.double()
    layer = loraplex.adapters(model)[0][1]
    x = torch.randn(32, 8, dtype=D)
    y = model(x).detach() + x @ (0.3 * torch.randn(6, 2, dtype=D) @ torch.randn(2, 8, dtype=D)).T
    opt = LoRAPro(model, lr=0.01 if mode == "full" else 0.02, mode=mode)
    assert [g["k"] for g in opt.param_groups] == [2, 0]  # the grid, then the hybrid LoRA; no other parameter
    first = loss_of(model, x, y).item()
    for _ in range(30):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    last = loss_of(model, x, y).item()
    assert math.isfinite(last) and last < 0.5 * first, (first, last)
    shapes = [tuple(t.shape) for t in opt.state[layer.blocks_A]["exp_avg"]]
    assert shapes == ([(6, 8)] if mode == "full" else [(2, 4, 4), (2, 4, 3)])


@pytest.mark.parametrize("mode", ["full", "low"])
def test_state_dict_round_trip(mode: str) -> None:
    """A resumed optimizer (state_dict / load_state_dict) takes the same next step."""
    model = tiny(rank=2)
    opt = LoRAPro(model, lr=0.01, weight_decay=0.1, mode=mode)
    x, y = data()
    for _ in range(2):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    twin = copy.deepcopy(model)
    resumed = LoRAPro(twin, lr=0.01, weight_decay=0.1, mode=mode)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (twin, resumed)):
        o.zero_grad()
        loss_of(m, x, y).backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
