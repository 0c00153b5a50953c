"""The survey's decompositions (loraplex.decompose): ALS with missing entries, Hadamard ALS, nearest Kronecker
products, Khatri–Rao products; their use as LoHa / LoKr / LoKH initialisations and as compressed layers.

Ground truths are planted structures (exact recovery), Eckart–Young on an independent SVD, torch.kron and
explicit loops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matrix import CASES
from torch import nn

import loraplex
from loraplex.adapters import METHODS as ADAPTER_METHODS
from loraplex.adapters.loha import khatri_rao_factors as loha_khatri_rao
from loraplex.decompose import (
    HadamardLinear,
    KroneckerLinear,
    als,
    candidates,
    face_splitting,
    face_splitting_factors,
    fit_adapter,
    hadamard_als,
    init_from_gradient,
    init_from_weight,
    khatri_rao,
    khatri_rao_factors,
    kron_sum,
    kronecker_als,
    kronecker_ranked,
    nearest_kronecker,
    rearrange,
    unrearrange,
)
from loraplex.decompose.init import FITTERS
from loraplex.decompose.init import METHODS as FITTABLE


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def non_increasing(losses: tuple[float, ...], rtol: float = 1e-9) -> bool:
    return all(b <= a + rtol * abs(a) + 1e-12 for a, b in zip(losses, losses[1:], strict=False))


# ---------------------------------------------------------------- ALS


@pytest.mark.parametrize("init", ["svd", "random"])
def test_als_recovers_low_rank_with_30_percent_missing(init: str) -> None:
    W = randn(40, 3, seed=1) @ randn(3, 30, seed=2)
    mask = torch.rand(40, 30, generator=torch.Generator().manual_seed(3)) > 0.3
    fit = als(W.float(), 3, mask, init=init, max_iter=200)
    U, V = fit.factors
    assert fit.converged and fit.relative_error < 1e-5
    assert torch.allclose(U @ V, W.float(), atol=1e-3)  # the missing entries too
    assert non_increasing(fit.losses) and len(fit.losses) == fit.iterations + 1


def test_als_without_mask_reaches_eckart_young() -> None:
    W = randn(25, 5, seed=3) @ randn(5, 20, seed=4) + 0.1 * randn(25, 20, seed=5)  # a spectral gap after 5
    s = torch.linalg.svdvals(W)
    fit = als(W, 5, init="random", max_iter=500, tol=1e-12)
    assert fit.relative_error == pytest.approx(float(s[5:].norm() / s.norm()), rel=1e-4)


def test_als_noise_and_ridge_loss_never_increases() -> None:
    W = randn(30, 4, seed=5) @ randn(4, 25, seed=6) + 0.3 * randn(30, 25, seed=7)
    mask = torch.rand(30, 25, generator=torch.Generator().manual_seed(8)) > 0.3
    for reg in (0.0, 0.5):
        fit = als(W, 4, mask, reg=reg, init="random", max_iter=40, tol=0.0)  # runs until the loss stalls
        assert fit.iterations > 5 and non_increasing(fit.losses) and fit.losses[-1] < fit.losses[0]


def test_als_ridge_solution_is_the_normal_equation_fixed_point() -> None:
    W, lam = randn(12, 9, seed=9), 0.7
    U, V = als(W, 2, reg=lam, max_iter=2000, tol=0.0).factors
    # gradient of ‖W - UV‖² + λ(‖U‖² + ‖V‖²) vanishes at the fixed point
    assert torch.allclose((U @ V - W) @ V.T + lam * U, torch.zeros_like(U), atol=1e-6)
    assert torch.allclose(U.T @ (U @ V - W) + lam * V, torch.zeros_like(V), atol=1e-6)


def test_als_is_deterministic_given_a_seed_or_generator() -> None:
    W = randn(10, 8, seed=10)
    a = als(W, 2, init="random", seed=3, max_iter=3)
    b = als(W, 2, init="random", seed=torch.Generator().manual_seed(3), max_iter=3)
    c = als(W, 2, init="random", seed=4, max_iter=3)
    assert torch.equal(a.factors[0], b.factors[0]) and not torch.equal(a.factors[0], c.factors[0])


def test_als_bad_input() -> None:
    W = randn(6, 5)
    for kwargs, msg in [
        ({"rank": 0}, "rank=0"),
        ({"rank": 6}, r"\[1, 5\]"),
        ({"rank": 2, "reg": -1.0}, "reg=-1.0"),
        ({"rank": 2, "max_iter": -1}, "max_iter"),
        ({"rank": 2, "tol": 1.0}, "tol"),
        ({"rank": 2, "init": "pca"}, "init='pca'"),
        ({"rank": 2, "mask": torch.ones(5, 6)}, "mask of shape"),
        ({"rank": 2, "mask": -torch.ones(6, 5)}, "non-negative"),
    ]:
        with pytest.raises(ValueError, match=msg):
            als(W, **kwargs)
    with pytest.raises(ValueError, match="2-D"):
        als(torch.ones(3), 1)
    with pytest.raises(ValueError, match="non-finite"):
        als(torch.full((3, 3), float("nan")), 1)


def test_all_zero_mask_is_refused() -> None:
    """Before: accepted, returning a meaningless fit of nothing (losses 0, total 0)."""
    W = randn(6, 4)
    for mask in (torch.zeros(6, 4), torch.zeros(6, 4, dtype=torch.bool)):
        for fit in (
            lambda m: als(W, 2, m),
            lambda m: als(W, 2, m, init="random"),
            lambda m: hadamard_als(W, 1, 1, mask=m),
            lambda m: kronecker_als(W, (3, 2), mask=m),
        ):
            with pytest.raises(ValueError, match=r"mask of shape \(6, 4\) is all zero: no entry of W is observed"):
                fit(mask)


# ---------------------------------------------------------------- Hadamard


def planted_hadamard(m: int, n: int, r1: int, r2: int, seed: int) -> torch.Tensor:
    return (randn(m, r1, seed=seed) @ randn(r1, n, seed=seed + 1)) * (
        randn(m, r2, seed=seed + 2) @ randn(r2, n, seed=seed + 3)
    )


def test_hadamard_recovers_planted_rank_1_by_3_exactly() -> None:
    W = planted_hadamard(30, 24, 1, 3, seed=0)
    fit = hadamard_als(W, 1, 3)
    W1, Z1, W2, Z2 = fit.factors
    assert fit.converged and fit.relative_error < 1e-5
    assert torch.allclose((W1 @ Z1) * (W2 @ Z2), W, atol=1e-5)


def test_hadamard_recovers_planted_rank_2_by_2_with_restarts() -> None:
    # not convex: measured, about 1 start in 4 recovers a planted 30x24 rank-(2, 2) product (9 of 40), the
    # others stall near 0.1-0.2 relative error; 8 starts recover these draws
    for seed in (20, 30):
        W = planted_hadamard(30, 24, 2, 2, seed=seed)
        fit = hadamard_als(W, 2, max_iter=300, restarts=8)
        assert fit.relative_error < 1e-5, (seed, fit.relative_error)
        W1, Z1, W2, Z2 = fit.factors
        assert torch.allclose((W1 @ Z1) * (W2 @ Z2), W, atol=1e-4)


def test_hadamard_with_missing_entries_recovers_planted() -> None:
    W = planted_hadamard(30, 24, 1, 2, seed=40)
    mask = torch.rand(30, 24, generator=torch.Generator().manual_seed(41)) > 0.2
    fit = hadamard_als(W, 1, 2, mask, max_iter=300, restarts=2)
    W1, Z1, W2, Z2 = fit.factors
    assert fit.relative_error < 1e-5
    assert torch.allclose((W1 @ Z1) * (W2 @ Z2), W, atol=1e-3)  # the missing entries too


def test_hadamard_noise_loss_never_increases() -> None:
    W = planted_hadamard(20, 16, 2, 2, seed=50) + 0.2 * randn(20, 16, seed=55)
    mask = torch.rand(20, 16, generator=torch.Generator().manual_seed(56)) > 0.3
    for reg, m, init in ((0.0, None, "svd"), (0.1, mask, "random")):
        fit = hadamard_als(W, 2, 3, m, reg=reg, init=init, max_iter=30, tol=0.0)
        assert fit.iterations > 5 and non_increasing(fit.losses, rtol=1e-8), fit.losses
        assert fit.losses[-1] < fit.losses[0]


def test_hadamard_bad_input() -> None:
    with pytest.raises(ValueError, match="rank=0"):
        hadamard_als(randn(5, 4), 1, 0)
    with pytest.raises(ValueError, match="restarts=0"):
        hadamard_als(randn(5, 4), 1, restarts=0)


# ---------------------------------------------------------------- Kronecker

shapes = st.tuples(*[st.integers(1, 4)] * 4)


@settings(max_examples=25, deadline=None)
@given(shapes, st.integers(0, 2**16))
def test_rearrangement_identity_and_inverse(dims: tuple[int, int, int, int], seed: int) -> None:
    m1, n1, m2, n2 = dims
    W, A, B = randn(m1 * m2, n1 * n2, seed=seed), randn(m1, n1, seed=seed + 1), randn(m2, n2, seed=seed + 2)
    R = rearrange(W, (m1, n1))
    assert torch.equal(unrearrange(R, (m1, n1), (m2, n2)), W)
    assert torch.allclose(rearrange(torch.kron(A, B), (m1, n1)), A.reshape(-1, 1) * B.reshape(1, -1))
    lhs = (W - torch.kron(A, B)).norm()
    assert torch.allclose(lhs, (R - A.reshape(-1, 1) * B.reshape(1, -1)).norm())


@settings(max_examples=25, deadline=None)
@given(shapes, st.integers(1, 3), st.integers(0, 2**16))
def test_nearest_kronecker_recovers_sums_of_terms(dims: tuple[int, int, int, int], T: int, seed: int) -> None:
    m1, n1, m2, n2 = dims
    T = min(T, m1 * n1, m2 * n2)
    A, B = randn(T, m1, n1, seed=seed), randn(T, m2, n2, seed=seed + 1)
    W = sum(torch.kron(A[t], B[t]) for t in range(T))
    assert isinstance(W, torch.Tensor) and torch.allclose(kron_sum(A, B), W)
    A2, B2, s = nearest_kronecker(W, (m1, n1), T)
    assert torch.allclose(kron_sum(A2, B2), W, atol=1e-10)
    assert float(s[T:].norm()) < 1e-10 * float(s[0])


def test_nearest_kronecker_error_is_the_singular_value_tail_and_optimal() -> None:
    W = randn(12, 15, seed=60)
    for T in (1, 2, 5):
        A, B, s = nearest_kronecker(W, (3, 5), T)
        err = (W - kron_sum(A, B)).norm()
        assert torch.allclose(err, s[T:].norm())
        A_p = A + 1e-3 * randn(*A.shape, seed=61)  # any other factors do worse
        assert (W - kron_sum(A_p, B)).norm() > err


def test_masked_kronecker_recovers_missing_entries() -> None:
    W = torch.kron(randn(4, 3, seed=70), randn(5, 6, seed=71))
    mask = torch.rand(*W.shape, generator=torch.Generator().manual_seed(72)) > 0.3
    fit = kronecker_als(W, (4, 3), 1, mask)
    A, B = fit.factors
    assert fit.relative_error < 1e-6 and torch.allclose(kron_sum(A, B), W, atol=1e-5)


def test_kronecker_ranked_exact_and_monotone() -> None:
    A = randn(6, 2, seed=80) @ randn(2, 8, seed=81)  # rank 2
    B = randn(5, 1, seed=82) @ randn(1, 4, seed=83)  # rank 1
    fit = kronecker_ranked(torch.kron(A, B), (6, 8), 2, 1)
    assert torch.allclose(torch.kron(*fit.factors), torch.kron(A, B), atol=1e-9)
    noisy = kronecker_ranked(randn(30, 32, seed=84), (6, 8), 2, 1, tol=0.0, max_iter=20)
    assert non_increasing(noisy.losses) and noisy.losses[-1] < noisy.losses[0]
    assert torch.linalg.matrix_rank(noisy.factors[0]) <= 2 and torch.linalg.matrix_rank(noisy.factors[1]) <= 1


def test_kronecker_bad_input() -> None:
    with pytest.raises(ValueError, match=r"a_shape=\(4, 3\)"):
        nearest_kronecker(randn(6, 6), (4, 3))
    with pytest.raises(ValueError, match="terms=5"):
        nearest_kronecker(randn(4, 4), (2, 2), 5)
    with pytest.raises(ValueError, match="rank_a=0"):
        kronecker_ranked(randn(4, 4), (2, 2), 0)


# ---------------------------------------------------------------- Khatri–Rao


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**16))
def test_khatri_rao_against_loop_and_inverse(i: int, j: int, k: int, seed: int) -> None:
    A, B = randn(i, k, seed=seed), randn(j, k, seed=seed + 1)
    C = khatri_rao(A, B)
    loop = torch.zeros(i * j, k, dtype=A.dtype)
    for a in range(i):
        for b in range(j):
            for c in range(k):
                loop[a * j + b, c] = A[a, c] * B[b, c]
    assert torch.equal(C, loop)
    A2, B2 = khatri_rao_factors(C, i)
    assert torch.allclose(khatri_rao(A2, B2), C, atol=1e-10)
    F = face_splitting(A.T, B.T)
    assert torch.equal(F, C.T)
    A3, B3 = face_splitting_factors(F, i)
    assert torch.allclose(face_splitting(A3, B3), F, atol=1e-10)


def test_khatri_rao_factors_is_best_rank_1_per_column_and_matches_loha() -> None:
    C = randn(12, 3, seed=90)
    A, B = khatri_rao_factors(C, 3)
    for k in range(3):
        s = torch.linalg.svdvals(C[:, k].reshape(3, 4))
        assert torch.allclose((C[:, k] - torch.kron(A[:, k], B[:, k])).norm(), s[1:].norm())
    w1a, w1b, w2a, w2b = randn(5, 2, seed=91), randn(2, 7, seed=92), randn(5, 3, seed=93), randn(3, 7, seed=94)
    P, Q = loha_khatri_rao(w1a, w1b, w2a, w2b)
    assert torch.equal(P, face_splitting(w1a, w2a)) and torch.equal(Q, khatri_rao(w1b, w2b))


def test_khatri_rao_bad_input() -> None:
    with pytest.raises(ValueError, match="same number of columns"):
        khatri_rao(randn(2, 3), randn(2, 4))
    with pytest.raises(ValueError, match="rows_a=5"):
        khatri_rao_factors(randn(6, 2), 5)


# ---------------------------------------------------------------- adapter initialisation


@torch.no_grad()
def randomize(adapter: nn.Module, seed: int) -> torch.Tensor:
    """Random factors in the adapter's own structure; returns its ΔW (the target)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in adapter.own_parameters():  # type: ignore[operator]
        p.copy_(torch.randn(p.shape, generator=g))
    return adapter.delta_weight().clone()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("method", "options", "size"),
    [
        ("lokr", {"rank": 2, "alpha": 3.0}, (24, 20)),  # full w1, factored w2
        ("lokr", {"rank": 2, "decompose_both": True}, (64, 64)),  # both factored
        ("lokr", {"rank": 16}, (24, 20)),  # both full
        ("loha", {"rank": 1, "alpha": 2.0}, (24, 30)),
        ("loha", {"rank": 2}, (24, 30)),
        ("lokh", {"rank": 1, "alpha": 2.0}, (24, 20)),
    ],
    ids=str,
)
def test_fit_adapter_recovers_its_own_structure(method: str, options: dict, size: tuple[int, int]) -> None:
    model = loraplex.adapt(nn.Sequential(nn.Linear(*size)), method, **options)
    ((_, adapter),) = loraplex.adapters(model)
    target = randomize(adapter, seed=7)
    with torch.no_grad():  # scramble, so the fit must find the factors
        for _, p in adapter.own_parameters():
            p.normal_()
    err = fit_adapter(adapter, target, restarts=8)
    assert err < 1e-4, err
    assert torch.allclose(adapter.delta_weight(), target, atol=1e-3 * float(target.abs().max()))


