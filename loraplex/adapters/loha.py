"""LoHa (LyCORIS / FedPara): the Hadamard product of two low-rank matrices, as HuggingFace PEFT's ``LoHaConfig``.

Also home of the LyCORIS-style dropouts shared with LoKr (``RANK_DROPOUT`` / ``MODULE_DROPOUT``, ``lycoris_dropout``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import loraplex.options as opt
from loraplex.adapter import Adapter, is_restoring
from loraplex.options import Option, validate

INITS = ("zeros", "kaiming")


RANK_DROPOUT = opt.Option("prob", 0.0, "LyCORIS rank dropout: drops whole rank components while training")
MODULE_DROPOUT = opt.Option("prob", 0.0, "LyCORIS module dropout: skips the whole update while training")


def lycoris_dropout(module_p: float, rank_p: float, rows: int, rescale: bool) -> tuple[bool, Tensor | None]:
    """Training-mode draws of PEFT's LoHa / LoKr layers: ``(apply the adapter, row mask or None)``.

    PEFT draws ``torch.rand(1) > module_dropout`` (skip the whole adapter otherwise), then, if the
    adapter runs and ``rank_dropout > 0``, the row mask ``torch.rand(out) > rank_dropout`` of ΔW,
    divided by its mean when ``rescale`` (always for LoHa, ``rank_dropout_scale`` for LoKr). Both
    from the global CPU generator, in that order, so that the same seed gives PEFT's outputs.
    Decisions: nothing is drawn when both probabilities are 0 (PEFT still draws the module coin);
    an all-dropped mask stays 0 where PEFT's ``0 / 0`` gives NaN.
    """
    if not (module_p or rank_p):
        return True, None
    if not bool(torch.rand(1) > module_p):  # compared in fp32, as PEFT
        return False, None
    if not rank_p:
        return True, None
    drop = (torch.rand(rows) > rank_p).float()  # (out,)
    if rescale:
        drop = drop / drop.mean().clamp_min(1.0 / rows)  # the clamp only acts on an all-zero mask
    return True, drop


def hadamard_weight(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor) -> Tensor:
    """``(w1a @ w1b) ⊙ (w2a @ w2b)``: (out, r), (r, in), (out, r), (r, in) -> (out, in)."""
    return (w1a @ w1b) * (w2a @ w2b)


def khatri_rao_factors(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor) -> tuple[Tensor, Tensor]:
    """``(P, Q)`` with ``P @ Q == hadamard_weight(w1a, w1b, w2a, w2b)``: (out, r²), (r², in).

    ``((w1a w1b) ⊙ (w2a w2b))[o, k] = Σ_ij w1a[o, i] w2a[o, j] · w1b[i, k] w2b[j, k]``: ``P`` holds the
    row-wise Kronecker products of ``w1a`` and ``w2a`` (face-splitting product), ``Q`` the column-wise
    ones of ``w1b`` and ``w2b`` (Khatri-Rao product), both in the pair order ``(i, j) -> i·r + j``.
    """
    out, r1 = w1a.shape
    r2 = w2a.shape[1]
    P = (w1a[:, :, None] * w2a[:, None, :]).reshape(out, r1 * r2)
    Q = (w1b[:, None, :] * w2b[None, :, :]).reshape(r1 * r2, w1b.shape[1])
    return P, Q


def use_khatri_rao(rows: int, d_in: int, d_out: int, r1: int, r2: int) -> bool:
    """Whether ``x Q^T P^T`` costs fewer multiply-adds than building ΔW and ``x ΔW^T``.

    Factored: ``rows·r1·r2·(in + out)`` plus ``r1·r2·(in + out)`` to build ``P`` and ``Q``; dense:
    ``rows·in·out`` plus ``(r1 + r2 + 1)·in·out`` to build ΔW. Measured on CPU (fp32, forward +
    backward, 512 rows, 2 threads, best of 25-35): the factored product takes 0.3x / 0.2x the
    dense time at r = 4 (384x384 / 384x1536), 0.6x / 0.3x at r = 8 (1536x384: 0.3x), and
    0.75-1.1x at r = 16, near the crossover ``r²·(in + out) = in·out``. So the rule follows the
    flop count.
    """
    r = r1 * r2
    return (rows + 1) * r * (d_in + d_out) < rows * d_in * d_out + (r1 + r2 + 1) * d_in * d_out


def hadamard_linear(x: Tensor, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, row_scale: Tensor | float) -> Tensor:
    """``x ((w1a w1b) ⊙ (w2a w2b))^T · row_scale`` in the factors' dtype: (..., in) -> (..., out).

    ``row_scale`` is a scalar or one factor per output row (``(out,)``, the rank-dropout mask times
    the scale); it is folded into the smallest matrix. The cheaper exact order is picked by
    ``use_khatri_rao``.
    """
    d_out, r1 = w1a.shape
    d_in, r2 = w1b.shape[1], w2a.shape[1]
    x = x.to(w1a.dtype)
    rows = x.numel() // d_in if d_in else 0
    scale = row_scale[:, None] if isinstance(row_scale, Tensor) else row_scale
    if use_khatri_rao(rows, d_in, d_out, r1, r2):
        P, Q = khatri_rao_factors(w1a, w1b, w2a, w2b)
        return F.linear(F.linear(x, Q), P * scale)
    return F.linear(x, hadamard_weight(w1a, w1b, w2a, w2b) * scale)


class LoHa(Adapter):
    """LoHa: low-rank Hadamard product (FedPara, https://arxiv.org/abs/2108.06098; LyCORIS), as PEFT.

    ``y = W0 x + b + s · ((w1_a w1_b) ⊙ (w2_a w2_b)) x``, ``s = alpha / rank``;
    ``delta_weight() = s · (w1_a w1_b) ⊙ (w2_a w2_b)``, of rank at most ``rank²``.

    Computation: PEFT builds ΔW (``in·out``) every step. Here the forward picks, by multiply-add
    count, between that and the exact factored form ``ΔW = P Q`` with ``P = w1_a • w2_a``
    (out, r²) and ``Q = w1_b ⊙_KR w2_b`` (r², in), see ``khatri_rao_factors``: for the 512-row
    batches of MiniLM (384x384, 384x1536) the factored form is used up to r = 14 and r = 18, and
    measured 1.7x (384x384) and 3.4x (384x1536) faster than building ΔW at r = 8 (``use_khatri_rao``).

    Inits (PEFT's ``init_weights``): ``"zeros"`` (PEFT's ``True``, the default: ``w1_a``, ``w1_b``,
    ``w2_a`` as ``nn.Linear``'s weight, ``kaiming_uniform(a=sqrt(5))``, and ``w2_b = 0``: the base
    model at init), ``"kaiming"`` (PEFT's ``False``: all four kaiming, not the base model).

    Dropouts, as PEFT, in training mode only: ``module_dropout`` skips the whole adapter for a
    forward with that probability; ``rank_dropout`` zeroes each output row of ΔW with that
    probability and divides the kept ones by the kept fraction. Both draw from the global CPU
    generator in PEFT's order, so that a seeded forward equals PEFT's (``lycoris_dropout``).
    Defaults (``rank=8``, ``alpha=8``, no dropout) are PEFT's ``LoHaConfig`` defaults.

    Shapes: x (..., in) -> (..., out); w1_a, w2_a (out, r); w1_b, w2_b (r, in); all fp32.

    Convolutions (``nn.Conv1d`` / ``nn.Conv2d``, ``groups=1``), as PEFT's LoHa without
    ``use_effective_conv2d``: ``in = in_channels · prod(kernel)``, the (out, in) ΔW is reshaped to
    ``(out, in_channels, *kernel)`` (``delta_weight()``) and the effect is ``conv(x, ΔW)`` with the
    base's stride, padding, dilation and padding mode (row dropout on output channels).

    Args:
        base: the layer to adapt.
        rank: inner dimension r of both low-rank factors.
        alpha: scale numerator, ``s = alpha / rank``.
        rank_dropout: probability of dropping an output row of ΔW in training.
        module_dropout: probability of skipping the adapter in a training forward.
        init: ``"zeros"`` or ``"kaiming"``.

    Example:
        >>> layer = LoHa(nn.Linear(16, 32), rank=4)
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 32])
        >>> LoHa.num_params(16, 32, rank=4)
        384
    """

    method = "loha"
    fit_structure = "hadamard"  # fitted to a target by loraplex.decompose.fit_adapter
    paper = "https://arxiv.org/abs/2108.06098"
    formula = "2 * rank * (in + out)"
    # Unmeasured. At init an Adam step of size lr moves ΔW entries by about 0.016·lr here (r = 8,
    # in = 384: w2_b moves, scaled by |w1_a w1_b| ~ 1/sqrt(9·in)) against ~0.17·lr for LoRA r = 8,
    # alpha = 16; LyCORIS advises LoHa learning rates at or above LoRA's. 5e-3 is 5x LoRA's 1e-3.
    default_lr = 5e-3
    size_option = "rank"
    declared_options: ClassVar[dict[str, Option]] = {
        "rank": opt.rank(8, "the rank of each Hadamard factor"),
        "alpha": opt.alpha(8.0),
        "rank_dropout": RANK_DROPOUT,
        "module_dropout": MODULE_DROPOUT,
        "init": opt.choice("zeros", INITS, "how the factors start (zeros: w1_b = 0)"),
    }
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv")

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int = 8,
        alpha: float = 8.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        init: str = "zeros",
    ) -> None:
        super().__init__(base)
        opts = {"rank": rank, "alpha": alpha, "rank_dropout": rank_dropout, "module_dropout": module_dropout}
        validate(self.declared_options, opts | {"init": init})
        self.rank, self.alpha, self.init = rank, float(alpha), init
        self.rank_dropout, self.module_dropout = float(rank_dropout), float(module_dropout)
        self.scale = self.alpha / rank
        d_in, d_out, device = self.in_features, self.out_features, self.param_device
        self.w1_a = nn.Parameter(torch.zeros(d_out, rank, device=device))  # (out, r), fp32
        self.w1_b = nn.Parameter(torch.zeros(rank, d_in, device=device))  # (r, in)
        self.w2_a = nn.Parameter(torch.zeros(d_out, rank, device=device))  # (out, r)
        self.w2_b = nn.Parameter(torch.zeros(rank, d_in, device=device))  # (r, in)
        if not is_restoring():
            self.reset_parameters()

    @classmethod
    def num_params(cls, in_features: int, out_features: int, *, rank: int = 8, **_: object) -> int:
        return 2 * rank * (in_features + out_features)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in (self.w1_a, self.w1_b, self.w2_a, self.w2_b):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.init == "zeros":
            nn.init.zeros_(self.w2_b)

    peft_type = "LOHA"
    peft_keys: ClassVar[tuple[str, ...]] = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    peft_patterns: ClassVar[dict[str, str]] = {"r": "rank_pattern", "alpha": "alpha_pattern"}

    def to_peft(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        if self.transposed:
            raise ValueError("PEFT's LoHa adapts nn.Linear only, not transformers' Conv1D")
        if self.kind == "conv" and self.root.padding_mode != "zeros":
            raise ValueError(f"PEFT's LoHa ignores padding_mode={self.root.padding_mode!r}; only 'zeros' exports")
        config = {
            "r": self.rank,
            "alpha": self.alpha,
            "rank_dropout": self.rank_dropout,
            "module_dropout": self.module_dropout,
            "init_weights": self.init == "zeros",
            "use_effective_conv2d": False,
        }
        tensors = {"hada_w1_a": self.w1_a, "hada_w1_b": self.w1_b, "hada_w2_a": self.w2_a, "hada_w2_b": self.w2_b}
        return config, {k: v.detach() for k, v in tensors.items()}

    @classmethod
    def peft_options(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
        if any(k in tensors for k in ("hada_t1", "hada_t2")):
            raise ValueError("PEFT LoHa tensors hada_t1 / hada_t2 are for convolutions, which loraplex does not adapt")
        w1_b = tensors.get("hada_w1_b")
        if w1_b is None or w1_b.ndim != 2:
            raise ValueError("PEFT tensor 'hada_w1_b' is missing or not a matrix")
        return {
            "rank": w1_b.shape[0],
            "alpha": float(config.get("alpha", 8)),
            "rank_dropout": float(config.get("rank_dropout", 0.0)),
            "module_dropout": float(config.get("module_dropout", 0.0)),
            "init": "zeros" if config.get("init_weights", True) else "kaiming",
        }

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # each adapter's effect is of the layer input x, so stacked ones add up
        if not self.active:
            return y
        row_scale: Tensor | float = self.scale
        if self.training:
            keep, mask = lycoris_dropout(self.module_dropout, self.rank_dropout, self.out_features, rescale=True)
            if not keep:
                return y
            if mask is not None:
                row_scale = mask.to(device=self.w1_a.device, dtype=self.w1_a.dtype) * self.scale
        if self.kind == "conv":
            scale = row_scale[:, None] if isinstance(row_scale, Tensor) else row_scale
            delta = hadamard_weight(self.w1_a, self.w1_b, self.w2_a, self.w2_b) * scale  # (out, in)
            return y + self.apply_weight(x, self.layout(delta)).to(y.dtype)
        effect = hadamard_linear(x, self.w1_a, self.w1_b, self.w2_a, self.w2_b, row_scale)
        return y + effect.to(y.dtype)

    def delta_weight(self) -> Tensor:
        return self.layout(self.scale * hadamard_weight(self.w1_a, self.w1_b, self.w2_a, self.w2_b))  # (out, in)
