"""SURM Toeplitz LoRA (Sehanobish et al., NeurIPS 2024): ΔW is a product of two symmetric Toeplitz matrices."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import loraplex.options as opt
from loraplex.adapter import Adapter, is_restoring
from loraplex.adapters._ops import can_fuse
from loraplex.adapters._structured import check_square, compute_dtype, toeplitz, toeplitz_matmul
from loraplex.options import Option, validate

# The merged-weight path pays for itself from about this many rows per feature (see Toeplitz.fusable).
FUSE_ROWS_PER_FEATURE = 0.75


class Toeplitz(Adapter):
    """SURM Toeplitz LoRA (https://arxiv.org/abs/2406.17740), as the authors' ``src/lora/toeplitz_lora.py``.

    ``y = W0 x + bias + alpha · T(b) T(a) dropout(x)`` with the symmetric Toeplitz matrix
    ``T(v)[i, j] = v[|i - j|]`` (first row = first column = ``v``). The reference applies it as
    ``((x T(a)) T(b)) · alpha`` with two zero-padded FFT products and merges
    ``T(b) @ T(a)``, the same matrix. ``delta_weight() = alpha · T(b) T(a)``.

    Square layers only (``d = in = out``; the reference asserts it). Trainable: ``2d``.

    Init, as the reference: ``a ~ N(0, 0.02²)``, ``b = 0``: ``ΔW = 0``, the base model at init.
    ``alpha`` is the reference's ``toep_alpha`` (default 1; its ``trainable_alpha`` variant is not
    offered); ``dropout`` its ``toeplitz_dropout`` (default 0).

    FFT length: the reference pads to the next power of two ``>= 2d - 1`` (1024 for ``d = 384``);
    we use the smallest 5-smooth length (768), see ``_structured.fast_length``.

    ``delta_weight()`` builds ``T(αb) T(a)`` as ``(T(a) T(αb))^T``: one padded FFT product over the
    ``d`` rows of ``T(a)``, ``O(d² log d)`` (a dense ``T(b) @ T(a)`` is ``O(d³)``: minutes to merge
    a 4096-wide model on CPU).

    Speed: the FFT path needs two products with padded (``~2d``) transforms, forward and backward;
    from ``0.75 d`` rows on a plain base layer the forward is instead one GEMM
    with ``W0 + delta_weight()`` and the gradient of ΔW the GEMM ``gy^T x``; see ``fusable``.

    Half precision: the intermediate ``x T(a)`` stays in fp32 between the two products (rounded to an
    fp16 input's dtype it overflowed at 65504 into inf, then ``inf · 0 = NaN`` in the second FFT, even
    when the final ``x T(a) T(αb)`` fits fp16; tested).

    Shapes: x (..., d) -> (..., d); a, b (d,), fp32.

    Args:
        base: the (square) layer to adapt.
        alpha: the scale of ΔW.
        dropout: dropout probability on the adapter's input.

    Example:
        >>> layer = Toeplitz(nn.Linear(8, 8))
        >>> x = torch.randn(2, 8)
        >>> torch.equal(layer(x), layer.base(x))  # b = 0 at init
        True
    """

    method = "toeplitz"
    paper = "https://arxiv.org/abs/2406.17740"
    formula = "2 * d (d = in = out)"
    # No Toeplitz script is published; the authors' GLUE script (src/scripts/run_bert_glue.py, circulant
    # adapters) uses AdamW at 2e-3, the same family of structured vectors.
    default_lr = 2e-3
    size_option = None  # 2d parameters: no size to set
    declared_options: ClassVar[dict[str, Option]] = {
        "alpha": opt.alpha(1.0, "the scale of the update"),
        "dropout": opt.dropout(),
    }

    def __init__(self, base: nn.Module, *, alpha: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__(base)
        d = check_square(self.method, self.in_features, self.out_features)
        validate(self.declared_options, {"alpha": alpha, "dropout": dropout})
        self.alpha = float(alpha)
        self.dropout = nn.Dropout(p_drop) if (p_drop := float(dropout)) else nn.Identity()
        self.a = nn.Parameter(torch.zeros(d, device=self.param_device))  # (d,), fp32
        self.b = nn.Parameter(torch.zeros(d, device=self.param_device))  # (d,), fp32
        if not is_restoring():
            self.reset_parameters()

    @classmethod
    def num_params(cls, in_features: int, out_features: int, **_: object) -> int:
        return 2 * in_features

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.a, std=0.02)
        nn.init.zeros_(self.b)

    def fusable(self, x: Tensor) -> bool:
        """The merged-weight path applies: plain base layer, frozen, one dtype, no live dropout, ``0.75 d`` rows.

        Measured on CPU (one thread, forward + backward, time relative to the base layer alone; a
        shared machine, so +-20%): d = 384: FFT path 2.8x at 128 rows, 3.3x at 256, 3.7x at 384,
        3.8x at 512; merged path 5.1x, 4.0x, 3.2x, 2.9x. d = 768 (an earlier, slower ΔW build): FFT
        2.6x at 512 rows, 3.8x at 1024; merged 3.2x and 2.4x. (An ``O(d²)`` running-sum builder of
        ``T(b) T(a)`` was tried too: exact to rounding, but its ~30 ``d²`` memory passes made it
        1.6x slower than the FFT build at d = 384.)
        """
        live_dropout = self.training and isinstance(self.dropout, nn.Dropout)
        rows = x.numel() // max(self.in_features, 1)
        return (
            not self.stacked
            and not live_dropout
            and rows >= FUSE_ROWS_PER_FEATURE * self.in_features
            and can_fuse(x, self.weight, self.bias, self.a)
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return self.base(x)
        if self.fusable(x):
            return F.linear(x, self.weight + self.delta_weight(), self.bias)
        y = self.base(x)  # each adapter's effect is of the layer input x, so stacked ones add up
        dx = self.dropout(x)
        dx = dx.to(compute_dtype(dx, self.a))  # fp32 for half models: x T(a) may exceed fp16's range
        z = toeplitz_matmul(toeplitz_matmul(dx, self.a), self.alpha * self.b)  # x T(a) T(αb)
        return y + z.to(y.dtype)

    def delta_weight(self) -> Tensor:
        # toeplitz_matmul(X, v) = X T(v): rows of T(a) times T(αb) = (T(αb) T(a))^T, both symmetric
        return toeplitz_matmul(toeplitz(self.a), self.alpha * self.b).T  # (out, in) = (d, d)
