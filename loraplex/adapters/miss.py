"""MiSS (Kang and Yin): one shard ``D`` shared by every ``r``-column block of ΔW ("balance", "mini")."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import loraplex.options as opt
from loraplex.adapter import Adapter, is_restoring
from loraplex.adapters._ops import can_fuse
from loraplex.options import Option, validate


def shard_sum(x: Tensor, r: int) -> Tensor:
    """``Σ_g x_g`` over the ``r``-chunks of ``x`` zero-padded to a multiple of ``r``: (..., in) -> (..., r)."""
    if pad := -x.shape[-1] % r:
        x = F.pad(x, (0, pad))  # (..., ceil(in / r) * r)
    return x.unflatten(-1, (-1, r)).sum(-2)  # (..., r)


class _SharedShardLinear(torch.autograd.Function):
    """``y = x W^T + b + shard_sum(x) D`` over a frozen ``W``, in one node.

    The shard sum is a reduction (N·in adds); as a LoRA with the tiled identity ``A`` it would be two
    extra (N, in, r) GEMMs. Backward: ``gx = gy W + tile(gy D^T)``, ``gD = h^T gy``. Forward +
    backward on CPU (N = 2048, r = 64; 384x384, 384x1536, 1536x384): 0.83-0.95x PEFT's time,
    0.96-1.09x loraplex LoRA r = 8; plain autograd and ``lowrank_linear`` with ``A`` were 5-25% slower.
    Shapes: x (N, in); W (out, in); b (out,) or None; D (r, out).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W: Tensor, b: Tensor | None, D: Tensor) -> Tensor:
        h = shard_sum(x, D.shape[0])  # (N, r)
        y = x @ W.T if b is None else torch.addmm(b, x, W.T)  # (N, out): the base GEMM
        y.addmm_(h, D)  # shard product added in place
        ctx.save_for_backward(W, D, h if ctx.needs_input_grad[3] else None)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        W, D, h = ctx.saved_tensors
        gy = gy.contiguous()
        gD = h.T @ gy if ctx.needs_input_grad[3] else None  # (r, out)
        gx = None
        if ctx.needs_input_grad[0]:
            r, n = D.shape[0], W.shape[1]
            gh = gy @ D.T  # (N, r), row-major for the broadcast add below
            gx = gy @ W  # (N, in)
            full = n - n % r
            gx[:, :full].unflatten(1, (-1, r)).add_(gh[:, None, :])  # every whole chunk gets gh
            gx[:, full:].add_(gh[:, : n - full])  # the partial last chunk gets its first columns
        return gx, None, None, gD


