"""LoLDU (Shi et al., 2024): train only r diagonal values of an LDU decomposition of W0."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import loraplex.options as opt
from loraplex.adapter import Adapter, is_restoring
from loraplex.adapters._ops import can_fuse, lowrank_linear
from loraplex.options import Option, validate

INITS = ("lu", "zeros", "ones", "normal")


def ldu_factors(W: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(PL, d, U)`` with ``W0 = P L diag(D) U`` (LU with partial pivoting), first ``rank`` pivots kept.

    ``PL = P L[:, :r]`` is L's rows put in place by the pivot index vector (LAPACK's row swaps
    replayed on ``arange(out)``), so no dense ``out x out`` permutation matrix is ever built
    (the reference code keeps one: 64 MB per 4096-wide layer). ``U`` is made unit-diagonal by
    dividing by its pivots; a zero pivot (a singular W0) leaves its row undivided and ``d = 0``, so
    that term starts at zero instead of producing inf / NaN. Computed in fp32 (float64 kept).

    "Zero" is relative (decided; the reference divides by any pivot): ``|d_i| <= eps · max_j |U_ij|``
    (``eps`` of the compute dtype), i.e. a pivot at the rounding level of its own row. Then every entry
    of the unit-diagonal ``U`` is at most ``1 / eps`` (8.4e6 in fp32), so no row overflows; an absolute
    test (``|d_i| > tiny``) let a pivot of 1e-37 under an entry of 1e3 give ``U = inf`` and a NaN output.

    Shapes: W (out, in) -> PL (out, r), d (r,), U (r, in).
    """
    W = W.detach().to(torch.promote_types(W.dtype, torch.float32))
    LU, pivots, _ = torch.linalg.lu_factor_ex(W)  # no error on a singular W: zero pivots are handled below
    out_f, k = W.shape[0], min(W.shape)
    L = LU[:, :k].tril(-1) + torch.eye(out_f, k, dtype=W.dtype, device=W.device)  # (out, k), unit diagonal
    U = LU[:k].triu()  # (k, in)
    perm = list(range(out_f))
    for i, p in enumerate((pivots - 1).tolist()):  # LAPACK: row i was swapped with row p
        perm[i], perm[p] = perm[p], perm[i]
    PL = torch.empty_like(L[:, :rank])
    PL[torch.tensor(perm, device=W.device)] = L[:, :rank]  # (P L)[perm[i]] = L[i]
    d = U.diagonal()[:rank].clone()  # (r,)
    pivot = d.abs() > torch.finfo(W.dtype).eps * U[:rank].abs().amax(1)  # (r,): not a zero pivot
    d = torch.where(pivot, d, 0.0)
    return PL, d, U[:rank] / torch.where(pivot, d, 1.0)[:, None]


class LoLDU(Adapter):
    """LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition (https://arxiv.org/abs/2410.13618).

    ``W0 = P L diag(D) U`` (LU with partial pivoting, U unit-diagonal). With the first r pivots,
    the reference code trains ``z`` in ``W = W_res + σ P L_r diag(z) U_r``, ``W_res = W0 - σ P L_r
    diag(D_r) U_r``, ``σ = alpha / rank``. loraplex keeps W0 untouched and adds the equal update
    ``ΔW = σ P L_r diag(z - D_r) U_r``: no base rewrite, exactly the base at init with ``z = D_r``
    (init ``"lu"``; the reference's other inits ``"zeros"``, ``"ones"``, ``"normal"`` (N(mean D_r,
    std D_r)) change the output at init). The forward is a LoRA with frozen ``A = U_r`` and
    ``B = σ P L_r diag(z - D_r)`` through the fused low-rank node: no (out, in) product per step
    (the reference materialises one). Only ``z`` (r values) trains.

    Shapes: x (..., in) -> (..., out); z, d (r,); PL (out, r); U (r, in).

    Args:
        base: the layer to adapt.
        rank: number of pivots kept, at most min(in_features, out_features).
        alpha: σ = alpha / rank (the reference's ``from_linear`` default alpha = 1).
        init: ``"lu"`` (default), ``"zeros"``, ``"ones"`` or ``"normal"``.

    Example:
        >>> layer = LoLDU(nn.Linear(16, 32), rank=4)
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 32])
    """

    PL: Tensor
    U: Tensor
    d: Tensor
    method = "loldu"
    paper = "https://arxiv.org/abs/2410.13618"
    formula = "rank"
    default_lr = 1e-2  # r values per layer move W0 only through σ = alpha / rank; LoRA's 1e-3 barely moves them
    size_option = "rank"
    declared_options: ClassVar[dict[str, Option]] = {
        "rank": opt.rank(8, "the rank r (<= min(in, out))"),
        "alpha": opt.alpha(1.0, "the scale numerator (scale = alpha / rank)", nonzero=True),
        "init": opt.choice("lu", INITS, "how the factors start (lu: from the LU of W0)"),
    }

    def __init__(self, base: nn.Module, *, rank: int = 8, alpha: float = 1.0, init: str = "lu") -> None:
        super().__init__(base)
        validate(self.declared_options, {"rank": rank, "alpha": alpha, "init": init})
        if rank > min(self.in_features, self.out_features):
            raise ValueError(
                f"rank={rank} must be <= min(in_features={self.in_features}, out_features={self.out_features})"
            )
        self.rank, self.scale, self.init = rank, alpha / rank, init
        device = self.param_device
        self.register_buffer("PL", torch.zeros(self.out_features, rank, device=device))  # (out, r)
        self.register_buffer("U", torch.zeros(rank, self.in_features, device=device))  # (r, in)
        self.register_buffer("d", torch.zeros(rank, device=device))  # (r,) the kept pivots D_r
        self.z = nn.Parameter(torch.zeros(rank, device=device))  # (r,)
        if not is_restoring():
            self.reset_parameters()

    @classmethod
    def num_params(cls, in_features: int, out_features: int, *, rank: int = 8, **_: object) -> int:
        return rank

    @torch.no_grad()
    def reset_parameters(self) -> None:
        PL, d, U = ldu_factors(self.weight, self.rank)
        self.PL.copy_(PL), self.d.copy_(d), self.U.copy_(U)
        if self.init == "lu":
            self.z.copy_(d)
        elif self.init == "normal":
            self.z.copy_(torch.normal(d.mean().expand_as(d), d.std(unbiased=False).expand_as(d)))
        else:
            self.z.fill_(0.0 if self.init == "zeros" else 1.0)

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A, B) = (U_r, σ P L_r diag(z - D_r))``: ΔW = B A."""
        return self.U, self.PL * (self.scale * (self.z - self.d))

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return self.base(x)
        A, B = self.factors()
        if not self.stacked and can_fuse(x, self.weight, self.bias, A):
            return lowrank_linear(x, self.weight, self.bias, A, B, 1.0)
        y = self.base(x)
        return y + F.linear(F.linear(x.to(A.dtype), A), B).to(y.dtype)

    def delta_weight(self) -> Tensor:
        A, B = self.factors()
        return B @ A  # (out, in)
