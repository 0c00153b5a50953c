"""LoKr (LyCORIS): the Kronecker product of a small and a (low-rank) large factor, as PEFT's ``LoKrConfig``."""
# size: PEFT's factorization and Kronecker shapes, three inits, LyCORIS dropouts, the conv form

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

import loraplex.options as opt
from loraplex.adapter import Adapter, is_restoring
from loraplex.adapters._kron import kron_linear
from loraplex.adapters.loha import MODULE_DROPOUT, RANK_DROPOUT, lycoris_dropout
from loraplex.options import Option, validate

INITS = ("zeros", "kaiming", "lycoris")
# Our init names -> PEFT's LoKrConfig.init_weights.
PEFT_INITS: dict[str, bool | str] = {"zeros": True, "kaiming": False, "lycoris": "lycoris"}


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m · n = dimension``, as PEFT's / LyCORIS' ``factorization``.

    A positive ``factor`` that divides ``dimension`` gives ``(factor, dimension / factor)``.
    Otherwise ``m`` grows through the divisors of ``dimension`` while ``m < n`` and ``m <= factor``
    (``factor = -1``: no limit), ending near the square root; the result has ``m <= n``.

    Example:
        >>> factorization(256), factorization(128), factorization(127), factorization(128, 4)
        ((16, 16), (8, 16), (1, 127), (4, 32))
        >>> factorization(384), factorization(1536), factorization(12, 6)
        ((16, 24), (32, 48), (6, 2))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n  # never updated: PEFT's loop only stops on a too-large m
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@dataclass(frozen=True)
class KronShapes:
    """LoKr's factor sizes: ``out = out_l · out_k``, ``in = in_m · in_n``; w1 (out_l, in_m), w2 (out_k, in_n).

    ``full_w1`` / ``full_w2``: the factor is a plain matrix, else the product of (rows, r) and
    (r, cols) factors. As PEFT: ``w2`` is factored when ``rank < max(out_k, in_n) / 2``, ``w1``
    only with ``decompose_both`` and ``rank < max(out_l, in_m) / 2``.

    Convolutions (PEFT without ``use_effective_conv2d``): ``in_channels = in_m · c`` is split, not
    ``in_channels · kernel``, and ``in_n = c · kernel`` (w2 holds the kernel); whether w2 is factored
    is decided on ``max(out_k, c)``, as PEFT.
    """

    out_l: int
    out_k: int
    in_m: int
    in_n: int
    full_w1: bool
    full_w2: bool

    @classmethod
    def of(
        cls, d_in: int, d_out: int, rank: int, decompose_both: bool, decompose_factor: int, kernel: int = 1
    ) -> KronShapes:
        """Shapes for ``d_in = in_channels · kernel`` (``kernel = 1``: a linear layer)."""
        in_m, in_n = factorization(d_in // kernel, decompose_factor)
        out_l, out_k = factorization(d_out, decompose_factor)
        full_w1 = not (decompose_both and rank < max(out_l, in_m) / 2)
        full_w2 = not rank < max(out_k, in_n) / 2
        return cls(out_l, out_k, in_m, in_n * kernel, full_w1, full_w2)

    def num_params(self, rank: int) -> int:
        w1 = self.out_l * self.in_m if self.full_w1 else rank * (self.out_l + self.in_m)
        w2 = self.out_k * self.in_n if self.full_w2 else rank * (self.out_k + self.in_n)
        return w1 + w2


DECOMPOSE_FACTOR = Option(
    "int", -1, "the size of a factor (-1: near the square root)", special=(-1,),
    rule="-1 (near the square root) or an integer >= 1",
)  # fmt: skip


class LoKr(Adapter):
    """LoKr: low-rank Kronecker product (https://arxiv.org/abs/2309.14859, LyCORIS), as HuggingFace PEFT.

    ``y = W0 x + b + s · kron(w1, w2) x``, ``s = alpha / rank``; ``delta_weight() = s · kron(w1, w2)``.
    ``out = out_l · out_k`` and ``in = in_m · in_n`` split by ``factorization(·, decompose_factor)``
    (near the square root by default: 384 = 16 · 24, 1536 = 32 · 48); ``w1`` (out_l, in_m) is the
    small factor, ``w2`` (out_k, in_n) the large one. ``w2 = w2_a w2_b`` (rank r) when
    ``rank < max(out_k, in_n) / 2``, else a plain matrix; ``w1 = w1_a w1_b`` likewise only with
    ``decompose_both`` (see ``KronShapes``). So ``rank`` may only set the scale, e.g. for
    384x384 any ``rank >= 12`` gives full 16x16 and 24x24 factors.

    The forward never builds the (out, in) product: ``kron_linear`` applies ``w1`` and ``w2`` to
    ``x`` reshaped to (in_m, in_n) (PEFT builds ΔW every step).

    Inits (PEFT's ``init_weights``): ``"zeros"`` (``True``, the default: ``w1 = 0`` (or
    ``w1_a = 0``), everything else ``kaiming_uniform(a=sqrt(5))``: the base model at init),
    ``"lycoris"`` (``w2 = 0`` (or ``w2_b = 0``), the rest kaiming: the base model at init, as
    LyCORIS), ``"kaiming"`` (``False``: all kaiming; not the base model).

    Dropouts, as PEFT, in training mode only (``loha.lycoris_dropout``): ``module_dropout`` skips the
    adapter for a forward; ``rank_dropout`` zeroes output rows of ΔW, divided by the kept fraction
    only with ``rank_dropout_scale`` (PEFT's default False). Defaults are PEFT's ``LoKrConfig``:
    ``rank=8``, ``alpha=8``, ``decompose_both=False``, ``decompose_factor=-1``, no dropout.
    PEFT's convolution options (``use_effective_conv2d``, ``lokr_t2``) do not apply to linears.

    Convolutions (``nn.Conv1d`` / ``nn.Conv2d``, ``groups=1``), as PEFT without
    ``use_effective_conv2d``: ``in_channels`` is factored (``KronShapes.of(..., kernel=)``), w2 is
    ``(out_k, c · prod(kernel))``, ``delta_weight() = s · kron(w1, w2)`` reshaped to
    ``(out, in_channels, *kernel)`` and the effect is ``conv(x, ΔW)`` with the base's geometry.
    ``num_params(..., kernel=prod(kernel_size))`` counts them. Decision: PEFT builds a Conv1d's
    ΔW from a full 3-D ``lokr_w2`` by ``torch.kron`` of a 2-D and a 3-D tensor, which is not the
    Kronecker product of the matrices (it scrambles the weight); the correct product is used here
    and ``to_peft`` refuses that one case (a factored w2 exports).

    Shapes: x (..., in) -> (..., out); w1 (out_l, in_m) or w1_a (out_l, r), w1_b (r, in_m);
    w2 (out_k, in_n) or w2_a (out_k, r), w2_b (r, in_n); all fp32.

    Args:
        base: the layer to adapt.
        rank: rank of the factored Kronecker factors; ``s = alpha / rank`` either way.
        alpha: scale numerator.
        rank_dropout: probability of dropping an output row of ΔW in training.
        module_dropout: probability of skipping the adapter in a training forward.
        rank_dropout_scale: divide the rank-dropout mask by its mean.
        decompose_both: also factor ``w1`` (when ``rank < max(out_l, in_m) / 2``).
        decompose_factor: ``-1`` or the preferred size of the small factor (see ``factorization``).
        init: ``"zeros"``, ``"lycoris"`` or ``"kaiming"``.

    Example:
        >>> layer = LoKr(nn.Linear(384, 384))
        >>> layer.w1.shape, layer.w2_a.shape, layer.w2_b.shape
        (torch.Size([16, 16]), torch.Size([24, 8]), torch.Size([8, 24]))
        >>> layer(torch.randn(2, 384)).shape, LoKr.num_params(384, 384)
        (torch.Size([2, 384]), 640)
    """

    w1: nn.Parameter | None
    w1_a: nn.Parameter | None
    w1_b: nn.Parameter | None
    w2: nn.Parameter | None
    w2_a: nn.Parameter | None
    w2_b: nn.Parameter | None
    method = "lokr"
    fit_structure = "kronecker"  # fitted to a target by loraplex.decompose.fit_adapter
    paper = "https://arxiv.org/abs/2309.14859"
    formula = "w1: out_l * in_m (or rank * (out_l + in_m)) + w2: out_k * in_n (or rank * (out_k + in_n))"
    # Unmeasured. At init an Adam step of size lr moves ΔW entries by about 0.07·lr (384x384:
    # w1 moves, times |w2| ~ 0.07) against ~0.17·lr for LoRA r = 8, alpha = 16, so LoRA's 1e-3
    # maps to ~2.5e-3; LyCORIS advises LoKr learning rates above LoRA's.
    default_lr = 3e-3
    size_option = "rank"  # sets the count while a factor is factored (rank < max(rows, cols) / 2)
    declared_options: ClassVar[dict[str, Option]] = {
        "rank": opt.rank(8, "the rank of the factored Kronecker factor"),
        "alpha": opt.alpha(8.0),
        "rank_dropout": RANK_DROPOUT,
        "module_dropout": MODULE_DROPOUT,
        "rank_dropout_scale": opt.flag(False, "rescale the kept ranks after rank dropout"),
        "decompose_both": opt.flag(False, "factor the small Kronecker factor too"),
        "decompose_factor": DECOMPOSE_FACTOR,
        "init": opt.choice("zeros", INITS, "how the factors start"),
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
        rank_dropout_scale: bool = False,
        decompose_both: bool = False,
        decompose_factor: int = -1,
        init: str = "zeros",
    ) -> None:
        super().__init__(base)
        opts = {"rank": rank, "alpha": alpha, "rank_dropout": rank_dropout, "module_dropout": module_dropout}
        flags = {"rank_dropout_scale": rank_dropout_scale, "decompose_both": decompose_both}
        validate(self.declared_options, opts | flags | {"decompose_factor": decompose_factor, "init": init})
        self.rank, self.alpha = rank, float(alpha)
        self.rank_dropout, self.module_dropout = float(rank_dropout), float(module_dropout)
        self.rank_dropout_scale, self.decompose_both = rank_dropout_scale, decompose_both
        self.decompose_factor, self.init = decompose_factor, init
        self.scale = self.alpha / rank
        kernel = math.prod(self.root_weight.shape[2:]) if self.kind == "conv" else 1
        self.shapes = sh = KronShapes.of(
            self.in_features, self.out_features, rank, decompose_both, decompose_factor, kernel
        )
        self._factor("w1", sh.out_l, sh.in_m, sh.full_w1)
        self._factor("w2", sh.out_k, sh.in_n, sh.full_w2)
        if not is_restoring():
            self.reset_parameters()

    def _factor(self, name: str, rows: int, cols: int, full: bool) -> None:
        """Register ``name`` (rows, cols), or ``name_a`` (rows, r) and ``name_b`` (r, cols); fp32, zero."""

        def new(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(shape, device=self.param_device))

        self.register_parameter(name, new(rows, cols) if full else None)
        self.register_parameter(f"{name}_a", None if full else new(rows, self.rank))
        self.register_parameter(f"{name}_b", None if full else new(self.rank, cols))

    @classmethod
    def num_params(
        cls,
        in_features: int,
        out_features: int,
        *,
        rank: int = 8,
        decompose_both: bool = False,
        decompose_factor: int = -1,
        kernel: int = 1,
        **_: object,
    ) -> int:
        """Trainable parameters; ``kernel = prod(kernel_size)`` for a convolution (``in_features`` includes it)."""
        shapes = KronShapes.of(in_features, out_features, rank, decompose_both, decompose_factor, kernel)
        return shapes.num_params(rank)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for _, p in self.own_parameters():
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        if self.init == "zeros":  # PEFT's reset_adapter_parameters
            nn.init.zeros_(self.w1 if self.w1 is not None else self.w1_a)  # type: ignore[arg-type]
        elif self.init == "lycoris":  # PEFT's reset_adapter_parameters_lycoris_way
            nn.init.zeros_(self.w2 if self.w2 is not None else self.w2_b)  # type: ignore[arg-type]

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(w1, w2)`` as matrices: (out_l, in_m), (out_k, in_n)."""
        w1 = self.w1 if self.w1 is not None else self.w1_a @ self.w1_b  # type: ignore[operator]
        w2 = self.w2 if self.w2 is not None else self.w2_a @ self.w2_b  # type: ignore[operator]
        return w1, w2

    peft_type = "LOKR"
    # The first key marks adapted layers in PEFT checkpoints: ``lokr_w1`` is there unless
    # ``decompose_both`` factors w1 (see the report on peft_io's single marker key).
    peft_keys: ClassVar[tuple[str, ...]] = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    peft_patterns: ClassVar[dict[str, str]] = {"r": "rank_pattern", "alpha": "alpha_pattern"}

    def to_peft(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        if self.transposed:
            raise ValueError("PEFT's LoKr adapts nn.Linear only, not transformers' Conv1D")
        config = {
            "r": self.rank,
            "alpha": self.alpha,
            "rank_dropout": self.rank_dropout,
            "module_dropout": self.module_dropout,
            "rank_dropout_scale": self.rank_dropout_scale,
            "decompose_both": self.decompose_both,
            "decompose_factor": self.decompose_factor,
            "init_weights": PEFT_INITS[self.init],
            "use_effective_conv2d": False,
        }
        tensors = {f"lokr_{name}": p.detach() for name, p in self.own_parameters()}
        if self.kind == "conv":
            root = self.root
            if root.padding_mode != "zeros":
                raise ValueError(f"PEFT's LoKr ignores padding_mode={root.padding_mode!r}; only 'zeros' exports")
            shape = self.root_weight.shape
            if self.w2 is not None:  # PEFT keeps a full w2 as (out_k, c, *kernel)
                if len(shape) == 3:
                    raise ValueError(
                        "PEFT builds a Conv1d LoKr's ΔW from a full 3-D lokr_w2 incorrectly (torch.kron of a "
                        "2-D and a 3-D tensor); use a rank below max(out_k, in_n) / 2 to export it"
                    )
                tensors["lokr_w2"] = tensors["lokr_w2"].view(self.shapes.out_k, -1, *shape[2:])
        return config, tensors

    @classmethod
    def peft_options(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
        if "lokr_t2" in tensors:
            raise ValueError("PEFT LoKr tensor lokr_t2 is for convolutions, which loraplex does not adapt")
        init = config.get("init_weights", True)
        names = {repr(v): k for k, v in PEFT_INITS.items()}
        if repr(init) not in names:
            raise ValueError(f"PEFT init_weights={init!r} is not one of {', '.join(sorted(names))}")
        return {
            "rank": int(config.get("r", 8)),
            "alpha": float(config.get("alpha", 8)),
            "rank_dropout": float(config.get("rank_dropout", 0.0)),
            "module_dropout": float(config.get("module_dropout", 0.0)),
            "rank_dropout_scale": bool(config.get("rank_dropout_scale", False)),
            "decompose_both": bool(config.get("decompose_both", False)),
            "decompose_factor": int(config.get("decompose_factor", -1)),
            "init": names[repr(init)],
        }

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # each adapter's effect is of the layer input x, so stacked ones add up
        if not self.active:
            return y
        mask = None
        if self.training:
            keep, mask = lycoris_dropout(
                self.module_dropout, self.rank_dropout, self.out_features, self.rank_dropout_scale
            )
            if not keep:
                return y
        w1, w2 = self.factors()
        if self.kind == "conv":
            delta = torch.kron(w1 * self.scale, w2)  # (out, in)
            if mask is not None:
                delta = delta * mask.to(device=delta.device, dtype=delta.dtype)[:, None]
            return y + self.apply_weight(x, self.layout(delta)).to(y.dtype)
        effect = kron_linear(x.to(w1.dtype), w1 * self.scale, w2)  # (..., out), the scale on the small factor
        if mask is not None:
            effect = effect * mask.to(device=effect.device, dtype=effect.dtype)
        return y + effect.to(y.dtype)

    def delta_weight(self) -> Tensor:
        w1, w2 = self.factors()
        return self.layout(self.scale * torch.kron(w1, w2))  # (out, in); the layer's layout (Adapter.layout)