def test_fit_lokh_rank_2_is_close_but_not_exact() -> None:
    # LoKH's Hadamard factor is small (6x6 here, rank-(2, 2)): Hadamard ALS crawls there (measured: 0.01-0.09
    # relative error after 2000 iterations from each of 6 starts), so only closeness is asserted
    model = loraplex.adapt(nn.Sequential(nn.Linear(36, 30)), "lokh", rank=2)
    ((_, adapter),) = loraplex.adapters(model)
    target = randomize(adapter, seed=7)
    assert fit_adapter(adapter, target) < 0.05


def test_fit_adapter_bad_input() -> None:
    model = loraplex.adapt(nn.Sequential(nn.Linear(8, 6)), "lora", rank=2)
    ((_, lora),) = loraplex.adapters(model)
    with pytest.raises(ValueError, match="not 'lora'"):
        fit_adapter(lora, torch.zeros(6, 8))
    model = loraplex.adapt(nn.Sequential(nn.Linear(8, 6)), "loha", rank=2)
    ((_, loha),) = loraplex.adapters(model)
    with pytest.raises(ValueError, match=r"\(6, 8\)"):
        fit_adapter(loha, torch.zeros(8, 6))


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 12), nn.Tanh(), nn.Linear(12, 16))


def adapt_three(model: nn.Module) -> nn.Module:
    loraplex.adapt(model, "loha", targets=["0"], rank=2)
    loraplex.adapt(model, "lokr", targets=["2"], rank=2)
    loraplex.adapt(model, "lokh", targets=["4"], rank=2)
    return model


