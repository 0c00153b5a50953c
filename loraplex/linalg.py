"""The ground floor: pure linear algebra on tensors (SVD, factor splitting, rank finders, spectra).

Nothing here imports from the rest of ``loraplex``; every other layer may import from here. Each
quantity has one home: the thin SVD (:func:`svd`), the even factor split (:func:`split_factors`,
:func:`svd_factors`), and the spectral statistics and rank finders below.

**SVD and factors.** :func:`svd` is the thin SVD in float64 (float32 on accelerators);
:func:`split_factors` splits the singular values evenly, ``U_r Σ_r^½`` and ``Σ_r^½ V_rᵀ``, as TRP's
``decompose.py`` and Cuttlefish's ``decompose_weights`` do; by Eckart–Young the product is the best
rank-``r`` approximation in Frobenius (and spectral) norm, with error ``sqrt(Σ_{i>r} σ_i²)``.

**Spectra.** Pure functions of the singular values of a weight matrix. Every function takes
either a weight ``W`` or its spectrum: a matrix ``(out, in)``; a tensor with ``ndim > 2`` (a
convolution kernel ``(N, C, kh, kw)``) viewed as ``(N, C*kh*kw)``, the matrix TRP (NC scheme) and
Cuttlefish factorise; or a 1-D tensor taken to *be* the singular values (any order; finite and
non-negative), so ``f(W) == f(singular_values(W))`` for every ``f`` here. An adapter's
update is analysed the same way: ``stable_rank(adapter.delta_weight())``.

Notation: ``σ_1 >= σ_2 >= ... >= σ_n >= 0``, ``n = min(out, in)``, ``‖W‖_F² = Σ σ_i²``.

* ``stable_rank``    ``‖W‖_F² / σ_1²``                         in ``[1, n]`` (Cuttlefish, MLSys 2023);
  ``floored_stable_rank`` is Cuttlefish's ``floor`` of it, taken with a relative tolerance (:func:`floor_rank`)
* ``effective_rank`` ``exp(-Σ p_i log p_i)``, ``p_i = σ_i / Σ σ_j``   in ``[1, n]`` (Roy & Vetterli 2007)
* ``energy_rank``    least ``k`` with ``Σ_{i<=k} σ_i² >= energy · ‖W‖_F²``   (TRP's ``EnergyThreshold``)
* ``tail_error``     ``‖W - W_k‖_F / ‖W‖_F = sqrt(Σ_{i>k} σ_i² / Σ σ_i²)``   (Eckart–Young)
* ``rank_for_error`` least ``k`` with ``tail_error(W, k) <= error``
* ``numerical_rank`` the number of non-zero singular values (after the tolerance below)
* ``value_rank``     ``#{σ_i > threshold}``, at least 1 (TRP's nuclear-norm truncation)

**Zero matrix** (and empty matrices): every rank is 0, ``stable_rank = effective_rank = 0.0`` and
``tail_error = 0.0`` (``W_k = W``; the ratio 0/0 is taken as 0). This module is the one home of
``stable_rank`` and ``energy_rank``: Cuttlefish (:mod:`loraplex.lowrank.cuttlefish`), TRP
(:mod:`loraplex.lowrank.trp`) and the LoRD allocator (:mod:`loraplex.compression.allocate`) call these; a
caller that must keep at least one component (TRP's truncation, the allocator's energy rule, ``convert``)
says so itself with ``max(1, energy_rank(...))``.

**Tolerance (our decision, not pinned down by the papers).** A matrix of exact rank ``r`` stored in
floating point has ``n - r`` tiny non-zero singular values from rounding; they would make
``energy_rank(W, 1.0)`` and ``rank_for_error(W, 0)`` return ``n`` and nudge the effective rank.
Rounding ``W`` to its dtype perturbs it by ``E`` with ``‖E‖_2 <= ‖E‖_F <= u ‖W‖_F`` (unit
roundoff ``u = eps/2``), and computing ``W`` (a product of factors) in that dtype adds about as much,
so :func:`singular_values` sets every ``σ_i <= rtol · ‖W‖_F`` to exactly 0, with default
``rtol = 4 · eps(W.dtype)`` (``eps`` of float64 for integer tensors and for float64 spectra): a
margin of 4 over that bound. For float32 weights this is ``4.8e-7 ‖W‖_F``; for bfloat16
(``eps = 2⁻⁷``) it is ``0.03 ‖W‖_F``, the precision the stored weight actually has. We do not use
numpy's ``matrix_rank`` default ``max(out, in) · eps · σ_1``: in bfloat16 it exceeds ``σ_1`` for any
layer wider than 128. The singular values are computed in float64 on the CPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def svd(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a matrix in float64 (float32 on accelerators): ``(U, S, Vh)``, ``S`` descending."""
    x = w.detach().reshape(w.shape[0], -1)
    x = x.double() if x.device.type == "cpu" else x.float()
    return torch.linalg.svd(x, full_matrices=False)


