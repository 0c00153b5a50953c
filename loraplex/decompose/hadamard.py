"""Hadamard product decomposition ``W ≈ (W1 Z1) ⊙ (W2 Z2)`` by alternating least squares.

Jun Lu, "Low-Rank Approximation, Adaptation, and Other Tales" (https://arxiv.org/abs/2408.05883); the form
of FedPara / LoHa (``loraplex.adapters.loha``). Shapes: W (m, n); W1 (m, r1), Z1 (r1, n), W2 (m, r2),
Z2 (r2, n); the product has rank at most ``r1 · r2`` for ``(r1 + r2)(m + n)`` parameters.

Update equations (derived here; the survey's are not pinned down, methods.md §16). With observation weights
``Ω`` and the pair ``(W2, Z2)`` fixed, write ``H = W2 Z2``. Then ``(W1 Z1 ⊙ H)_ij = H_ij · w1_i · z1_j``, and

    L = Σ_ij Ω_ij (W_ij - H_ij w1_i · z1_j)² + λ Σ ‖factors‖²_F

is, for row ``w1_i``, a weighted least-squares problem in the features ``H_ij z1_j``:

    w1_i = (Σ_j Ω_ij H_ij² z1_j z1_jᵀ + λ I)⁺ Σ_j Ω_ij H_ij W_ij z1_j,

i.e. ``als.solve_rows`` with weights ``Ω ⊙ H²`` and moments ``Ω ⊙ H ⊙ W``; each column ``z1_j`` likewise
with the roles of rows and columns swapped. One iteration updates ``W1``, ``Z1`` (``H = W2 Z2``), then
``W2``, ``Z2`` (``H = W1 Z1``). Every half-step is an exact block minimiser, so the loss never increases.

Decisions (not pinned down):

* After each iteration the factors are rescaled by ``a, b, c, d`` with ``abcd = 1`` so that all four norms
  equal their geometric mean (``balance``): the product is unchanged and, by AM-GM, this scaling minimises
  the ridge term, so the loss still never increases. Without it ``λ = 0`` lets the scales drift
  (``W1 c, W2 / c``) and the normal equations lose precision.
* ``init="svd"`` (default): ``W1 Z1`` the rank-``r1`` truncated SVD of the zero-filled ``Ω ⊙ W`` and
  ``W2 Z2 ≈ 1`` (first column / row of ones, the others ``0.1`` times standard normal from ``seed``, so that
  they are not stuck at zero): the start is close to the rank-``r1`` SVD. ``init="random"``: all four
  factors standard normal from ``seed``. ``restarts`` runs more random starts and keeps the best.
* Defaults ``reg = 0``, ``max_iter = 200``, ``tol = 1e-7`` and the stopping rule are ``als.als``'s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loraplex.decompose.als import (
    Fit,
    check_mask,
    check_matrix,
    check_options,
    generator_of,
    masked_loss,
    one_thread,
    solve_rows,
    svd_start,
    work_dtype,
)


def balance(W1: Tensor, Z1: Tensor, W2: Tensor, Z2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The same ``(W1 Z1) ⊙ (W2 Z2)`` with ``‖W1‖ = ‖Z1‖ = ‖W2‖ = ‖Z2‖`` (when no factor is zero)."""
    norms = [float(t.norm()) for t in (W1, Z1, W2, Z2)]
    if min(norms) == 0.0:
        return W1, Z1, W2, Z2
    target = (norms[0] * norms[1] * norms[2] * norms[3]) ** 0.25
    return tuple(t * (target / s) for t, s in zip((W1, Z1, W2, Z2), norms, strict=True))  # type: ignore[return-value]