def test_init_from_weight_residual_keeps_outputs() -> None:
    model = small_model()
    x = torch.randn(5, 16)
    before = model(x)
    base_w = model[0].weight.detach().clone()
    adapt_three(model)
    errors = init_from_weight(model)
    assert set(errors) == {"0/default", "2/default", "4/default"} and all(0 <= e < 1 for e in errors.values())
    assert torch.allclose(model(x), before, atol=1e-5)
    (_, loha), *_ = loraplex.adapters(model)
    assert torch.allclose(loha.weight + loha.delta_weight(), base_w, atol=1e-6)
    # the fitted ΔW carries the structured part of W0
    assert float(loha.delta_weight().detach().norm()) > 0.3 * float(base_w.norm())
    with loraplex.disabled(model):
        assert not torch.allclose(model(x), before, atol=1e-3)


def test_init_from_weight_without_residual_adds_the_fit() -> None:
    model = adapt_three(small_model())
    w0 = model[2].weight.detach().clone() if hasattr(model[2], "weight") else model[2].weight
    errors = init_from_weight(model, residual=False)
    (_, lokr) = loraplex.adapters(model)[1]
    assert torch.equal(lokr.weight, w0)
    rel = float((lokr.delta_weight().detach() - w0).norm() / w0.norm())
    assert rel == pytest.approx(errors["2/default"], rel=1e-4)