def split_factors(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(U_r Σ_r^½, Σ_r^½ V_rᵀ)`` of shapes ``(out, rank)`` and ``(rank, in)``."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def svd_factors(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-``rank`` factors of ``w`` (matrix, or conv weight viewed as ``(N, C*kh*kw)``).

    >>> w = torch.randn(6, 4)
    >>> up, down = svd_factors(w, 4)
    >>> torch.allclose(up @ down, w.double(), atol=1e-10)
    True
    """
    check_rank(rank, w.shape[0], w[0].numel())
    u, s, vh = svd(w)
    return split_factors(u, s, vh, rank)


def check_rank(rank: int, out_features: int, in_features: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(out_features, in_features):
        raise ValueError(
            f"rank={rank!r} must be an integer in [1, min(out, in)] = [1, {min(out_features, in_features)}] "
            f"for a ({out_features}, {in_features}) weight"
        )


RTOL_FACTOR = 4.0  # default rtol = RTOL_FACTOR * eps(dtype); see the module docstring


def default_rtol(dtype: torch.dtype) -> float:
    """``4 · eps(dtype)``, with float64's ``eps`` for non-floating dtypes.

    >>> default_rtol(torch.float32)
    4.76837158203125e-07
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    return RTOL_FACTOR * eps


def singular_values(w: Tensor, *, rtol: float | None = None) -> Tensor:
    """The singular values of ``w``, descending, float64 on the CPU; those ``<= rtol · ‖w‖_F`` are set to 0.

    Shapes: ``(out, in)`` or ``(N, C, kh, kw)`` (viewed as ``(N, C*kh*kw)``) -> ``(min(out, in),)``;
    a 1-D ``w`` is a spectrum already: validated (finite, non-negative) and sorted descending.

    Args:
        w: a weight, a convolution kernel, or a spectrum.
        rtol: relative tolerance; default ``4 · eps(w.dtype)`` (see the module docstring).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> u, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=g))
        >>> w = u[:, :2] @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ u[:, 2:4].T
        >>> [round(v, 12) for v in singular_values(w).tolist()]  # the rounding noise is set to exactly 0
        [3.0, 1.0, 0.0, 0.0, 0.0]
    """
    if not isinstance(w, Tensor):
        raise ValueError(f"w must be a torch.Tensor, not {type(w).__name__}")
    if w.is_complex() or w.dtype == torch.bool:
        raise ValueError(f"w has dtype {w.dtype}; only real tensors have the spectra analysed here")
    if w.ndim == 0:
        raise ValueError("w is a scalar; expected a matrix, a convolution kernel or a 1-D spectrum")
    if rtol is None:
        rtol = default_rtol(w.dtype)
    elif isinstance(rtol, bool) or not isinstance(rtol, int | float) or not 0 <= rtol < 1:
        raise ValueError(f"rtol={rtol!r} must be a number in [0, 1)")
    x = w.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"w of shape {tuple(w.shape)} holds NaN or inf")
    if w.ndim == 1:
        if (x < 0).any():
            raise ValueError(f"a 1-D w is a spectrum and must be non-negative; its minimum is {x.min().item()}")
        s = x.sort(descending=True).values
    else:
        s = torch.linalg.svdvals(x.reshape(w.shape[0], math.prod(w.shape[1:])))  # (min(out, in),), descending
    norm = s.square().sum().sqrt()  # ‖W‖_F
    return torch.where(s > rtol * norm, s, torch.zeros_like(s))


def numerical_rank(w: Tensor) -> int:
    """The number of non-zero singular values (after the tolerance).

    >>> numerical_rank(torch.ones(4, 3))
    1
    """
    return int((singular_values(w) > 0).sum())


def stable_rank(w: Tensor) -> float:
    """``‖W‖_F² / σ_1²`` (0.0 for the zero matrix), a float in ``[1, rank]``.

    Cuttlefish (https://arxiv.org/abs/2305.02538, its ``rank_estimation``) uses ``floor`` of this;
    we return it unfloored, so callers decide (``math.floor(stable_rank(w))`` is Cuttlefish's).

    >>> stable_rank(torch.tensor([2.0, 1.0, 1.0]))
    1.5
    """
    s = singular_values(w)
    if s.numel() == 0 or s[0] == 0:
        return 0.0
    return float(s.square().sum() / s[0].square())


FLOOR_RTOL = 1e-9  # floor_rank's relative tolerance


def floor_rank(x: float, rtol: float = FLOOR_RTOL) -> int:
    """``floor(x)``, except that an ``x`` within ``rtol · max(1, |x|)`` below an integer counts as that integer.

    A ratio that is an integer in exact arithmetic comes out of the float arithmetic a few ulps either
    side of it: the stable rank of a 12×12 orthogonal matrix is 11.999999999999989, and a plain ``floor``
    gives 11. The tolerance (1e-9, far above float64 rounding, far below any meaningful fraction of a rank)
    rounds such values to the integer.

    >>> floor_rank(11.999999999999989), floor_rank(11.5), floor_rank(0.0)
    (12, 11, 0)
    """
    return math.floor(x + rtol * max(1.0, abs(x)))


