"""DoRA (Liu et al., ICML 2024): a learnable magnitude over LoRA's direction."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loraplex.adapters._ops import lowrank_linear
from loraplex.adapters.lora import LoRA, lora_options
from loraplex.options import Option

# Norms at or below this count as zero: such a row (column, for BoRA) has no direction and gets gain 0.
NORM_EPS = 1e-12


def inverse_norm(norm: Tensor) -> Tensor:
    """``1 / norm`` where ``norm > NORM_EPS``, else 0 (any shape, no gradient wanted: the norms are constants).

    Not pinned down (DoRA's paper and PEFT divide by the norm: ``0 / 0 = NaN`` on a zero row of ``V``),
    decided: a row of ``V = W0 + s B A`` with norm ``<= NORM_EPS`` has no direction, so its gain
    ``m / ‖V‖`` is 0 whatever ``m``, and that row of ``W'`` is 0 (it is 0 in ``V`` too: the output is the
    same as with any finite gain). An earlier floor ``m / max(‖V‖, eps)`` gave gains up to ``m · 1e12``,
    which overflow fp16 (inf, then ``inf · 0 = NaN`` in the base product's backward) and, squared for
    BoRA's row norm, fp32 (tested in tests/test_reliability_numeric.py).

    Example:
        >>> inverse_norm(torch.tensor([2.0, 0.0, 1e-13]))
        tensor([0.5000, 0.0000, 0.0000])
    """
    return torch.where(norm > NORM_EPS, norm.clamp_min(NORM_EPS).reciprocal(), 0.0)


class DoRA(LoRA):
    """DoRA: Weight-Decomposed Low-Rank Adaptation (https://arxiv.org/abs/2402.09353).

    ``W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_row``, ``s = alpha / rank``; ``m`` starts at ``‖W0‖_row``
    so ``W' = W0`` at init. The norm is one per output row (the paper's "column norm" of the
    transposed weight, as PEFT) and is detached from the graph (paper section 4.3).

    Forward without a second matmul by W0 (dropout off, not stacked): with ``g = m / ‖V‖``,
    ``y = g ⊙ (x W0^T + s x A^T B^T) + b``, reusing the one base product. With dropout on, the
    direction term needs ``dropout(x) W0^T`` as PEFT computes it, so one extra matmul is paid.

    Shapes: x (..., in) -> (..., out); A (r, in); B (out, r); m (out,).

    Convolutions (``nn.Conv1d`` / ``nn.Conv2d``, as PEFT's ``_DoraConvNdLayer``): ``V`` is the
    ``(out, in_channels·prod(kernel))`` matrix of ``W0 + s ΔW``, so the norm runs over every dim but
    the output channel; ``y = base(x) + (g - 1) conv(dropout(x), W0) + g · s · conv_lowrank(dropout(x))``
    with ``g`` per output channel; ``delta_weight()`` is in ``(out, in, *kernel)`` layout. PEFT
    stores ``m`` as ``(1, out, 1[, 1])``; ``to_peft`` gives that view. Embeddings are not adapted
    (the issue asks DoRA for convolutions only).

    Args:
        base: the layer to adapt.
        rank: inner dimension r.
        alpha: scale numerator.
        dropout: dropout probability on the low-rank branch's input.
        rslora: use the rank-stabilised scale ``alpha / sqrt(rank)``.
        init: ``"kaiming"`` or ``"gaussian"`` (A's init; B = 0).

    Example:
        >>> layer = DoRA(nn.Linear(16, 32), rank=4)
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 32])
    """

    method = "dora"
    reads_base_weight = True  # ΔW reads W0 (see Adapter.reads_base_weight)
    paper = "https://arxiv.org/abs/2402.09353"
    formula = "rank * (in + out) + out"
    default_lr = 1e-3  # as LoRA: the paper reuses LoRA's learning rates
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv")
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
        if any(isinstance(a, DoRA) for a in self.stack(base)):
            raise ValueError("a layer takes at most one DoRA adapter: two magnitudes on one row are not defined")
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, init=init)
        self.m = nn.Parameter(self.row_norm())  # (out,)

    @classmethod
    def inits(cls) -> tuple[str, ...]:
        return ("kaiming", "gaussian")

    @classmethod
    def num_params(cls, in_features: int, out_features: int, *, rank: int = 8, **_: object) -> int:
        return rank * (in_features + out_features) + out_features

    peft_keys = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")

    def to_peft(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        config, tensors = super().to_peft()
        m = self.m.detach()
        if self.kind == "conv":  # PEFT's conv magnitude is (1, out, 1[, 1])
            m = m.view(1, -1, *[1] * (self.root_weight.dim() - 2))
        return config | {"use_dora": True}, tensors | {"lora_magnitude_vector": m}

    @classmethod
    def peft_matches(cls, config: dict[str, Any]) -> bool:
        return bool(config.get("use_dora", False))

    @torch.no_grad()
    def direction(self) -> Tensor:
        """``V = W0 + s B A`` in the adapter dtype (fp32), no gradient: (out, in)."""
        return torch.addmm(self.weight.to(self.A.dtype), self.B, self.A, alpha=self.scale)

    def row_norm(self) -> Tensor:
        """``‖W0 + s B A‖`` per output row, no gradient: (out,)."""
        return torch.linalg.vector_norm(self.direction(), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return self.base(x)
        V = self.direction()  # (out, in)
        inv_norm = inverse_norm(torch.linalg.vector_norm(V, dim=1))  # (out,), a constant (paper 4.3)
        if self.fusable(x):  # one GEMM by V (fp32 throughout)
            return lowrank_linear(x, self.weight, self.bias, self.A, self.B, self.scale, self.m, inv_norm, V)
        g = self.per_output(self.m * inv_norm)  # (out,), or (out, 1[, 1]) for a convolution
        dx = self.dropout(x)
        lora = self.lowrank(dx, self.A, self.B)  # (..., out)
        if dx is x and not self.stacked:
            y = self.base_product(x)  # the only product with W0, bias added after scaling
            out = (g * (y + lora)).to(y.dtype)
            return out if self.bias is None else out + self.per_output(self.bias)
        y = self.base(x)
        return y + ((g - 1) * self.base_product(dx) + g * lora).to(y.dtype)

    def base_product(self, x: Tensor) -> Tensor:
        """The root layer's output without bias: ``x W0^T``, or the convolution by ``W0``."""
        if self.kind == "linear":
            return F.linear(x, self.weight)
        return self.apply_weight(x, self.root_weight)

    def factor_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
        """None: DoRA: ``m ⊙ (W + s B A) / ‖W + s B A‖ − W`` is not ``s B A``."""
        return []

    def product_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
        """``[(A, B, scale)]``: A and B enter only through ``s B A`` (LoRA+'s fast ``B``, hot-swap padding)."""
        return [(self.A, self.B, float(self.scale))]

    def delta_weight(self) -> Tensor:
        W = self.weight.to(self.A.dtype)
        V = torch.addmm(W, self.B, self.A, alpha=self.scale)  # (out, in)
        g = self.m * inverse_norm(torch.linalg.vector_norm(V, dim=1).detach())
        return self.layout(g[:, None] * V - W)  # the layer's layout (Adapter.layout)