def test_init_from_gradient_is_a_descent_direction_and_restores_flags() -> None:
    model = adapt_three(small_model())
    batches = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def loss_fn(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return (m(b) - 1.0).pow(2).mean()

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with loraplex.disabled(model):  # G at the base model, computed independently
        roots = [a.root for _, a in loraplex.adapters(model)]
        for r in roots:
            r.weight.requires_grad_(True)
        sum(loss_fn(model, b) for b in batches).backward()  # type: ignore[union-attr]
        G = [r.weight.grad.clone() / 2 for r in roots]
        for r in roots:
            r.weight.grad = None
            r.weight.requires_grad_(False)
    w0 = [r.weight.detach().clone() for r in roots]
    errors = init_from_gradient(model, loss_fn, batches)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for (_, a), g, w in zip(loraplex.adapters(model), G, w0, strict=True):
        d = a.delta_weight().detach()
        assert float((d * g).sum()) < 0
        assert torch.equal(a.weight, w)  # W0 untouched
        assert float(d.norm()) <= 1.01e-2 * float(w.norm())  # the default step: 1 % of ‖W0‖, fitted
    assert all(e < 1 for e in errors.values())
    with pytest.raises(ValueError, match="scale=0"):
        init_from_gradient(model, loss_fn, batches, scale=0)


# ---------------------------------------------------------------- compressed layers


def test_kronecker_linear_reproduces_exact_structure_both_forward_paths() -> None:
    A, B = randn(2, 4, 4, seed=100).float(), randn(2, 8, 8, seed=101).float()
    W = kron_sum(A, B)  # (32, 32), two terms
    linear = nn.Linear(32, 32)
    with torch.no_grad():
        linear.weight.copy_(W)
    for terms in (2, 3):  # 2 terms: 2·384 < 1024 multiply-adds, factored forward; 3: dense forward
        layer = KroneckerLinear.from_linear(linear, a_rows=4, a_cols=4, terms=terms)
        assert torch.allclose(layer.dense_weight(), W, atol=1e-4)
        n = sum(p.numel() for name, p in layer.named_parameters() if name != "bias")
        assert n == KroneckerLinear.num_params(32, 32, **layer.options())
        x = torch.randn(2, 5, 32)
        assert torch.allclose(layer(x), x @ layer.dense_weight().T + linear.bias, atol=1e-4)
        assert torch.allclose(layer(x), linear(x), atol=1e-3)
    empty = KroneckerLinear(32, 32, True, **layer.options())
    empty.load_state_dict(layer.state_dict())
    assert torch.equal(empty.dense_weight(), layer.dense_weight())


def test_hadamard_linear_reproduces_exact_structure() -> None:
    W = planted_hadamard(30, 24, 1, 3, seed=110).float()
    linear = nn.Linear(24, 30)
    with torch.no_grad():
        linear.weight.copy_(W)
    layer = HadamardLinear.from_linear(linear, rank1=1, rank2=3)
    assert torch.allclose(layer.dense_weight(), W, atol=1e-4 * float(W.abs().max()))
    n = sum(p.numel() for name, p in layer.named_parameters() if name != "bias")
    assert n == HadamardLinear.num_params(24, 30, **layer.options())
    for rows in (2, 600):  # factored and dense paths of hadamard_linear
        x = torch.randn(rows, 24)
        assert torch.allclose(layer(x), x @ layer.dense_weight().T + linear.bias, atol=1e-3)
    no_bias = HadamardLinear(24, 30, False, **layer.options())
    assert no_bias.bias is None and no_bias(torch.randn(2, 24)).shape == (2, 30)


def test_candidates_sorted_under_full_and_valid() -> None:
    for method, layer in (("kronecker", KroneckerLinear), ("hadamard", HadamardLinear)):
        opts = candidates(method, 24, 36)
        counts = [layer.num_params(24, 36, **o) for o in opts]  # type: ignore[attr-defined]
        assert counts == sorted(counts) and counts[-1] < 24 * 36 and len(opts) > 3
    assert {(o["a_rows"], o["a_cols"]) for o in candidates("kronecker", 24, 36)} == {(6, 4), (6, 6)}
    with pytest.raises(ValueError, match="method='svd'"):
        candidates("svd", 4, 4)


def test_layer_bad_options() -> None:
    with pytest.raises(ValueError, match="a_rows=5"):
        KroneckerLinear(16, 24, a_rows=5, a_cols=2)
    with pytest.raises(ValueError, match="terms=0"):
        KroneckerLinear(16, 24, a_rows=4, a_cols=2, terms=0)
    with pytest.raises(ValueError, match="rank2=25"):
        HadamardLinear(24, 30, rank1=1, rank2=25)
    with pytest.raises(ValueError, match="nn.Linear"):
        HadamardLinear.from_linear(nn.Conv1d(2, 2, 1), rank1=1, rank2=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", sorted(ADAPTER_METHODS))
def test_every_method_declares_whether_it_can_be_fitted(method: str) -> None:
    """Issue 19: ``fit_adapter`` asks the declared ``fit_structure``, never the class. A method declaring one is
    fitted exactly to a ΔW of its own structure; one declaring none is refused (``fit_adapter``, and the
    model-level inits find nothing to initialise)."""
    cls = ADAPTER_METHODS[method]
    if cls.fit_structure is not None:
        assert cls.fit_structure in FITTERS, cls.fit_structure
        assert method in FITTABLE
        model = loraplex.adapt(nn.Sequential(nn.Linear(24, 20)), method, rank=1)
        ((_, adapter),) = loraplex.adapters(model)
        target = randomize(adapter, seed=11)
        with torch.no_grad():
            for _, p in adapter.own_parameters():
                p.normal_()
        assert fit_adapter(adapter, target, restarts=8) < 1e-4
        assert torch.allclose(adapter.delta_weight(), target, atol=1e-3 * float(target.abs().max()))
        return
    assert method not in FITTABLE
    case = next(c for c in CASES if c.method == method)
    model = loraplex.adapt(case.specs[0].make(0), method, targets=case.targets, **case.options)
    _, adapter = loraplex.adapters(model)[0]
    with pytest.raises(ValueError, match=f"not {method!r}"):
        fit_adapter(adapter, torch.zeros(adapter.out_features, adapter.in_features))
    with pytest.raises(ValueError, match="no loha / lokr / lokh adapter"):
        init_from_weight(model)
