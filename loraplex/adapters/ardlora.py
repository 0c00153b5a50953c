"""ARD-LoRA (Shinwari & Usama, 2025): LoRA with learnable per-head rank scales behind a hard rank mask.

The forward keeps exactly ``r = max(1, round(r0 · α))`` components per head (``rank_mask``); α gets a
straight-through gradient from the soft sigmoid mask (``soft_rank_mask``).

The allocator that regularises the scales (ℓ1 + total variation) and clamps them is ``loraplex.rank.ardlora``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import loraplex.options as opt
from loraplex.adapter import Adapter, is_restoring
from loraplex.options import Option, validate


def soft_rank_mask(scales: Tensor, rank: int, temperature: float) -> Tensor:
    """``m_{h,j} = sigmoid((r0 · α_h − j + ½) / τ)`` for ``j = 1..r0``. Shapes: scales (H,) -> (H, r0).

    Entry ``j`` is above ½ exactly when ``j < r0 α + ½``, so the number of entries above ½ is
    ``effective_ranks(α)`` (see there). We count ``j`` from 1; methods.md writes ``j = 0..r0−1``
    with ``+½``, which would switch on one component more than ``round(r0 α)`` (all r0 at
    ``α = (r0 − 1)/r0``, one at ``α = 0``).

    >>> soft_rank_mask(torch.tensor([0.5]), 4, 0.5).gt(0.5).tolist()
    [[True, True, False, False]]
    """
    j = torch.arange(1, rank + 1, device=scales.device, dtype=scales.dtype)  # (r0,)
    return torch.sigmoid((rank * scales[:, None] - j + 0.5) / temperature)


def rank_mask(scales: Tensor, rank: int, temperature: float) -> Tensor:
    """The hard rank mask with a straight-through gradient: (H,) -> (H, r0).

    Forward value: ``1`` for ``j ≤ r_h = effective_ranks(α)_h`` and exactly ``0`` past it, so head h's
    update has rank at most ``r_h``, the rank that is reported. Backward: the gradient of the soft
    mask ``soft_rank_mask(α, r0, τ)`` (``m = hard + (soft − soft.detach())``; the bracket is exactly 0
    in the forward, so the hard values are exact). ``∂L/∂m_j`` is taken at the hard mask, which for
    a switched-off component is how much switching it back on would help.

    >>> rank_mask(torch.tensor([0.5, 0.1]), 4, 0.5).tolist()
    [[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    """
    soft = soft_rank_mask(scales, rank, temperature)  # (H, r0)
    j = torch.arange(1, rank + 1, device=scales.device)  # (r0,)
    hard = (j <= effective_ranks(scales, rank)[:, None]).to(soft.dtype)  # (H, r0)
    return hard + (soft - soft.detach())


def effective_ranks(scales: Tensor, rank: int) -> Tensor:
    """``r_h = max(1, round(r0 · α_h))``, capped at r0, rounding halves down: int64 (H,).

    Rounding halves down (``ceil(r0 α − ½)``) makes ``r_h`` exactly the number of mask entries above
    ½ (``soft_rank_mask``) and the number of ones of the hard mask (``rank_mask``), so the reported
    rank is what the forward keeps; the cap at ``r0`` covers
    ``α > 1`` (the adapter alone does not clamp; the allocator does).

    >>> effective_ranks(torch.tensor([1.0, 0.5, 0.3, 0.0, 2.0]), 8).tolist()
    [8, 4, 2, 1, 8]
    """
    return torch.ceil(rank * scales.detach().double() - 0.5).clamp(1, rank).to(torch.int64)


def valid_heads(out_features: int) -> list[int]:
    """The head counts an ``out_features``-row layer splits into: its divisors.

    >>> valid_heads(12)
    [1, 2, 3, 4, 6, 12]
    """
    return [h for h in range(1, out_features + 1) if out_features % h == 0]


class ARDLoRA(Adapter):
    """ARD-LoRA: Adaptive Rank Dynamic LoRA (https://arxiv.org/abs/2506.18267), our differentiable realisation.

    The paper gives each layer l and head h a learnable scale ``α_{l,h}`` and an effective rank
    ``r = max(1, round(r0 · α))`` as the size of the factors ``B_h`` (out/H × r), ``A_h`` (r × in),
    trained with ``L_task + λ R(α)`` (ℓ1 sparsity + total variation); how gradients pass the rounding
    is not pinned down (no code is public). **Our design**: the factors keep the maximal rank r0 and a
    hard rank mask keeps the first ``r`` of their components:

    ``y = W0 x + b + Σ_h [(alpha / r0) · B_h diag(m(α_h)) A_h dropout(x)]`` on head h's rows, with
    ``m_j(α_h) = 1`` for ``j ≤ r_h = max(1, round(r0 · α_h))`` and exactly ``0`` for ``j > r_h``
    (``rank_mask``), i.e. ``ΔW_h = (alpha / r0) · B_h[:, :r_h] A_h[:r_h]``: the paper's truncated
    factors, so ``rank(ΔW_h) ≤ r_h`` = the reported rank (``effective_ranks``), and the ℓ1 on α
    penalises rank itself. The update is split into ``heads`` blocks of ``out / heads`` rows (an
    attention projection's heads; ``heads=1`` is one scale per layer; ``delta_weight()`` stacks them).

    The rounding has no gradient; α gets a **straight-through** one, that of the soft mask
    ``s_j(α) = sigmoid((r0 · α − j + ½) / τ)`` (``soft_rank_mask``; its entries above ½ are the
    hard mask's ones): ``∂L/∂α_h = Σ_j ∂L/∂m_{h,j} · ∂s_j/∂α_h``, with ``∂L/∂m_j`` at the hard mask.
    A switched-off component gets no task gradient (its columns of B and rows of A are frozen
    until α switches it back on, with their old values), but ``∂L/∂m_j`` still tells α whether it
    would help. A soft mask in the forward (our earlier design) does not work: B and A re-grow any
    scaled-down component, so a head reported at rank 1 had an update of full numerical rank and ℓ1
    did not penalise rank. Shapes never change (the optimizer state stays valid).

    Parameters: ``A`` (heads · r0, in) = ``[A_1; …; A_H]`` (one GEMM for all heads), ``B`` (out, r0)
    = ``[B_1; …; B_H]`` (applied block-diagonally: head h's A-rows feed only head h's B-rows),
    ``rank_scale`` (heads,) = α. Init: A as ``nn.Linear`` (LoRA's kaiming), B = 0 (the base model at
    init), α = 1 (effective rank r0: every component on; decision, the paper starts from r0).

    Defaults: ``rank`` r0 = 8, ``alpha`` 16 (LoRA's scale ``alpha / r0``; the paper does not give
    them), ``heads`` 1 (per layer: the allocator then has one scale per layer and needs no head
    layout; use the model's head count for the paper's per-head scales), ``temperature`` τ = 0.5
    (not in the paper; only the straight-through gradient uses it: soft-mask entries more than 2.5
    components from the boundary ``r0 α + ½`` are within 0.7% of 0 or 1, so about two components on
    each side of the boundary pass gradient to α; a smaller τ starves α of gradient).

    Shapes: x (..., in) -> (..., out).

    Args:
        base: the layer to adapt.
        rank: r0, the maximal rank per head.
        alpha: scale numerator (``alpha / rank``).
        heads: head blocks of the output rows; must divide out_features.
        temperature: τ of the straight-through (soft) rank mask's gradient (> 0).
        dropout: dropout probability on the adapter's input.

    Example:
        >>> layer = ARDLoRA(nn.Linear(16, 32), rank=4, heads=2)
        >>> layer(torch.randn(2, 16)).shape, layer.effective_ranks().tolist()
        (torch.Size([2, 32]), [4, 4])
    """

    method = "ardlora"
    paper = "https://arxiv.org/abs/2506.18267"
    formula = "heads * rank * (in + out / heads) + heads"
    # LoRA's default: A and B are LoRA's factors; under Adam α moves at most ~lr per step (times the
    # allocator's lr_scale, 10 by default), so at 1e-3 a head can go from r0 = 8 to rank 1 in
    # (1 - 1/r0) / (10 lr) ≈ 90 steps, well within a one-epoch run.
    default_lr = 1e-3
    size_option = "rank"
    declared_options: ClassVar[dict[str, Option]] = {
        "rank": opt.rank(8, "the rank r (the gates m switch components off)"),
        "alpha": opt.alpha(16.0),
        "heads": Option("int", 1, "gate heads (divides out)"),
        "temperature": opt.alpha(0.5, "the gates' sigmoid temperature", positive=True),
        "dropout": opt.dropout(),
    }

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        heads: int = 1,
        temperature: float = 0.5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(base)
        opts = {"rank": rank, "alpha": alpha, "heads": heads, "temperature": temperature, "dropout": dropout}
        validate(self.declared_options, opts)
        if self.out_features % heads:
            valid = ", ".join(map(str, valid_heads(self.out_features)))
            raise ValueError(f"heads={heads} must divide out_features={self.out_features}; valid head counts: {valid}")
        self.rank, self.heads, self.temperature = rank, heads, float(temperature)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(p_drop) if (p_drop := float(dropout)) else nn.Identity()
        device = self.param_device
        self.A = nn.Parameter(torch.empty(heads * rank, self.in_features, device=device))  # (H r0, in), fp32
        self.B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))  # (out, r0), fp32
        self.rank_scale = nn.Parameter(torch.ones(heads, device=device))  # α (H,), fp32
        if not is_restoring():
            self.reset_parameters()

    @classmethod
    def num_params(cls, in_features: int, out_features: int, *, rank: int = 8, heads: int = 1, **_: object) -> int:
        return heads * rank * (in_features + out_features // heads) + heads

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's default, as LoRA
        nn.init.zeros_(self.B)
        nn.init.ones_(self.rank_scale)

    def mask(self) -> Tensor:
        """The hard rank mask of every head, straight-through to α (``rank_mask``): (H, r0)."""
        return rank_mask(self.rank_scale, self.rank, self.temperature)

    def effective_ranks(self) -> Tensor:
        """``max(1, round(r0 · α_h))`` per head (int64, (H,)): the components the forward keeps."""
        return effective_ranks(self.rank_scale, self.rank)

    def effect(self, x: Tensor) -> Tensor:
        """``Σ_h (alpha / r0) · B_h diag(m_h) A_h x`` in fp32: (..., in) -> (..., out)."""
        z = F.linear(x.to(self.A.dtype), self.A)  # (..., H r0)
        z = z * (self.scale * self.mask()).flatten()
        if self.heads == 1:
            return F.linear(z, self.B)
        B = self.B.view(self.heads, -1, self.rank)  # (H, out / H, r0)
        y = torch.einsum("...hr,hor->...ho", z.unflatten(-1, (self.heads, self.rank)), B)
        return y.flatten(-2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.active:
            return y
        return y + self.effect(self.dropout(x)).to(y.dtype)

    def delta_weight(self) -> Tensor:
        B = self.B.view(self.heads, -1, self.rank)  # (H, out / H, r0)
        A = self.A.view(self.heads, self.rank, self.in_features)  # (H, r0, in)
        scaled = B * (self.scale * self.mask())[:, None, :]
        return torch.bmm(scaled, A).reshape(self.out_features, self.in_features)  # (out, in)

    def rank_axes(self) -> dict[str, int]:
        # several heads: component j is row h r0 + j of A for every head h, not one axis (Adapter.rank_axes)
        return {"A": 0, "B": 1} if self.heads == 1 else {}