def hadamard_als(
    W: Tensor,
    rank1: int,
    rank2: int | None = None,
    mask: Tensor | None = None,
    *,
    reg: float = 0.0,
    max_iter: int = 200,
    tol: float = 1e-7,
    init: str = "svd",
    seed: int | torch.Generator = 0,
    restarts: int = 1,
) -> Fit:
    """``W ≈ (W1 Z1) ⊙ (W2 Z2)`` (module docstring): ``Fit.factors = (W1, Z1, W2, Z2)`` in ``W``'s dtype.

    Args:
        W: (m, n) matrix.
        rank1, rank2: inner sizes ``r1``, ``r2`` (``rank2`` defaults to ``rank1``), each in ``[1, min(m, n)]``.
        mask: None, or 0/1 / bool / non-negative weights ``Ω`` of W's shape.
        reg, max_iter, tol, init, seed: module docstring (defaults 0, 200, 1e-7, ``"svd"``, 0).
        restarts: runs; the first from ``init``, the others from random starts drawn from ``seed``'s generator
            (the problem is not convex: planted rank-(2, 2) products are recovered from about half the
            starts); the run with the lowest final loss is returned, with its own history (default 1).

    Example:
        >>> g = torch.Generator().manual_seed(1)
        >>> W = (torch.randn(30, 2, generator=g) @ torch.randn(2, 24, generator=g)) * (
        ...     torch.randn(30, 2, generator=g) @ torch.randn(2, 24, generator=g))
        >>> fit = hadamard_als(W, 2, max_iter=300, restarts=3)
        >>> W1, Z1, W2, Z2 = fit.factors
        >>> fit.relative_error < 1e-4, torch.allclose((W1 @ Z1) * (W2 @ Z2), W, atol=1e-3)
        (True, True)
    """
    check_matrix("W", W)
    r2 = rank1 if rank2 is None else rank2
    check_options(rank1, min(W.shape), reg, max_iter, tol, init)
    check_options(r2, min(W.shape), reg, max_iter, tol, init)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts={restarts!r} must be an integer >= 1")
    gen = generator_of(seed)
    X = W.detach().to(work_dtype(W.device))
    weights = check_mask(mask, X)
    with one_thread():
        fits = [
            run(X, weights, rank1, r2, reg, max_iter, tol, init if k == 0 else "random", gen) for k in range(restarts)
        ]
    best = min(fits, key=lambda f: f.losses[-1])
    return Fit(tuple(t.to(W.dtype) for t in best.factors), best.losses, best.iterations, best.converged, best.total)


def run(
    X: Tensor,
    weights: Tensor | None,
    rank1: int,
    r2: int,
    reg: float,
    max_iter: int,
    tol: float,
    init: str,
    gen: torch.Generator,
) -> Fit:
    """One ALS run of ``hadamard_als`` in the working dtype."""
    Om = torch.ones_like(X) if weights is None else weights
    m, n = X.shape

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=X.dtype).to(X.device)

    if init == "svd":
        W1, Z1 = svd_start(X, weights, rank1)
        W2, Z2 = 0.1 * randn(m, r2), 0.1 * randn(r2, n)
        W2[:, 0], Z2[0] = 1.0, 1.0
    else:
        W1, Z1, W2, Z2 = randn(m, rank1), randn(rank1, n), randn(m, r2), randn(r2, n)
    W1, Z1, W2, Z2 = balance(W1, Z1, W2, Z2)
    total = float((Om * X * X).sum())

    def loss() -> float:
        penalty = sum(float(t.pow(2).sum()) for t in (W1, Z1, W2, Z2))
        return masked_loss(X, (W1 @ Z1) * (W2 @ Z2), weights) + reg * penalty

    def pair(A: Tensor, B: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
        """Update ``A`` (m, r) then ``B`` (r, n) of ``(A B) ⊙ H`` against ``X`` with weights ``Om``."""
        w, p = Om * H * H, Om * H * X  # weights Ω ⊙ H², moments Ω ⊙ H ⊙ W
        A = solve_rows(w, p, B, reg)
        B = solve_rows(w.T, p.T, A.T, reg).T
        return A, B

    losses = [loss()]
    converged = False
    for _ in range(max_iter):
        if losses[-1] <= tol**2 * total:
            converged = True
            break
        W1, Z1 = pair(W1, Z1, W2 @ Z2)
        W2, Z2 = pair(W2, Z2, W1 @ Z1)
        W1, Z1, W2, Z2 = balance(W1, Z1, W2, Z2)
        losses.append(loss())
        if losses[-2] - losses[-1] <= tol * losses[-2] or losses[-1] <= tol**2 * total:
            converged = True
            break
    return Fit((W1, Z1, W2, Z2), tuple(losses), len(losses) - 1, converged, total)
