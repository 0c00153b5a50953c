"""Alternating least squares (ALS) for ``W ≈ U V`` with missing entries and ridge regularisation.

Jun Lu, "Low-Rank Approximation, Adaptation, and Other Tales" (https://arxiv.org/abs/2408.05883) builds every
decomposition on ALS; the exact update equations are not pinned down there (methods.md §16), so they are
derived here. With observation weights ``Ω`` (a 0/1 mask of observed entries, or any non-negative weights),
``W`` (m, n), ``U`` (m, r), ``V`` (r, n) and ridge ``λ >= 0``, ALS minimises

    L(U, V) = Σ_ij Ω_ij (W_ij - u_i · v_j)² + λ (‖U‖²_F + ‖V‖²_F)

one block at a time. With ``V`` fixed, ``L`` splits over the rows ``u_i`` of ``U``, each a ridge regression:

    u_i = (Σ_j Ω_ij v_j v_jᵀ + λ I)⁺ (Σ_j Ω_ij W_ij v_j)        (the r x r normal equations of row i)

and, by symmetry (transpose everything), with ``U`` fixed each column ``v_j = (Σ_i Ω_ij u_i u_iᵀ + λ I)⁺
(Σ_i Ω_ij W_ij u_i)``. Each half-step is an exact block minimiser, so the loss never increases.
``solve_rows`` is the one kernel, written for a general "moment" matrix ``P`` in place of ``Ω ⊙ W``
(``b_i = P_i Vᵀ``) so that the Hadamard ALS (``hadamard.py``) reuses it with ``Ω ⊙ H²`` and ``Ω ⊙ H ⊙ W``.

Decisions (not pinned down by the survey):

* The normal equations are solved by Cholesky, in float64 on CPU (float32 on accelerators, as
  ``loraplex.compression.layers.svd``); a row with fewer than ``r`` observed entries and ``λ = 0`` has a
  singular system, solved by the pseudo-inverse: the minimum-norm minimiser is still a block minimiser.
* ``reg = 0`` by default: exact recovery of planted low-rank matrices needs no bias; ``reg > 0`` is the
  ridge-regularised ALS of the survey's missing-data chapter.
* ``init="svd"`` (default): ``U, V`` from the truncated SVD of the zero-filled ``Ω ⊙ W`` (the usual
  spectral start for matrix completion); ``init="random"``: ``U`` standard normal from ``seed``, then
  ``V`` solved. ``losses[0]`` is the loss of the initial ``(U, V)``.
* Stopping: ``converged`` when a full iteration lowers the loss by at most ``tol`` times the previous loss,
  or the loss is at most ``tol²`` times ``Σ Ω W²`` (exact fit); ``tol = 1e-7``, ``max_iter = 100``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from loraplex.linalg import split_factors
from loraplex.options import Option, validate

INITS = ("svd", "random")


@dataclass(frozen=True)
class Fit:
    """A decomposition's factors and its convergence record.

    ``losses[k]`` is the objective after ``k`` full iterations (``losses[0]``: at the initial factors), so
    ``len(losses) == iterations + 1``; ``converged`` says whether the ``tol`` test stopped it before
    ``max_iter``. ``total`` is ``Σ Ω W²``, so ``relative_error = sqrt(data part of the loss / total)``.
    """

    factors: tuple[Tensor, ...]
    losses: tuple[float, ...]
    iterations: int
    converged: bool
    total: float

    @property
    def relative_error(self) -> float:
        """``‖Ω^½ ⊙ (W - Ŵ)‖_F / ‖Ω^½ ⊙ W‖_F`` at the returned factors, when ``reg = 0`` (else an upper bound)."""
        return (max(self.losses[-1], 0.0) / self.total) ** 0.5 if self.total > 0 else 0.0


def work_dtype(device: torch.device) -> torch.dtype:
    """float64 on CPU, float32 on accelerators (as ``loraplex.compression.layers.svd``)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def check_matrix(name: str, W: object) -> Tensor:
    if not isinstance(W, Tensor) or W.ndim != 2 or not W.is_floating_point() or 0 in W.shape:
        shape = tuple(W.shape) if isinstance(W, Tensor) else type(W).__name__
        raise ValueError(f"{name} must be a non-empty 2-D floating-point tensor, got {shape}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name} has non-finite entries")
    return W


