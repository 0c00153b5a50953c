"""LoKH (Jun Lu's survey): the Kronecker product of a small factor and a LoHa Hadamard product."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

import loraplex.options as opt
from loraplex.adapter import Adapter, is_restoring
from loraplex.adapters._kron import kron_linear
from loraplex.adapters.loha import hadamard_weight
from loraplex.adapters.lokr import DECOMPOSE_FACTOR, factorization
from loraplex.options import Option, validate

INITS = ("zeros", "lycoris", "random")


class LoKH(Adapter):
    """LoKH: low-rank Kronecker-of-Hadamard adaptation (Jun Lu, https://arxiv.org/abs/2408.05883).

    ``ΔW = s · kron(W1, (B1 A1) ⊙ (B2 A2))``, ``s = alpha / rank``; ``y = W0 x + b + ΔW x``.

    Definition (not pinned down: the survey names LoKH next to LoHa and LoKr, but its equations
    were not retrievable; decided here). LoKr is ``kron(w1, w2)`` with a small full ``w1`` and a
    large ``w2`` that is low-rank (``w2_a w2_b``); LoHa is ``(B1 A1) ⊙ (B2 A2)``. "Kronecker of
    Hadamard" is read as LoKr with its large factor replaced by LoHa's Hadamard product: the
    Kronecker product is the outer operation, the Hadamard product inside it. This keeps LoKr's
    cheap structure (``W1`` small and full, the forward by ``kron_linear`` on an (out_k, in_n)
    factor that costs ``2·r·out_k·in_n`` to build) and gains LoHa's rank: ``rank(ΔW) =
    rank(W1) · rank(H) <= min(out_l, in_m) · min(r², out_k, in_n)``. The other reading, a
    Kronecker product of two Hadamard products, needs four factor pairs for the same rank.

    Sizes as LoKr: ``out = out_l · out_k``, ``in = in_m · in_n`` by LoKr's ``factorization`` with
    ``decompose_factor`` (384 = 16 · 24, 1536 = 32 · 48; a prime splits as 1 · p, and LoKH is then
    LoHa times a scalar ``W1``). Parameters: ``out_l · in_m + 2 · rank · (out_k + in_n)``:
    640 for 384x384 at the default rank 4, LoKr's default count there. Defaults: ``rank=4`` (the
    Hadamard rank ``r² = 16`` then nearly fills the 24-wide factor), ``alpha=4`` (``s = 1``, as
    LoKr's and LoHa's default ``alpha = r``), ``decompose_factor=-1``.

    Inits (the adapted model is the base at init except with ``"random"``): ``"zeros"`` (default,
    as LoKr's default: ``W1 = 0``, the Hadamard factors random, so ``H != 0`` and ``W1`` gets
    gradients at once), ``"lycoris"`` (as LoHa's and LyCORIS' LoKr init: ``W1`` random, ``A2 = 0``),
    ``"random"`` (nothing zero). Zeroing a factor on each side would leave every gradient zero.
    Random draws: ``W1``, ``B1``, ``B2`` as ``nn.Linear``'s weight (``kaiming_uniform(a=sqrt(5))``,
    variance ``1 / (3 · fan_in)``); ``A1``, ``A2`` uniform with variance ``sqrt(3 / in_n)``, so that
    each product ``B A`` has variance ``(3 · in_n)^(-1/2)`` and ``H`` the variance ``1 / (3 · in_n)``
    of a kaiming-initialised full (out_k, in_n) factor, LoKr's ``w2``. Decision: with LoHa's
    kaiming draws for all four factors, ``H`` is a product of four small numbers (std 0.005 for
    in_n = 24 against 0.12 for LoKr's ``w2``), and training barely moves ΔW at first.

    Shapes: x (..., in) -> (..., out); W1 (out_l, in_m); B1, B2 (out_k, r); A1, A2 (r, in_n); fp32.

    Args:
        base: the layer to adapt.
        rank: inner dimension r of both Hadamard factors.
        alpha: scale numerator, ``s = alpha / rank``.
        decompose_factor: ``-1`` or the preferred size of ``W1``'s sides (LoKr's ``factorization``).
        init: ``"zeros"``, ``"lycoris"`` or ``"random"``.

    Example:
        >>> layer = LoKH(nn.Linear(384, 1536))
        >>> layer.W1.shape, layer.B1.shape, layer.A1.shape
        (torch.Size([32, 16]), torch.Size([48, 4]), torch.Size([4, 24]))
        >>> layer(torch.randn(2, 384)).shape, LoKH.num_params(384, 1536)
        (torch.Size([2, 1536]), 1088)
    """

    method = "lokh"
    fit_structure = "kronecker_hadamard"  # fitted to a target by loraplex.decompose.fit_adapter
    paper = "https://arxiv.org/abs/2408.05883"
    formula = "out_l * in_m + 2 * rank * (out_k + in_n)"
    # Unmeasured. At init an Adam step of size lr moves ΔW entries by about s · |H| · lr = lr / sqrt(3 · in_n)
    # ~ 0.12·lr (384x384: W1 moves; H scaled as LoKr's full w2) against ~0.17·lr for LoRA r = 8, alpha = 16
    # (LoRA's default 1e-3) and ~0.07·lr for LoKr (3e-3).
    default_lr = 2e-3
    size_option = "rank"
    declared_options: ClassVar[dict[str, Option]] = {
        "rank": opt.rank(4, "the rank of each Hadamard factor"),
        "alpha": opt.alpha(4.0),
        "decompose_factor": DECOMPOSE_FACTOR,
        "init": opt.choice("zeros", INITS, "how the factors start"),
    }

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int = 4,
        alpha: float = 4.0,
        decompose_factor: int = -1,
        init: str = "zeros",
    ) -> None:
        super().__init__(base)
        opts = {"rank": rank, "alpha": alpha, "decompose_factor": decompose_factor, "init": init}
        validate(self.declared_options, opts)
        self.rank, self.alpha, self.decompose_factor, self.init = rank, float(alpha), decompose_factor, init
        self.scale = self.alpha / rank
        in_m, in_n = factorization(self.in_features, decompose_factor)
        out_l, out_k = factorization(self.out_features, decompose_factor)
        device = self.param_device
        self.W1 = nn.Parameter(torch.zeros(out_l, in_m, device=device))  # (out_l, in_m), fp32
        self.B1 = nn.Parameter(torch.zeros(out_k, rank, device=device))  # (out_k, r)
        self.A1 = nn.Parameter(torch.zeros(rank, in_n, device=device))  # (r, in_n)
        self.B2 = nn.Parameter(torch.zeros(out_k, rank, device=device))  # (out_k, r)
        self.A2 = nn.Parameter(torch.zeros(rank, in_n, device=device))  # (r, in_n)
        if not is_restoring():
            self.reset_parameters()

    @classmethod
    def num_params(
        cls, in_features: int, out_features: int, *, rank: int = 4, decompose_factor: int = -1, **_: object
    ) -> int:
        in_m, in_n = factorization(in_features, decompose_factor)
        out_l, out_k = factorization(out_features, decompose_factor)
        return out_l * in_m + 2 * rank * (out_k + in_n)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for p in (self.W1, self.B1, self.B2):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        bound = math.sqrt(3.0) * (3.0 / self.A1.shape[1]) ** 0.25  # variance sqrt(3 / in_n)
        for p in (self.A1, self.A2):
            nn.init.uniform_(p, -bound, bound)
        if self.init == "zeros":
            nn.init.zeros_(self.W1)
        elif self.init == "lycoris":
            nn.init.zeros_(self.A2)

    def hadamard(self) -> Tensor:
        """``H = (B1 A1) ⊙ (B2 A2)``: (out_k, in_n)."""
        return hadamard_weight(self.B1, self.A1, self.B2, self.A2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # each adapter's effect is of the layer input x, so stacked ones add up
        if not self.active:
            return y
        effect = kron_linear(x.to(self.W1.dtype), self.W1 * self.scale, self.hadamard())  # (..., out)
        return y + effect.to(y.dtype)

    def delta_weight(self) -> Tensor:
        return self.scale * torch.kron(self.W1, self.hadamard())  # (out, in)
