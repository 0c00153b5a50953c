"""SingLoRA (Bensaïd et al., 2025): one low-rank matrix, a symmetric update, and a ramp over optimizer steps."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import loraplex.options as opt
from loraplex.adapter import Adapter, is_restoring
from loraplex.adapters._ops import can_fuse, lowrank_linear
from loraplex.adapters.lora import lora_scale
from loraplex.options import Option, validate

# Both public implementations (kyegomez/SingLoRA and PEFT-SingLoRA, which kyegomez's labels "T parameter
# from the paper") ramp over 1000 steps; the paper's own default was not found (methods.md section 3).
RAMP_STEPS = 1000


def ramp(step: int, ramp_steps: int) -> float:
    """``u(t) = min(t / T, 1)``; ``T = 0`` means no ramp (``u = 1`` from the first step)."""
    return 1.0 if ramp_steps == 0 else min(step / ramp_steps, 1.0)


class SingLoRA(Adapter):
    """SingLoRA: Low Rank Adaptation Using a Single Matrix (https://arxiv.org/abs/2507.05566).

    ``ΔW = s · u(t) · A[:out] A[:in]^T`` with one matrix ``A`` of shape ``(max(in, out), r)``,
    ``s = alpha / rank`` (``alpha / sqrt(rank)`` with ``rslora``) and the ramp
    ``u(t) = min(t / T, 1)``. For a square layer this is ``s u(t) A A^T``: symmetric positive
    semi-definite, a real restriction against LoRA's ``B A``. For a rectangular layer it is the
    paper's truncation ``(A A^T)[:out, :in]`` (the form both public implementations reduce to).

    The step ``t`` counts **optimizer steps**, not forward calls: it advances only through
    ``loraplex.advance(model)`` (call it once after each ``optimizer.step()``) or
    ``loraplex.track_steps(model, optimizer)`` (a post-step hook that does it), so gradient
    accumulation over any number of micro-batches moves the ramp by one. ``loraplex.finetune``
    does this. PEFT-SingLoRA instead counted training-mode forwards, which ramps ``k`` times too
    fast under ``k``-step accumulation. The step is a saved buffer: a reloaded adapter resumes its
    ramp. At ``t = 0`` the update is exactly zero, so the adapted model starts as the base model
    even though ``A`` is not zero; ``merge`` folds in the update at the current ``u(t)``.

    Inits: ``"kaiming"`` (``kaiming_uniform_(a=sqrt(5))`` on the ``(max(in, out), r)`` matrix,
    i.e. ``U(±1/sqrt(r))``, as both public implementations) or ``"gaussian"`` (``N(0, 1/r²)``, as
    PEFT-SingLoRA's ``"gaussian"``).

    Speed: the forward is LoRA's fused node with ``A[:in]^T`` and ``A[:out]`` as its two factors
    (views of one parameter, whose gradients autograd sums).

    Shapes: x (..., in) -> (..., out); A (max(in, out), r), fp32.

    Args:
        base: the layer to adapt.
        rank: the number of columns r of A.
        alpha: scale numerator.
        ramp_steps: T, the optimizer steps over which ``u`` rises from 0 to 1 (0: no ramp).
        dropout: dropout probability on the adapter's input.
        rslora: use the rank-stabilised scale ``alpha / sqrt(rank)``.
        init: ``"kaiming"`` or ``"gaussian"``.

    Example:
        >>> layer = SingLoRA(nn.Linear(16, 32), rank=4, ramp_steps=10)
        >>> x = torch.randn(2, 16)
        >>> torch.equal(layer(x), layer.base(x))  # u(0) = 0
        True
        >>> layer.advance(5); layer.u
        0.5
    """

    step: Tensor
    method = "singlora"
    paper = "https://arxiv.org/abs/2507.05566"
    formula = "rank * max(in, out)"
    default_lr = 1e-3  # LoRA's: the paper compares at LoRA's learning rates
    size_option = "rank"
    declared_options: ClassVar[dict[str, Option]] = {
        "rank": opt.rank(8),
        "alpha": opt.alpha(8.0),
        "ramp_steps": Option("int", RAMP_STEPS, "steps over which u ramps from 0 to 1 (0: no ramp)", low=0),
        "dropout": opt.dropout(),
        "rslora": opt.flag(False, "scale by alpha / sqrt(rank) instead of alpha / rank"),
        "init": opt.choice("kaiming", ("kaiming", "gaussian"), "how A starts"),
    }

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int = 8,
        alpha: float = 8.0,
        ramp_steps: int = RAMP_STEPS,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "kaiming",
    ) -> None:
        super().__init__(base)
        opts = {"rank": rank, "alpha": alpha, "ramp_steps": ramp_steps, "dropout": dropout, "rslora": rslora}
        validate(self.declared_options, opts | {"init": init})
        self.ramp_steps = ramp_steps
        self.rank, self.scale = rank, lora_scale(rank, alpha, rslora)
        self.init = init
        self.dropout = nn.Dropout(p_drop) if (p_drop := float(dropout)) else nn.Identity()
        d = max(self.in_features, self.out_features)
        self.A = nn.Parameter(torch.empty(d, rank, device=self.param_device))  # (max(in, out), r), fp32
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=self.param_device))
        self._step = 0  # a host copy of ``step``: reading the buffer each forward would sync a GPU
        if not is_restoring():
            self.reset_parameters()

    @classmethod
    def num_params(cls, in_features: int, out_features: int, *, rank: int = 8, **_: object) -> int:
        return rank * max(in_features, out_features)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init == "gaussian":
            nn.init.normal_(self.A, std=1.0 / self.rank)
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @property
    def u(self) -> float:
        """The ramp's current value ``u(t)``."""
        return ramp(self._step, self.ramp_steps)

    def advance(self, steps: int) -> None:
        self._step += steps
        self.step.fill_(self._step)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._step = int(self.step)

    def on_load(self) -> None:
        self._step = int(self.step)

    def factors(self) -> tuple[Tensor, Tensor]:
        """LoRA-style factors ``(A[:in]^T, A[:out])``: (r, in) and (out, r), views of ``A``."""
        return self.A[: self.in_features].T, self.A[: self.out_features]

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return self.base(x)
        down, up = self.factors()
        s = self.scale * self.u
        live_dropout = self.training and isinstance(self.dropout, nn.Dropout)
        if not self.stacked and not live_dropout and can_fuse(x, self.weight, self.bias, self.A):
            return lowrank_linear(x, self.weight, self.bias, down, up, s)
        y = self.base(x)
        h = F.linear(F.linear(self.dropout(x).to(self.A.dtype), down), up)
        return y + (s * h).to(y.dtype)

    def delta_weight(self) -> Tensor:
        down, up = self.factors()
        return (self.scale * self.u) * (up @ down)  # (out, in)