def floored_stable_rank(w: Tensor) -> int:
    """Cuttlefish's ``floor(‖W‖_F² / σ_1²)`` (``rank_estimation``), floored by :func:`floor_rank`; 0 for zero.

    >>> floored_stable_rank(torch.diag(torch.tensor([2.0, 1.0, 1.0]))), floored_stable_rank(torch.eye(12))
    (1, 12)
    """
    return floor_rank(stable_rank(w))


def effective_rank(w: Tensor) -> float:
    """``exp(H(p))``, ``p_i = σ_i / Σ_j σ_j``, ``H(p) = -Σ p_i log p_i`` (terms with ``p_i = 0`` are 0).

    Roy & Vetterli, "The effective rank: a measure of effective dimensionality", EUSIPCO 2007
    (the definition of its section 2). Equal to ``k`` for ``k`` equal non-zero singular
    values; 0.0 for the zero matrix (the paper leaves it undefined).

    >>> round(effective_rank(torch.tensor([1.0, 1.0, 1.0, 0.0])), 12)
    3.0
    """
    s = singular_values(w)
    s = s[s > 0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return math.exp(float(-(p * p.log()).sum()))


def check_energy(energy: float) -> float:
    """``energy`` must be a number in ``(0, 1]``."""
    if isinstance(energy, bool) or not isinstance(energy, int | float) or not 0 < energy <= 1:
        raise ValueError(f"energy={energy!r} must be a number in (0, 1]")
    return float(energy)


def energy_rank(w: Tensor, energy: float = 0.9) -> int:
    """The least ``k`` with ``Σ_{i<=k} σ_i² / Σ_i σ_i² >= energy``; 0 for the zero matrix.

    TRP's ``EnergyThreshold`` (Xu et al., https://arxiv.org/abs/2004.14566); its default 0.9 is ours.
    The ratio is taken against the last partial sum, so ``energy=1.0`` gives exactly the numerical rank.

    >>> energy_rank(torch.tensor([3.0, 2.0, 1.0]), 0.9)  # 9/14 = 0.64, 13/14 = 0.93
    2
    """
    energy = check_energy(energy)
    s = singular_values(w)
    if s.numel() == 0 or s[0] == 0:
        return 0
    cum = s.square().cumsum(0)
    return int((cum / cum[-1] < energy).sum()) + 1


def value_rank(s: Tensor, threshold: float) -> int:
    """``#{σ_i > threshold}``, at least 1 (a layer is never removed).

    >>> value_rank(torch.tensor([1.0, 0.06, 0.05, 0.01]), 0.05)
    2
    """
    return max(1, int((s > threshold).sum()))


def _tails(s: Tensor) -> Tensor:
    """``Σ_{i>k} σ_i²`` for ``k = 0..n``, summed from the small end (no cancellation)."""
    sq = s.square().flip(0).cumsum(0).flip(0)  # (n,) Σ_{i>=k+1}
    return torch.cat([sq, sq.new_zeros(1)])  # (n + 1,)


def tail_error(w: Tensor, k: int) -> float:
    """``‖W - W_k‖_F / ‖W‖_F = sqrt(Σ_{i>k} σ_i² / Σ σ_i²)`` for the best rank-``k`` ``W_k``.

    Eckart–Young–Mirsky: truncating the SVD is optimal in Frobenius norm. 0.0 for the zero matrix.

    >>> tail_error(torch.tensor([4.0, 3.0]), 1)  # 3 / 5
    0.6
    """
    s = singular_values(w)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= s.numel():
        raise ValueError(f"k={k!r} must be an integer in [0, {s.numel()}] (the number of singular values)")
    tails = _tails(s)
    if tails[0] == 0:
        return 0.0
    return math.sqrt(float(tails[k] / tails[0]))


def rank_for_error(w: Tensor, error: float) -> int:
    """The least ``k`` with ``tail_error(w, k) <= error``; 0 for the zero matrix.

    ``error = 0`` gives the numerical rank; in exact arithmetic this is ``energy_rank(w, 1 - error²)``.

    >>> rank_for_error(torch.tensor([4.0, 3.0]), 0.6), rank_for_error(torch.tensor([4.0, 3.0]), 0.59)
    (1, 2)
    """
    if isinstance(error, bool) or not isinstance(error, int | float) or not 0 <= error < 1:
        raise ValueError(f"error={error!r} must be a number in [0, 1)")
    tails = _tails(singular_values(w))  # decreasing in k, so the failing k are 0..answer-1
    return int((tails > error * error * tails[0]).sum())
