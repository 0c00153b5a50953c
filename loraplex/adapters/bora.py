"""BoRA (Wang et al., 2024): DoRA with a magnitude per row and per column of the weight."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loraplex.adapters._ops import can_fuse, lowrank_linear
from loraplex.adapters.dora import NORM_EPS, inverse_norm
from loraplex.adapters.lora import LoRA, lora_options
from loraplex.options import Option


def bidirectional_gains(V: Tensor, m_col: Tensor) -> tuple[Tensor, Tensor]:
    """The column gain ``c = m_col / ‖V‖_col`` and the inverse row norm ``1 / ‖V diag(c)‖_row``, V detached.

    ``W' = diag(m_row · inv_row) V diag(c)``. What is a constant in the backward pass, exactly: ``V`` and
    everything computed from ``V`` alone (``‖V‖_col``, ``V ⊙ V``), as DoRA detaches its norm. ``c`` is not:
    the row norm ``‖V diag(c)‖_row = sqrt(Σ_j V_ij² c_j²)`` depends on ``m_col`` through ``c``, and the
    gradient flows through it. That dependence is what makes ``W'`` invariant to scaling ``m_col``
    (``c → t c`` scales both ``V diag(c)`` and its row norm by ``t``), so the true gradient satisfies
    ``⟨∂L/∂m_col, m_col⟩ = 0``; an earlier version detached the row norm too and got ``m_col``'s gradient
    49-75 % off finite differences (tests/test_bora.py pins it to central differences in fp64).

    A zero column (row) of ``V`` (norm ``<= NORM_EPS``) has no direction: its gain is 0 whatever the
    magnitude (``dora.inverse_norm``; a floored norm gave gains up to ``m · 1e12``, whose square
    overflowed fp32 into ``0 · inf = NaN``). The row norm's inverse is taken as ``rsqrt`` of the clamped
    square, so that a zero row also has a zero (not ``0 / 0``) gradient.
    Shapes: V (out, in), m_col (in,) -> c (in,), inv_row (out,).
    """
    with torch.no_grad():
        V2 = V.square()  # (out, in): one pass gives both norms
        inv_col = inverse_norm(V2.sum(0).sqrt_())  # (in,)
    c = m_col * inv_col
    row2 = V2 @ c.square()  # (out,): ‖U‖_row² = Σ_j V_ij² c_j², U = V diag(c); differentiable in c
    inv_row = torch.where(row2 > NORM_EPS**2, row2.clamp_min(NORM_EPS**2).rsqrt(), 0.0)
    return c, inv_row


class BoRA(LoRA):
    """BoRA: Bi-dimensional Weight-Decomposed Low-Rank Adaptation (https://arxiv.org/abs/2412.06441).

    The direction is LoRA's, ``V = W0 + s B A`` (``s = alpha / rank``), normalised and rescaled in
    both dimensions with two trainable magnitude vectors::

        U  = V diag(m_col / ‖V‖_col)          # each input column rescaled to norm m_col[j]
        W' = diag(m_row / ‖U‖_row) U          # then each output row to norm m_row[i]

    ``‖·‖_col`` is the norm of each column of the ``(out, in)`` weight (over ``dim=0``),
    ``‖·‖_row`` of each row (``dim=1``, DoRA's norm). With ``m_col = ‖W0‖_col`` and
    ``m_row = ‖W0‖_row`` and ``B = 0`` the first step gives ``U = W0`` and the second ``W' = W0``:
    the base model at init (the column gains are exactly 1, the row gains 1 to rounding).

    Not pinned down (methods.md section 7: no code and no equations were retrievable), decided:

    * Order: columns first, rows last, so that ``m_row`` keeps DoRA's meaning: it is exactly the
      row norms of ``W'`` (tested); ``m_col`` acts as a per-input-feature scale before it.
    * ``V`` is a constant in the backward pass (detached), as DoRA's paper (section 4.3) and PEFT
      treat its one norm: the column norm ``‖V‖_col`` and ``V ⊙ V`` are constants, but the row
      norm ``‖V diag(c)‖_row`` keeps its dependence on ``m_col`` through ``c`` (``bidirectional_gains``),
      so ``m_col``'s gradient is exact for the detached-``V`` objective (finite differences, fp64).
      ``delta_weight()`` detaches the same way, so merge and gradients agree.

    Forward without building ``W'`` for the product: ``y = r ⊙ ((x ⊙ c) W0^T + s (x ⊙ c) A^T B^T) + b``
    (the base GEMM on a rescaled input, through LoRA's fused node); the norms need ``V``, one
    ``(out, in)`` pass per forward, as DoRA.

    Shapes: x (..., in) -> (..., out); A (r, in); B (out, r); m_col (in,); m_row (out,).

    Args:
        base: the layer to adapt.
        rank: inner dimension r.
        alpha: scale numerator.
        dropout: dropout probability on the low-rank branch's input.
        rslora: use the rank-stabilised scale ``alpha / sqrt(rank)``.
        init: ``"kaiming"`` or ``"gaussian"`` (A's init; B = 0).

    Example:
        >>> layer = BoRA(nn.Linear(16, 32), rank=4)
        >>> x = torch.randn(2, 16)
        >>> torch.allclose(layer(x), layer.base(x), rtol=1e-6, atol=1e-7)
        True
    """

    method = "bora"
    reads_base_weight = True  # ΔW reads W0 (see Adapter.reads_base_weight)
    paper = "https://arxiv.org/abs/2412.06441"
    formula = "rank * (in + out) + in + out"
    default_lr = 1e-3  # DoRA's (and LoRA's): the paper builds on DoRA's setup
    peft_type = None  # type: ignore[assignment]  # PEFT has no BoRA; LoRA's codec must not claim it
    declared_options: ClassVar[dict[str, Option]] = lora_options(("kaiming", "gaussian"), "how A and B start")

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "kaiming",
    ) -> None:
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, init=init)
        with torch.no_grad():
            W = self.weight.to(self.A.dtype)
            self.m_col = nn.Parameter(torch.linalg.vector_norm(W, dim=0))  # (in,)
            self.m_row = nn.Parameter(torch.linalg.vector_norm(W, dim=1))  # (out,)

    @classmethod
    def inits(cls) -> tuple[str, ...]:
        return ("kaiming", "gaussian")

    @classmethod
    def num_params(cls, in_features: int, out_features: int, *, rank: int = 8, **_: object) -> int:
        return rank * (in_features + out_features) + in_features + out_features

    def to_peft(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        raise NotImplementedError("bora has no HuggingFace PEFT equivalent")

    def gains(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(c, inv_row, V)`` of the current weights, see ``bidirectional_gains``: (in,), (out,), (out, in)."""
        with torch.no_grad():
            V = torch.addmm(self.weight.to(self.A.dtype), self.B, self.A, alpha=self.scale)  # (out, in)
        return (*bidirectional_gains(V, self.m_col), V)

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return self.base(x)
        c, inv_row, V = self.gains()
        xc = x.to(c.dtype) * c  # (..., in)
        live_dropout = self.training and isinstance(self.dropout, nn.Dropout)
        if not self.stacked and not live_dropout and can_fuse(x, self.weight, self.bias, self.A):
            return lowrank_linear(xc, self.weight, self.bias, self.A, self.B, self.scale, self.m_row, inv_row, V)
        # The frozen product runs in the base weight's dtype (bf16 models: a bf16 GEMM, not an fp32 copy of W);
        # the column gain is applied to x first, so x diag(c) W^T = (x * c) W^T in either dtype.
        W = self.weight
        base_xc = xc if x.dtype == c.dtype else x * c.to(x.dtype)
        z = (self.m_row * inv_row) * (
            F.linear(base_xc.to(W.dtype), W).to(c.dtype) + self.lowrank(self.dropout(xc), self.A, self.B)
        )
        if self.stacked:
            y = self.base(x)
            return y + (z - F.linear(x.to(W.dtype), W).to(c.dtype)).to(y.dtype)
        out = z.to(x.dtype)
        return out if self.bias is None else out + self.bias

    def factor_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
        """None: BoRA: row and column magnitudes rescale ``W + s B A`` is not ``s B A``."""
        return []

    def product_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
        """``[(A, B, scale)]``: A and B enter only through ``s B A`` (LoRA+'s fast ``B``, hot-swap padding)."""
        return [(self.A, self.B, float(self.scale))]

    def delta_weight(self) -> Tensor:
        W = self.weight.to(self.A.dtype)
        V = torch.addmm(W, self.B, self.A, alpha=self.scale)  # (out, in)
        c, inv_row = bidirectional_gains(V, self.m_col)
        return (self.m_row * inv_row)[:, None] * V * c[None, :] - W