def check_mask(mask: Tensor | None, W: Tensor) -> Tensor | None:
    """``None`` (all observed) or non-negative weights of ``W``'s shape, as ``W``'s working dtype."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(W.shape):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask of shape {shape} must have W's shape {tuple(W.shape)}")
    m = mask.to(device=W.device, dtype=work_dtype(W.device))
    if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
        raise ValueError("mask must hold finite non-negative weights (0/1 or bool for missing entries)")
    if not bool(m.any()):
        raise ValueError(f"mask of shape {tuple(m.shape)} is all zero: no entry of W is observed, nothing to fit")
    return m


# The fits' options, with ``als``'s defaults (``hadamard_als`` sweeps 200 times; ``rank``'s bound is the matrix's).
ALS_OPTIONS = {
    "reg": Option("float", 0.0, "ridge on each least-squares step", nonneg=True),
    "max_iter": Option("int", 100, "alternating sweeps at most", low=0),
    "tol": Option("prob", 1e-7, "stop when the relative error improves by less"),
    "init": Option("choice", INITS[0], "how the factors start", choices=INITS),
}


def check_options(rank: int, limit: int, reg: float, max_iter: int, tol: float, init: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"rank={rank!r} must be an integer in [1, {limit}]")
    validate(ALS_OPTIONS, {"reg": reg, "max_iter": max_iter, "tol": tol, "init": init})


def generator_of(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an integer or a torch.Generator")
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the ALS loops with one intra-op CPU thread (restored afterwards).

    Measured on the 2-core development machine under load: batched Cholesky of 12 2x2 systems 16 ms -> 0.02 ms,
    of 384 16x16 systems 30 ms -> 1.7 ms; the many small GEMMs of an ALS iteration gain alike, while the
    largest (384x1536 weights, r = 20) lose 25 % (19 -> 24 ms). Accelerators are not affected.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def solve_rows(weights: Tensor | None, moments: Tensor, Z: Tensor, reg: float) -> Tensor:
    """Rows ``x_i = (Σ_j Ω_ij z_j z_jᵀ + λ I)⁺ (P_i Zᵀ)``: Ω (m, n) or None (all 1), P (m, n), Z (r, n) -> (m, r).

    ``x_i`` minimises ``Σ_j Ω_ij (x_i · z_j)² - 2 x_i · (P_i Zᵀ) + λ ‖x_i‖²``, i.e. ``Σ_j Ω_ij (W_ij - x_i · z_j)²
    + λ ‖x_i‖²`` when ``P = Ω ⊙ W``. The r x r systems of all rows are built by one matmul,
    ``Ω (Z ⊙_KR Z)ᵀ`` (m, r²), and solved batched.
    """
    r, n = Z.shape
    eye = reg * torch.eye(r, dtype=Z.dtype, device=Z.device)
    b = moments @ Z.T  # (m, r)
    if weights is None:  # one shared system
        return spd_solve((Z @ Z.T + eye)[None], b.T[None])[0].T  # (m, r)
    ZZ = (Z.T[:, :, None] * Z.T[:, None, :]).reshape(n, r * r)  # (n, r²): z_j z_jᵀ flattened
    A = (weights @ ZZ).reshape(-1, r, r) + eye  # (m, r, r)
    return spd_solve(A, b[:, :, None]).squeeze(-1)


def spd_solve(A: Tensor, b: Tensor) -> Tensor:
    """``A⁺ b`` for symmetric positive semi-definite ``A`` (k, r, r), b (k, r, c): Cholesky, pinv where it fails.

    A Cholesky factor exists exactly when ``A`` is positive definite; the singular systems (a row observed
    fewer than r times with ``λ = 0``) get the minimum-norm solution of the (hermitian) pseudo-inverse.
    """
    L, info = torch.linalg.cholesky_ex(A)
    x = torch.cholesky_solve(b, L)
    bad = info != 0
    if bool(bad.any()):
        x[bad] = torch.linalg.pinv(A[bad], hermitian=True) @ b[bad]
    return x


def masked_loss(W: Tensor, approx: Tensor, weights: Tensor | None) -> float:
    d = (W - approx) ** 2
    return float((d if weights is None else weights * d).sum())


def svd_start(W: Tensor, weights: Tensor | None, rank: int) -> tuple[Tensor, Tensor]:
    """``(U_r Σ_r^½, Σ_r^½ V_rᵀ)`` of the zero-filled ``Ω ⊙ W`` rescaled by the observed fraction."""
    X = W if weights is None else weights * W / weights.mean().clamp_min(1e-12)
    u, s, vh = torch.linalg.svd(X, full_matrices=False)
    return split_factors(u, s, vh, rank)


def als(
    W: Tensor,
    rank: int,
    mask: Tensor | None = None,
    *,
    reg: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-7,
    init: str = "svd",
    seed: int | torch.Generator = 0,
) -> Fit:
    """``W ≈ U V`` on the observed entries by ALS (module docstring): ``Fit.factors = (U (m, r), V (r, n))``.

    Args:
        W: (m, n) matrix; entries where ``mask`` is 0 are ignored (any finite value).
        rank: r, in ``[1, min(m, n)]``.
        mask: None (all observed), or 0/1 / bool / non-negative weights ``Ω`` of W's shape.
        reg: ridge ``λ`` on both factors (default 0).
        max_iter, tol, init, seed: see the module docstring (defaults 100, 1e-7, ``"svd"``, 0).

    Returns the factors in ``W``'s dtype; the loss history is computed in the working dtype.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> W = torch.randn(20, 3, generator=g) @ torch.randn(3, 15, generator=g)
        >>> mask = torch.rand(20, 15, generator=g) > 0.3
        >>> fit = als(W, 3, mask, init="random")
        >>> fit.converged, fit.relative_error < 1e-6, torch.allclose(fit.factors[0] @ fit.factors[1], W, atol=1e-4)
        (True, True, True)
    """
    check_matrix("W", W)
    check_options(rank, min(W.shape), reg, max_iter, tol, init)
    gen = generator_of(seed)
    with one_thread():
        return _als(W, rank, check_mask(mask, W), reg, max_iter, tol, init, gen)


def _als(
    W: Tensor, rank: int, weights: Tensor | None, reg: float, max_iter: int, tol: float, init: str, gen: torch.Generator
) -> Fit:
    X = W.detach().to(work_dtype(W.device))
    P = X if weights is None else weights * X
    if init == "svd":
        U, V = svd_start(X, weights, rank)
    else:
        U = torch.randn(X.shape[0], rank, generator=gen, dtype=X.dtype).to(X.device)
        V = solve_rows(None if weights is None else weights.T, P.T, U.T, reg).T
    total = float((P * X).sum())

    def loss() -> float:
        return masked_loss(X, U @ V, weights) + reg * float(U.pow(2).sum() + V.pow(2).sum())

    losses = [loss()]
    converged = False
    for _ in range(max_iter):
        if losses[-1] <= tol**2 * total:
            converged = True
            break
        U = solve_rows(weights, P, V, reg)  # (m, r)
        V = solve_rows(None if weights is None else weights.T, P.T, U.T, reg).T  # (r, n)
        losses.append(loss())
        if losses[-2] - losses[-1] <= tol * losses[-2] or losses[-1] <= tol**2 * total:
            converged = True
            break
    return Fit((U.to(W.dtype), V.to(W.dtype)), tuple(losses), len(losses) - 1, converged, total)
