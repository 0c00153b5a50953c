"""Nearest Kronecker products (Van Loan & Pitsianis 1993), as used by Jun Lu's survey (https://arxiv.org/abs/2408.05883).

For ``W`` (m1·m2, n1·n2), ``A`` (m1, n1), ``B`` (m2, n2), ``torch.kron(A, B)[i·m2 + k, j·n2 + l] = A_ij B_kl``.
The rearrangement ``R(W)`` (m1·n1, m2·n2) with ``R(W)[i·n1 + j, k·n2 + l] = W[i·m2 + k, j·n2 + l]`` (the
(i, j) block of W, row-major, becomes row ``i·n1 + j``) is a permutation of the entries, and maps
``kron(A, B)`` to ``vec(A) vec(B)ᵀ`` (row-major ``vec``), so

    ‖W - Σ_t A_t ⊗ B_t‖_F = ‖R(W) - Σ_t vec(A_t) vec(B_t)ᵀ‖_F.

The best single term is the top singular triplet of ``R(W)``, the best sum of ``T`` terms the top ``T``
(Eckart–Young), with error ``sqrt(Σ_{t > T} σ_t²)``; the factors split ``σ_t`` evenly
(``A_t = σ_t^½ mat(u_t)``, ``B_t = σ_t^½ mat(v_t)``). With missing entries the problem is masked low-rank
approximation of ``R(W)`` (the mask rearranged alike): ``als.als``.

``kronecker_ranked`` adds rank limits on the factors (LoKr's factored ``w1 = w1_a w1_b``, ``w2 = w2_a w2_b``):
with ``B`` fixed, ``‖R - vec(A) vec(B)ᵀ‖² = ‖B‖² ‖vec(A) - R vec(B) / ‖B‖²‖² + const``, an isotropic
least-squares problem in ``A``, so the best ``A`` of rank ``<= ra`` is the rank-``ra`` truncated SVD of
``mat(R vec(B)) / ‖B‖²`` (Eckart–Young); ``B`` likewise. Alternating these exact block minimisers from the
unconstrained optimum never increases the error (decided here; the survey does not treat rank limits).
"""

from __future__ import annotations

import torch
from torch import Tensor

from loraplex.adapters.lokr import factorization
from loraplex.decompose.als import Fit, als, check_mask, check_matrix, work_dtype


