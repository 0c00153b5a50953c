"""SURM circulant LoRA (Sehanobish et al., NeurIPS 2024): ΔW is one circulant matrix, applied by FFT."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

import loraplex.options as opt
from loraplex.adapter import Adapter, is_restoring
from loraplex.adapters._circulant import circulant_linear
from loraplex.adapters._ops import can_fuse
from loraplex.adapters._structured import check_square, circulant, circulant_matmul
from loraplex.options import Option, validate

# The merged-weight path pays for itself from about this many rows per feature (see Circulant.fusable).
FUSE_ROWS_PER_FEATURE = 1.0


class Circulant(Adapter):
    """SURM circulant LoRA (https://arxiv.org/abs/2406.17740), as the authors' ``src/lora/circulant_lora.py``.

    ``y = W0 x + bias + alpha · C(c) dropout(x)`` with ``C(c)[i, j] = c[(i - j) mod d]`` (circulant,
    first column ``c``) and ``c = a ⊙ b`` (``product=True``, the reference's default ``use_prod``:
    an element-wise product of two generating vectors, not a product of two circulant matrices)
    or ``c = a`` (``product=False``). ``C(c) x`` is a circular convolution, ``irfft(rfft(c) ⊙
    rfft(x))``. ``delta_weight() = alpha · C(c)``, built exactly (entries of ``c``).

    Square layers only (``d = in = out``; the reference asserts it). Trainable: ``2d`` (``d`` with
    ``product=False``).

    Init, as the reference code: ``product=True``: ``a ~ N(0, 1)``, ``b = 0``, so ``ΔW = 0`` and the
    adapted model starts as the base model. The code calls ``nn.init.normal_(circulant_A)`` (std 1)
    under a comment "bert style initialization mean=0, std=.02"; we follow the code, which is what
    was run. It matters under Adam: ``b``'s steps are about ``lr`` whatever the scale of ``a``, so
    ``c = a ⊙ b`` moves ``std(a)`` times that, 50x faster with std 1 than with 0.02.
    ``product=False``: ``a = 0`` (the reference's ``init_zero=True``; its ``init_zero=False`` branch
    calls ``normal_(…, a=sqrt(5))``, which raises). Both settings keep the base layer's bias, as the
    reference's LoRA forward (``F.linear(x, W, bias=self.bias)`` in both branches); it is the SURM
    *adapter* layer whose ``use_prod=False`` branch drops its output bias (see ``adapter``,
    ``structure="circulant"``: a departure we document there).

    ``alpha`` is the reference's ``circ_alpha`` (default 1.0; its ``trainable_alpha`` variant, a
    learned scalar initialised at 0, is not offered). ``dropout`` is its ``circulant_dropout``
    (default 0), on the adapter's input.

    Speed: on a plain base layer with at least ``FUSE_ROWS_PER_FEATURE · d`` rows (and no live
    dropout, no autocast, one dtype), forward and input gradient are the base layer's own GEMMs with
    ``W0 + ΔW`` (C3A's ``circulant_linear`` node with a single ``d``-block) and only ``c``'s
    gradient costs extra, by FFT; otherwise the effect is the FFT product, in fp32 for fp16 / bf16
    models. See ``fusable`` for the measurement.

    Shapes: x (..., d) -> (..., d); a, b (d,), fp32.

    Args:
        base: the (square) layer to adapt.
        product: ``c = a ⊙ b`` (True) or ``c = a`` (False).
        alpha: the scale of ΔW.
        dropout: dropout probability on the adapter's input.

    Example:
        >>> layer = Circulant(nn.Linear(8, 8))
        >>> x = torch.randn(2, 8)
        >>> torch.equal(layer(x), layer.base(x))  # b = 0 at init
        True
        >>> Circulant.num_params(384, 384), Circulant.num_params(384, 384, product=False)
        (768, 384)
    """

    b: nn.Parameter | None
    method = "circulant"
    paper = "https://arxiv.org/abs/2406.17740"
    formula = "2 * d (d = in = out); d with product=False"
    # The authors' only training script (src/scripts/run_bert_glue.py: circulant adapters on BERT-base,
    # GLUE) uses AdamW at 2e-3 (weight decay 0.25, 6% linear warm-up); no LoRA script is published.
    default_lr = 2e-3
    size_option = None  # 2d (or d) parameters: no size to set
    declared_options: ClassVar[dict[str, Option]] = {
        "product": opt.flag(True, "the product of two circulants (2d parameters) instead of one (d)"),
        "alpha": opt.alpha(1.0, "the scale of the update"),
        "dropout": opt.dropout(),
    }

    def __init__(self, base: nn.Module, *, product: bool = True, alpha: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__(base)
        d = check_square(self.method, self.in_features, self.out_features)
        validate(self.declared_options, {"product": product, "alpha": alpha, "dropout": dropout})
        self.product, self.alpha = product, float(alpha)
        self.dropout = nn.Dropout(p_drop) if (p_drop := float(dropout)) else nn.Identity()
        self.a = nn.Parameter(torch.zeros(d, device=self.param_device))  # (d,), fp32
        self.b = nn.Parameter(torch.zeros(d, device=self.param_device)) if product else None  # (d,), fp32
        if not is_restoring():
            self.reset_parameters()

    @classmethod
    def num_params(cls, in_features: int, out_features: int, *, product: bool = True, **_: object) -> int:
        return (2 if product else 1) * in_features

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.b is not None:
            nn.init.normal_(self.a)  # std 1, as the reference code (see the class docstring)
            nn.init.zeros_(self.b)
        else:
            nn.init.zeros_(self.a)

    def generator(self) -> Tensor:
        """``alpha · c``, the first column of ΔW: (d,)."""
        c = self.a if self.b is None else self.a * self.b
        return self.alpha * c

    def fusable(self, x: Tensor) -> bool:
        """The merged-weight node applies: plain base layer, frozen, one dtype, no live dropout, enough rows.

        Measured on CPU (one thread, forward + backward, time relative to the base layer alone; a
        shared machine, so +-20%): d = 384: FFT path 1.5x at 64 rows, 1.6x at 128-384, 1.7x at 512;
        merged path 2.1x at 64, 1.9x at 128-256, 1.6x at 384-1024 (it pays the FFTs of the kernel
        gradient only, plus ``d²`` memory work per step). d = 768: FFT 1.4x, merged 1.5x at 128
        rows, 1.3x at 512-1024. Crossover near ``d`` rows.
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
        c = self.generator()
        if self.fusable(x):
            # C3A's kernel is the first row: w[k] = c[(-k) mod d].
            w = torch.cat([c[:1], c[1:].flip(0)]).view(1, 1, -1)
            return circulant_linear(x, self.weight, self.bias, w, 1.0)
        y = self.base(x)  # each adapter's effect is of the layer input x, so stacked ones add up
        return y + circulant_matmul(self.dropout(x), c).to(y.dtype)

    def delta_weight(self) -> Tensor:
        return circulant(self.generator())  # (out, in) = (d, d), exact entries of alpha · c
