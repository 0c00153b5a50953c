"""C3A (Chen et al., ACL 2025 Findings): block-circular convolution adaptation, computed by FFT."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

import loraplex.options as opt
from loraplex.adapter import Adapter, is_restoring
from loraplex.adapters._circulant import block_circulant_matmul, circulant, circulant_linear
from loraplex.adapters._ops import can_fuse
from loraplex.options import Option, validate

INITS = ("xavier", "zeros", "kaiming", "gaussian")
# Our init names -> PEFT's C3AConfig.init_weights (PEFT's False is xavier too).
PEFT_INITS: dict[str, str | bool] = {
    "xavier": "xavier_uniform",
    "zeros": True,
    "kaiming": "kaiming_uniform",
    "gaussian": "gaussian",
}


def common_divisors(a: int, b: int, *, head: int = 6, tail: int = 3) -> str:
    """The common divisors of ``a`` and ``b`` as text, the middle elided when there are many."""
    g = math.gcd(a, b)
    found = [str(d) for d in range(1, g + 1) if g % d == 0]
    return ", ".join(found if len(found) <= head + tail else [*found[:head], "...", *found[-tail:]])


class C3A(Adapter):
    """C3A: Circular Convolution Adaptation (https://arxiv.org/abs/2407.19342).

    ``y = W0 x + b + C(w) x / d_in``, with ``C(w)`` block-circulant: block ``(i, j)`` is the
    circulant matrix of the kernel row ``w[i, j]``, ``C_ij[r, c] = w[i, j, (c - r) mod b]``, so
    ``C(w) x`` is a sum of circular cross-correlations, computed with real FFTs
    (``_circulant.py``). ``delta_weight() = C(w) / d_in``. The ``1 / d_in`` factor is PEFT's (the
    paper's Algorithm 1 has none), kept so that checkpoints convert both ways.

    Inits (PEFT's ``init_weights``): ``"xavier"`` (the default, as PEFT: ``U(±sqrt(6 / (d_in +
    d_out)))``; the adapted model is *not* the base model at init), ``"zeros"`` (PEFT's ``True``:
    the base model at init), ``"kaiming"`` (``U(±1 / sqrt(d_in))``), ``"gaussian"`` (``N(0, 1)``).
    The paper's ablation finds them within noise of each other.

    **Training does not match PEFT** (our decision: keep the correct gradient; issue 18). PEFT 0.21.2's
    C3A input gradient is wrong: its ``BlockCircularConvolution.backward`` returns an x-gradient that
    is not dense autograd's (relative error 0.46 on a 12 -> 20 layer with b = 4;
    ``torch.autograd.gradcheck`` fails on it; at ``b <= 2``, whose blocks are symmetric, it agrees to
    1e-7: tests/test_peft_parity.py), while its outputs, kernel gradient and ``ΔW`` are right.
    Ours is the gradient of ``x (W0 + ΔW)^T`` (pinned against dense autograd and by ``gradcheck`` in
    ``tests/test_c3a.py``). Outputs, ``ΔW`` and checkpoints match PEFT both ways, but every gradient
    that flows back through a C3A layer (to the layers and adapters below it) differs, so a run trained
    here does not follow a PEFT run.

    Speed: on a plain fp32 layer with enough rows, forward and input gradient are the base
    layer's own GEMMs with ``W0 + ΔW``, and only the kernel gradient costs extra (by FFT); stacked
    adapters, fp16 / bf16 models and small inputs take the FFT path for the whole effect, in fp32.

    Shapes: x (..., d_in) -> (..., d_out); kernel (d_out / b, d_in / b, b), fp32.

    Args:
        base: the layer to adapt.
        block_size: the circulant block size b; must divide d_in and d_out.
        init: one of ``"xavier"``, ``"zeros"``, ``"kaiming"``, ``"gaussian"``.

    Example:
        >>> layer = C3A(nn.Linear(16, 32), block_size=8)
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 32])
        >>> layer.kernel.shape
        torch.Size([4, 2, 8])
    """

    method = "c3a"
    paper = "https://arxiv.org/abs/2407.19342"
    formula = "in * out / block_size"
    # PEFT's C3A docs: a learning rate about 100x LoRA's (around 1e-1); the paper's GLUE runs use
    # 5e-2..3e-1 with AdamW.
    default_lr = 1e-1
    size_option = "block_size"
    declared_options: ClassVar[dict[str, Option]] = {
        "block_size": Option("int", 256, "the circulant block size b (divides in and out)", size=True),
        "init": opt.choice("xavier", INITS, "how the kernels start"),
    }

    def __init__(self, base: nn.Module, *, block_size: int = 256, init: str = "xavier") -> None:
        super().__init__(base)
        validate(self.declared_options, {"block_size": block_size, "init": init})
        b = block_size
        if self.in_features % b or self.out_features % b:
            raise ValueError(
                f"block_size={b} must divide in_features={self.in_features} and "
                f"out_features={self.out_features}; common divisors: "
                f"{common_divisors(self.in_features, self.out_features)}"
            )
        self.block_size, self.init = b, init
        self.scale = 1.0 / self.in_features
        shape = (self.out_features // b, self.in_features // b, b)
        self.kernel = nn.Parameter(torch.zeros(shape, device=self.param_device))  # (m, n, b), fp32
        if not is_restoring():
            self.reset_parameters()

    @classmethod
    def inits(cls) -> tuple[str, ...]:
        return INITS

    @classmethod
    def num_params(cls, in_features: int, out_features: int, *, block_size: int = 256, **_: object) -> int:
        return in_features * out_features // block_size

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d_in, d_out = self.in_features, self.out_features
        if self.init == "zeros":
            nn.init.zeros_(self.kernel)
        elif self.init == "gaussian":
            nn.init.normal_(self.kernel)
        elif self.init == "kaiming":
            bound = 1.0 / math.sqrt(d_in)
            nn.init.uniform_(self.kernel, -bound, bound)
        else:  # xavier_uniform over the layer's (d_in, d_out), as PEFT, not the kernel's own fans
            bound = math.sqrt(3.0) * math.sqrt(2.0 / (d_in + d_out))
            nn.init.uniform_(self.kernel, -bound, bound)

    peft_type = "C3A"
    peft_keys: ClassVar[tuple[str, ...]] = ("c3a_kernel",)
    peft_patterns: ClassVar[dict[str, str]] = {"block_size": "block_size_pattern"}

    def to_peft(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        if self.transposed:
            raise ValueError("PEFT's C3A adapts only nn.Linear layers, not transformers' Conv1D")
        config = {"block_size": self.block_size, "init_weights": PEFT_INITS[self.init]}
        return config, {"c3a_kernel": self.kernel.detach()}

    @classmethod
    def peft_options(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
        kernel = tensors.get("c3a_kernel")
        if kernel is None or kernel.ndim != 3:
            raise ValueError("PEFT tensor 'c3a_kernel' is missing or not of shape (out/b, in/b, b)")
        init = config.get("init_weights", "xavier_uniform")
        names = {repr(v): k for k, v in PEFT_INITS.items()} | {"False": "xavier"}
        if repr(init) not in names:
            known = ", ".join(sorted(names))
            raise ValueError(f"PEFT init_weights={init!r} is not one of {known}")
        # The kernel's shape is the truth (PEFT resolved block_size_pattern when it saved it).
        return {"block_size": kernel.shape[-1], "init": names[repr(init)]}

    def fusable(self, x: Tensor) -> bool:
        """The merged-weight node applies: plain fp32 base layer, and at least 4·b rows.

        Below 4·b rows, building ``W0 + ΔW`` (``in·out`` memory work, twice per step) costs more
        than the FFTs it saves (crossover measured on CPU between 64 and 256 rows for 384 -> 384,
        b = 64, and above 1024 rows for 4096 -> 4096, b = 256).
        """
        rows = x.numel() // self.in_features
        return not self.stacked and rows >= 4 * self.block_size and can_fuse(x, self.weight, self.bias, self.kernel)

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return self.base(x)
        if self.fusable(x):
            return circulant_linear(x, self.weight, self.bias, self.kernel, self.scale)
        y = self.base(x)  # each adapter's effect is of the layer input x, so stacked ones add up
        return y + block_circulant_matmul(x, self.kernel, self.scale).to(y.dtype)

    def delta_weight(self) -> Tensor:
        return circulant(self.kernel) / self.in_features  # (out, in), exact entries of the kernel
