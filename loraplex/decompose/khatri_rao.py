"""Khatri–Rao (column-wise Kronecker) and face-splitting (row-wise) products, and their best inverses.

Jun Lu, "Low-Rank Approximation, Adaptation, and Other Tales" (https://arxiv.org/abs/2408.05883).
For ``A`` (I, K) and ``B`` (J, K), the Khatri–Rao product ``A ⊙ B`` (I·J, K) has columns
``(A ⊙ B)[:, k] = kron(A[:, k], B[:, k])``, i.e. ``(A ⊙ B)[i·J + j, k] = A_ik B_jk``. Its column ``k``,
reshaped row-major to (I, J), is the rank-1 matrix ``a_k b_kᵀ``, so the best ``(A, B)`` for a given
``C`` (I·J, K) is, column by column, the rank-1 truncated SVD of ``mat(c_k)``: ``a_k = σ_k^½ u_k``,
``b_k = σ_k^½ v_k`` (Eckart–Young; the error is ``sqrt(Σ_k Σ_{s >= 2} σ_{k,s}²)``, zero when ``C`` is a
Khatri–Rao product; the sign / scale split of each pair is not identifiable, and is decided as even).

The face-splitting product (row-wise Kronecker) of ``A`` (K, I), ``B`` (K, J) is ``(Aᵀ ⊙ Bᵀ)ᵀ`` (K, I·J);
LoHa's ``ΔW = P Q`` uses both (``loraplex.adapters.loha.khatri_rao_factors``, same pair order).
"""

from __future__ import annotations

import torch
from torch import Tensor

from loraplex.decompose.als import check_matrix, work_dtype


def khatri_rao(A: Tensor, B: Tensor) -> Tensor:
    """``A ⊙ B``: A (I, K), B (J, K) -> (I·J, K), column ``k`` = ``kron(A[:, k], B[:, k])``.

    Example:
        >>> A, B = torch.randn(2, 3), torch.randn(4, 3)
        >>> torch.allclose(khatri_rao(A, B)[:, 1], torch.kron(A[:, 1], B[:, 1]))
        True
    """
    check_matrix("A", A)
    check_matrix("B", B)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} must have the same number of columns")
    return (A[:, None, :] * B[None, :, :]).reshape(A.shape[0] * B.shape[0], A.shape[1])


def face_splitting(A: Tensor, B: Tensor) -> Tensor:
    """The row-wise Kronecker product: A (K, I), B (K, J) -> (K, I·J), row ``k`` = ``kron(A[k], B[k])``."""
    check_matrix("A", A)
    check_matrix("B", B)
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} must have the same number of rows")
    return khatri_rao(A.T, B.T).T


def khatri_rao_factors(C: Tensor, rows_a: int) -> tuple[Tensor, Tensor]:
    """The best ``(A (I, K), B (J, K))`` with ``A ⊙ B ≈ C`` (I·J, K), ``I = rows_a``: per column rank-1 SVD.

    Exact (up to rounding) when ``C`` is a Khatri–Rao product; in ``C``'s dtype, computed in float64 on CPU.

    Example:
        >>> A, B = torch.randn(3, 5), torch.randn(4, 5)
        >>> A2, B2 = khatri_rao_factors(khatri_rao(A, B), 3)
        >>> torch.allclose(khatri_rao(A2, B2), khatri_rao(A, B), atol=1e-5)
        True
    """
    check_matrix("C", C)
    if isinstance(rows_a, bool) or not isinstance(rows_a, int) or rows_a < 1 or C.shape[0] % rows_a:
        raise ValueError(f"rows_a={rows_a!r} must be a positive integer dividing C's {C.shape[0]} rows")
    i, k = rows_a, C.shape[1]
    M = C.detach().to(work_dtype(C.device)).T.reshape(k, i, -1)  # column k as the (I, J) matrix a_k b_kᵀ
    u, s, vh = torch.linalg.svd(M, full_matrices=False)  # (K, I, q), (K, q), (K, q, J)
    root = s[:, :1].sqrt()  # (K, 1)
    A = (u[:, :, 0] * root).T  # (I, K)
    B = (vh[:, 0, :] * root).T  # (J, K)
    return A.to(C.dtype), B.to(C.dtype)


def face_splitting_factors(C: Tensor, cols_a: int) -> tuple[Tensor, Tensor]:
    """The best ``(A (K, I), B (K, J))`` with ``face_splitting(A, B) ≈ C`` (K, I·J), ``I = cols_a``."""
    A, B = khatri_rao_factors(C.T, cols_a)
    return A.T, B.T
