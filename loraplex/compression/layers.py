"""Factorised layers: one linear (or convolution) layer replaced by two thinner ones, ``W ≈ U V``.

Shared by one-shot compression (LoRD, :mod:`loraplex.compression.lord`) and low-rank training
(TRP, Cuttlefish: :mod:`loraplex.lowrank`).

* :class:`LowRankLinear`: ``y = up(down(x))`` with ``down: in -> rank`` (no bias) and
  ``up: rank -> out`` (the original bias). Parameters ``rank * (in + out)`` (+ ``out`` bias);
  it saves parameters only when ``rank < in * out / (in + out)``.
* :class:`LowRankConv2d`: TRP's channel scheme and Cuttlefish's conv factorisation: a ``rank``
  channel ``kh x kw`` convolution (same stride, padding, dilation; no bias) followed by a ``1 x 1``
  convolution ``rank -> out`` carrying the bias. ``W`` of shape ``(N, C, kh, kw)`` is factorised
  as the matrix ``(N, C * kh * kw)``.

The two factors split the singular values evenly, ``U_r Σ_r^½`` and ``Σ_r^½ V_rᵀ``
(:func:`loraplex.linalg.svd_factors`; ``svd``, ``split_factors``, ``svd_factors`` and ``check_rank``
live in :mod:`loraplex.linalg` and are re-exported here).

Both layers are plain ``nn.Module`` trees of ``nn.Linear`` / ``nn.Conv2d``, so adapters can be put
on their parts afterwards (LoRD followed by LoRA) and ``state_dict`` holds only ordinary tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loraplex.linalg import check_rank, split_factors, svd, svd_factors

__all__ = [
    "LOW_RANK_LAYERS",
    "LowRankConv2d",
    "LowRankLinear",
    "break_even_rank",
    "check_rank",
    "factorize",
    "lowrank_params",
    "split_factors",
    "svd",
    "svd_factors",
]


def lowrank_params(in_features: int, out_features: int, rank: int) -> int:
    """Weights of a factorised ``(out, in)`` layer at ``rank`` (bias not included)."""
    return rank * (in_features + out_features)


def break_even_rank(in_features: int, out_features: int) -> int:
    """The largest rank at which factorising saves parameters (0 when none does)."""
    return max(0, (in_features * out_features - 1) // (in_features + out_features))


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: ``down.weight (rank, in)``, ``up.weight (out, rank)``, ``up.bias (out,)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_rank(rank, out_features, in_features)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> Tensor:
        """The product ``up.weight @ down.weight`` of shape ``(out, in)``."""
        return self.up.weight @ self.down.weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, factors: tuple[Tensor, Tensor] | None = None) -> LowRankLinear:
        """Factorise ``linear`` at ``rank`` (truncated SVD unless ``factors = (up, down)`` are given)."""
        w = linear.weight
        up, down = factors if factors is not None else svd_factors(w, rank)
        if up.shape != (linear.out_features, rank) or down.shape != (rank, linear.in_features):
            raise ValueError(
                f"factors of shapes {tuple(up.shape)} and {tuple(down.shape)} do not fit a "
                f"({linear.out_features}, {linear.in_features}) layer at rank={rank}"
            )
        layer = cls(
            linear.in_features, linear.out_features, rank, linear.bias is not None, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down)
            if linear.bias is not None:
                layer.up.bias.copy_(linear.bias)
        return layer.train(linear.training).requires_grad_(w.requires_grad)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankConv2d(nn.Module):
    """``y = up(down(x))``: ``down`` a ``rank``-channel ``kh x kw`` conv, ``up`` a ``1 x 1`` conv with the bias."""

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        if conv.groups != 1:
            raise ValueError(f"groups={conv.groups} must be 1 to factorise a convolution")
        n, c, kh, kw = conv.weight.shape
        check_rank(rank, n, c * kh * kw)
        self.in_channels, self.out_channels, self.rank = c, n, rank
        w = conv.weight
        self.down = nn.Conv2d(
            c,
            rank,
            (kh, kw),
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            bias=False,
            padding_mode=conv.padding_mode,
            device=w.device,
            dtype=w.dtype,
        )
        self.up = nn.Conv2d(rank, n, 1, bias=conv.bias is not None, device=w.device, dtype=w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> Tensor:
        """The equivalent single ``(N, C, kh, kw)`` kernel."""
        return (self.up.weight.flatten(1) @ self.down.weight.flatten(1)).view(
            self.out_channels, *self.down.weight.shape[1:]
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, factors: tuple[Tensor, Tensor] | None = None) -> LowRankConv2d:
        """Factorise ``conv`` at ``rank``: truncated SVD of its ``(N, C*kh*kw)`` matrix unless ``factors``."""
        layer = cls(conv, rank)
        up, down = factors if factors is not None else svd_factors(conv.weight, rank)
        with torch.no_grad():
            layer.up.weight.copy_(up.reshape(layer.up.weight.shape))
            layer.down.weight.copy_(down.reshape(layer.down.weight.shape))
            if conv.bias is not None and layer.up.bias is not None:
                layer.up.bias.copy_(conv.bias)
        return layer.train(conv.training).requires_grad_(conv.weight.requires_grad)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, rank={self.rank}"


def factorize(module: nn.Module, rank: int, factors: tuple[Tensor, Tensor] | None = None) -> nn.Module:
    """:class:`LowRankLinear` or :class:`LowRankConv2d` for an ``nn.Linear`` or ``nn.Conv2d``."""
    if isinstance(module, nn.Linear):
        return LowRankLinear.from_linear(module, rank, factors)
    if isinstance(module, nn.Conv2d):
        return LowRankConv2d.from_conv(module, rank, factors)
    raise ValueError(f"cannot factorise a {type(module).__name__}: only nn.Linear and nn.Conv2d")


LOW_RANK_LAYERS = (LowRankLinear, LowRankConv2d)