def check_split(W: Tensor, a_shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(m1, n1, m2, n2)`` for ``W`` (m1·m2, n1·n2) and ``A`` of shape ``a_shape`` (ValueError unless it divides)."""
    m, n = W.shape
    if (
        len(a_shape) != 2
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in a_shape)
        or m % a_shape[0]
        or n % a_shape[1]
    ):
        raise ValueError(f"a_shape={a_shape!r} must be two positive integers dividing W's shape {(m, n)}")
    return a_shape[0], a_shape[1], m // a_shape[0], n // a_shape[1]


def kron_shapes(out_features: int, in_features: int, factor: int = -1) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(A shape, B shape)`` by LoKr's ``factorization`` (near the square root; the smaller side for ``A``).

    Example:
        >>> kron_shapes(384, 1536)
        ((16, 32), (24, 48))
    """
    out_l, out_k = factorization(out_features, factor)
    in_m, in_n = factorization(in_features, factor)
    return (out_l, in_m), (out_k, in_n)


def rearrange(W: Tensor, a_shape: tuple[int, int]) -> Tensor:
    """``R(W)`` (m1·n1, m2·n2) of the module docstring."""
    m1, n1, m2, n2 = check_split(W, a_shape)
    return W.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def unrearrange(R: Tensor, a_shape: tuple[int, int], b_shape: tuple[int, int]) -> Tensor:
    """The inverse of ``rearrange``: (m1·n1, m2·n2) -> (m1·m2, n1·n2)."""
    (m1, n1), (m2, n2) = a_shape, b_shape
    return R.reshape(m1, n1, m2, n2).permute(0, 2, 1, 3).reshape(m1 * m2, n1 * n2)


def kron_sum(A: Tensor, B: Tensor) -> Tensor:
    """``Σ_t kron(A_t, B_t)``: A (T, m1, n1), B (T, m2, n2) -> (m1·m2, n1·n2)."""
    T, m1, n1 = A.shape
    _, m2, n2 = B.shape
    return torch.einsum("tij,tkl->ikjl", A, B).reshape(m1 * m2, n1 * n2)


def nearest_kronecker(W: Tensor, a_shape: tuple[int, int], terms: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """The best ``Σ_{t < T} A_t ⊗ B_t``: ``(A (T, m1, n1), B (T, m2, n2), σ)`` with all singular values σ of R(W).

    The error is ``sqrt(Σ_{t >= T} σ_t²)``; factors in ``W``'s dtype (computed in float64 on CPU).

    Example:
        >>> A, B = torch.randn(2, 3), torch.randn(4, 5)
        >>> A2, B2, s = nearest_kronecker(torch.kron(A, B), (2, 3))
        >>> torch.allclose(torch.kron(A2[0], B2[0]), torch.kron(A, B), atol=1e-5), bool(s[1] < 1e-5 * s[0])
        (True, True)
    """
    check_matrix("W", W)
    m1, n1, m2, n2 = check_split(W, a_shape)
    if isinstance(terms, bool) or not isinstance(terms, int) or not 1 <= terms <= min(m1 * n1, m2 * n2):
        raise ValueError(f"terms={terms!r} must be an integer in [1, min(m1·n1, m2·n2)] = [1, {min(m1 * n1, m2 * n2)}]")
    R = rearrange(W.detach().to(work_dtype(W.device)), a_shape)
    u, s, vh = torch.linalg.svd(R, full_matrices=False)
    root = s[:terms].sqrt()
    A = (u[:, :terms] * root).T.reshape(terms, m1, n1)
    B = (root[:, None] * vh[:terms]).reshape(terms, m2, n2)
    return A.to(W.dtype), B.to(W.dtype), s.to(W.dtype)


def kronecker_als(
    W: Tensor, a_shape: tuple[int, int], terms: int = 1, mask: Tensor | None = None, **options: object
) -> Fit:
    """Nearest sum of Kronecker products on the observed entries: ``als.als`` on ``R(W)`` with ``R(mask)``.

    ``Fit.factors = (A (T, m1, n1), B (T, m2, n2))``; ``options`` go to ``als.als`` (reg, max_iter, tol, init, seed).
    """
    check_matrix("W", W)
    m1, n1, m2, n2 = check_split(W, a_shape)
    weights = None if mask is None else rearrange(check_mask(mask, W), a_shape)  # type: ignore[arg-type]
    fit = als(rearrange(W, a_shape), terms, weights, **options)  # type: ignore[arg-type]
    U, V = fit.factors
    return Fit(
        (U.T.reshape(terms, m1, n1), V.reshape(terms, m2, n2)), fit.losses, fit.iterations, fit.converged, fit.total
    )


def truncate(M: Tensor, rank: int | None) -> Tensor:
    if rank is None or rank >= min(M.shape):
        return M
    u, s, vh = torch.linalg.svd(M, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def kronecker_ranked(
    W: Tensor,
    a_shape: tuple[int, int],
    rank_a: int | None = None,
    rank_b: int | None = None,
    *,
    max_iter: int = 50,
    tol: float = 1e-7,
) -> Fit:
    """The best single ``A ⊗ B`` with ``rank(A) <= rank_a``, ``rank(B) <= rank_b`` (None: no limit), by ALS.

    Module docstring; starts from ``nearest_kronecker``'s term, ``losses`` are ``‖W - A ⊗ B‖²_F``.
    ``Fit.factors = (A (m1, n1), B (m2, n2))`` in ``W``'s dtype.
    """
    check_matrix("W", W)
    m1, n1, m2, n2 = check_split(W, a_shape)
    for name, r in (("rank_a", rank_a), ("rank_b", rank_b)):
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"{name}={r!r} must be None or an integer >= 1")
    X = W.detach().to(work_dtype(W.device))
    R = rearrange(X, a_shape)
    A0, B0, _ = nearest_kronecker(X, a_shape)
    A, B = truncate(A0[0], rank_a), truncate(B0[0], rank_b)  # a feasible start, so the losses never increase
    total = float((X * X).sum())

    def loss() -> float:
        return float((R - A.reshape(-1, 1) * B.reshape(1, -1)).pow(2).sum())

    losses = [loss()]
    converged = rank_a is None and rank_b is None
    for _ in range(0 if converged else max_iter):
        nb = float(B.pow(2).sum())
        A = truncate((R @ B.reshape(-1)).reshape(m1, n1) / max(nb, 1e-300), rank_a)
        na = float(A.pow(2).sum())
        B = truncate((A.reshape(-1) @ R).reshape(m2, n2) / max(na, 1e-300), rank_b)
        losses.append(loss())
        if losses[-2] - losses[-1] <= tol * losses[-2] or losses[-1] <= tol**2 * total:
            converged = True
            break
    return Fit((A.to(W.dtype), B.to(W.dtype)), tuple(losses), len(losses) - 1, converged, total)
