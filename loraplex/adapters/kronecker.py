"""Kronecker LoRA (SURM, Sehanobish et al., NeurIPS 2024): ΔW = (alpha / r) · kron(B, A), in + out parameters."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

import loraplex.options as opt
from loraplex.adapter import Adapter, is_restoring
from loraplex.adapters._kron import kron_linear
from loraplex.options import Option, validate


def common_divisors(a: int, b: int) -> list[int]:
    g = math.gcd(a, b)
    return [d for d in range(1, g + 1) if g % d == 0]


def rank_bound(d_in: int, d_out: int, r: int) -> int:
    """``rank(B) · rank(A) <= min(out / r, r) · min(r, in / r)``: the largest rank ΔW can reach."""
    return min(d_out // r, r) * min(r, d_in // r)


def auto_factor(d_in: int, d_out: int) -> int:
    """The common divisor ``r`` of ``in`` and ``out`` with the largest ``rank_bound``, the smallest on ties.

    Example:
        >>> auto_factor(384, 384), auto_factor(384, 1536), auto_factor(1536, 384), auto_factor(13, 29)
        (16, 24, 24, 1)
    """
    return max(common_divisors(d_in, d_out), key=lambda r: (rank_bound(d_in, d_out, r), -r))


class Kronecker(Adapter):
    """Kronecker LoRA, one of SURM's structured unrestricted-rank matrices (https://arxiv.org/abs/2406.17740).

    ``y = W0 x + b + s · kron(B, A) dropout(x)``, ``s = alpha / r``;
    ``delta_weight() = s · kron(B, A)``, ``kron(B, A)[i·r + k, j·(in/r) + l] = B[i, j] · A[k, l]``.
    As the reference ``arijitthegame/structured-matrices-PEFT: src/lora/kronecker_lora.py``
    (``kronecker_A``, ``kronecker_B``, ``kronecker_alpha``, ``kronecker_dropout``).

    ``r`` is a *factor size*, not a rank: it must divide ``in`` and ``out``, and ``rank(ΔW) =
    rank(B) · rank(A) <= min(out / r, r) · min(r, in / r)`` (256 for 384x384 with r = 16).
    Whatever ``r``, the adapter trains ``in + out`` parameters. The option is therefore named
    ``factor``, not ``rank``. Decision (the reference has no default): ``factor=None`` picks, per
    layer, the common divisor of ``in`` and ``out`` with the largest rank bound, the smallest
    such (``auto_factor``: 16 for 384x384, 24 for 384x1536, 1 for coprime sizes, where ΔW is a
    rank-1 outer product). ``alpha`` defaults to the reference's ``kronecker_alpha = 1``, so
    ``s = 1 / r``.

    Init as the reference: ``A`` as ``nn.Linear``'s weight (``kaiming_uniform(a=sqrt(5))``),
    ``B = 0``: the base model at init. The forward never builds the (out, in) product
    (``kron_linear``: ``x`` as an (r, in/r) matrix, two small matmuls).

    Shapes: x (..., in) -> (..., out); A (r, in / r); B (out / r, r); fp32.

    Args:
        base: the layer to adapt.
        factor: the Kronecker factor size r (``None``: ``auto_factor``).
        alpha: scale numerator, ``s = alpha / r``.
        dropout: dropout probability on the adapter's input.

    Example:
        >>> layer = Kronecker(nn.Linear(16, 32), factor=4)
        >>> layer.A.shape, layer.B.shape
        (torch.Size([4, 4]), torch.Size([8, 4]))
        >>> layer(torch.randn(2, 16)).shape, Kronecker.num_params(16, 32, factor=4)
        (torch.Size([2, 32]), 48)
    """

    method = "kronecker"
    paper = "https://arxiv.org/abs/2406.17740"
    formula = "in + out"
    # Unmeasured. At init an Adam step of size lr moves ΔW entries by about 0.007·lr (384x384, r = 16:
    # B moves, times |A| ~ 1/sqrt(3·24), times s = 1/16) against ~0.17·lr for LoRA r = 8, alpha = 16;
    # 1e-2 is 10x LoRA's 1e-3, kept below the ~2e-2 that estimate suggests.
    default_lr = 1e-2
    size_option = None  # in + out parameters whatever the factor
    declared_options: ClassVar[dict[str, Option]] = {
        "factor": Option("int", None, "A's size r (divides in and out; None: near the square root)", optional=True),
        "alpha": opt.alpha(1.0, "the scale numerator (scale = alpha / factor)"),
        "dropout": opt.dropout(),
    }

    def __init__(self, base: nn.Module, *, factor: int | None = None, alpha: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__(base)
        d_in, d_out = self.in_features, self.out_features
        validate(self.declared_options, {"factor": factor, "alpha": alpha, "dropout": dropout})
        r = auto_factor(d_in, d_out) if factor is None else factor
        if d_in % r or d_out % r:
            found = common_divisors(d_in, d_out)
            shown = ", ".join(map(str, found if len(found) <= 12 else [*found[:9], "...", *found[-2:]]))
            raise ValueError(
                f"factor={r} must divide in_features={d_in} and out_features={d_out}; valid factors: {shown}"
            )
        self.factor, self.alpha = r, float(alpha)
        self.scale = self.alpha / r
        self.dropout = nn.Dropout(p_drop) if (p_drop := float(dropout)) else nn.Identity()
        self.A = nn.Parameter(torch.zeros(r, d_in // r, device=self.param_device))  # (r, in / r), fp32
        self.B = nn.Parameter(torch.zeros(d_out // r, r, device=self.param_device))  # (out / r, r), fp32
        if not is_restoring():
            self.reset_parameters()

    @classmethod
    def num_params(cls, in_features: int, out_features: int, **_: object) -> int:
        return in_features + out_features

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # each adapter's effect is of the layer input x, so stacked ones add up
        if not self.active:
            return y
        effect = kron_linear(self.dropout(x).to(self.A.dtype), self.B * self.scale, self.A)  # (..., out)
        return y + effect.to(y.dtype)

    def delta_weight(self) -> Tensor:
        return self.scale * torch.kron(self.B, self.A)  # (out, in)