class MiSS(Adapter):
    """MiSS: Matrix Shard Sharing (https://arxiv.org/abs/2409.15371), as HuggingFace PEFT's ``MissConfig``.

    ``y = W0 x + b + (Σ_g dropout(x)_g) D``: ``x`` is zero-padded to a multiple of ``r`` and cut into
    ``r``-chunks ``x_g``. So ``ΔW[:, c] = D[c mod r, :]``: ``D^T`` tiled along ``in`` (the last tile
    cut short), i.e. a LoRA with ``A = [I I ... I]`` fixed, ``B = D^T`` and scale 1 (PEFT does not
    scale MiSS). ``"balance"`` (PEFT's default) trains ``D`` (r, out); ``"mini"`` trains
    ``D_small`` (r, mini_r) and uses ``D = D_small`` repeated ``out / mini_r`` times along ``out``.
    ``init="zeros"`` (PEFT ``init_weights=True``) starts at the base model; ``"kaiming"``
    (``init_weights=False``) is ``nn.Linear``'s init of ``D``, as PEFT.

    Shapes: x (..., in) -> (..., out); D (r, out) ("balance") or (r, mini_r) ("mini").

    Args:
        base: the layer to adapt.
        rank: shard size r along ``in``; ``r <= in_features`` as in PEFT.
        variant: ``"balance"`` or ``"mini"``.
        mini_r: columns of ``D`` for ``"mini"``; must divide ``out_features``.
        dropout: dropout probability on the adapter's input.
        init: ``"zeros"`` or ``"kaiming"``.

    Example:
        >>> layer = MiSS(nn.Linear(16, 32), rank=4)
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 32])
    """

    method = "miss"
    paper = "https://arxiv.org/abs/2409.15371"
    formula = "rank * out (balance) or rank * mini_r (mini)"
    # Unmeasured. PEFT's MetaMathQA benchmark trains all MiSS variants with AdamW at 1e-4 (Llama-3.2-3B, as
    # its LoRA runs); the MiSS README uses 2e-5 (LLaMA-2-7B). An Adam step moves every ΔW entry by ~lr here
    # but by ~0.17 lr for LoRA (r = 8, alpha = 16, in = 384), so LoRA's 1e-3 maps to ~2e-4.
    default_lr = 2e-4
    size_option = "rank"
    declared_options: ClassVar[dict[str, Option]] = {
        "rank": opt.rank(64, "the shared block's rank r (<= in)"),
        "variant": opt.choice("balance", ("balance", "mini"), "the block's shape: (r, out) or (r, mini_r)"),
        "mini_r": Option("int", 1, "columns of the mini block (variant='mini'; divides out)"),
        "dropout": opt.dropout(),
        "init": opt.choice("zeros", ("zeros", "kaiming"), "how the block starts"),
    }

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int = 64,
        variant: str = "balance",
        mini_r: int = 1,
        dropout: float = 0.0,
        init: str = "zeros",
    ) -> None:
        super().__init__(base)
        opts = {"rank": rank, "variant": variant, "mini_r": mini_r, "dropout": dropout, "init": init}
        validate(self.declared_options, opts)
        if rank > self.in_features:
            raise ValueError(f"rank={rank} must be <= in_features={self.in_features}")
        if variant == "mini" and self.out_features % mini_r:
            raise ValueError(f"mini_r={mini_r} must divide out_features={self.out_features}")
        self.rank, self.variant, self.mini_r, self.init = rank, variant, mini_r, init
        self.p = float(dropout)
        self.dropout = nn.Dropout(self.p) if self.p else nn.Identity()
        cols = mini_r if variant == "mini" else self.out_features
        self.D = nn.Parameter(torch.zeros(rank, cols, device=self.param_device))  # (r, out | mini_r), fp32
        if not is_restoring():
            self.reset_parameters()

    @classmethod
    def num_params(
        cls,
        in_features: int,
        out_features: int,
        *,
        rank: int = 64,
        variant: str = "balance",
        mini_r: int = 1,
        **_: object,
    ) -> int:
        return rank * (mini_r if variant == "mini" else out_features)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init == "kaiming":  # PEFT's init_weights=False
            nn.init.kaiming_uniform_(self.D, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.D)

    peft_type = "MISS"
    peft_keys: ClassVar[tuple[str, ...]] = ("miss_block",)

    def to_peft(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        if self.transposed:
            raise ValueError("PEFT's MiSS adapts nn.Linear only, not transformers' Conv1D")
        init: bool | str = "mini" if self.variant == "mini" else self.init == "zeros"
        config = {"r": self.rank, "mini_r": self.mini_r, "init_weights": init, "miss_dropout": self.p}
        return config, {"miss_block": self.D.detach()}

    @classmethod
    def peft_matches(cls, config: dict[str, Any]) -> bool:
        return config.get("init_weights", True) != "bat"

    @classmethod
    def peft_options(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
        D = tensors.get("miss_block")
        if D is None or D.ndim != 2:
            raise ValueError("PEFT tensor 'miss_block' is missing or not a matrix")
        init = config.get("init_weights", True)
        return {
            "rank": D.shape[0],
            "variant": "mini" if init == "mini" else "balance",
            "mini_r": int(config.get("mini_r", 1)),
            "dropout": float(config.get("miss_dropout", 0.0)),
            "init": "kaiming" if init is False else "zeros",
        }

    def shard(self) -> Tensor:
        """The full shard ``D`` (r, out): ``D_small`` repeated along ``out`` for ``"mini"``."""
        return self.D.repeat(1, self.out_features // self.mini_r) if self.variant == "mini" else self.D

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return self.base(x)
        D = self.shard()  # (r, out)
        live_dropout = self.training and isinstance(self.dropout, nn.Dropout)
        if not self.stacked and not live_dropout and can_fuse(x, self.weight, self.bias, D):
            y = _SharedShardLinear.apply(x.reshape(-1, self.in_features), self.weight, self.bias, D)
            return y.view(*x.shape[:-1], self.out_features)
        y = self.base(x)
        return y + (shard_sum(self.dropout(x).to(D.dtype), self.rank) @ D).to(y.dtype)

    def delta_weight(self) -> Tensor:
        tiles = -(-self.in_features // self.rank)  # ceil(in / r)
        return self.shard().T.repeat(1, tiles)[:, : self.in_features]  # (out, in)
