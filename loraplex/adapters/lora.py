"""LoRA (Hu et al., 2021) and its rsLoRA scale, Gaussian, PiSSA and OLoRA inits."""
# size: four inits (two rewrite W0 and keep A0 / B0), the PEFT codec, the conv / embedding forms

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import loraplex.options as opt
from loraplex.adapter import (
    Adapter,
    check_finite,
    embed,
    is_restoring,
    root_layer,
)
from loraplex.adapters._ops import can_fuse, lowrank_linear
from loraplex.options import Option, validate

INITS = ("kaiming", "gaussian", "pissa", "olora")
REWRITING_INITS = ("pissa", "olora")


RSLORA = Option("bool", False, "scale by alpha / sqrt(rank) (rsLoRA) instead of alpha / rank")


def lora_scale(rank: int, alpha: float, rslora: bool) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` for rsLoRA (https://arxiv.org/abs/2312.03732)."""
    validate({"rslora": RSLORA}, {"rslora": rslora})  # a truthy 0 / "no" must not pick a scale silently
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_options(inits: tuple[str, ...], init_help: str = "how A and B start") -> dict[str, Option]:
    """LoRA's options (DoRA, BoRA: their own inits)."""
    return {
        "rank": opt.rank(8),
        "alpha": opt.alpha(16.0),
        "dropout": opt.dropout(),
        "rslora": RSLORA,
        "init": opt.choice(inits[0], inits, init_help),
    }


def conv_lowrank(root: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """PEFT's convolution LoRA ``lora_B(lora_A(x))`` without its scale, in ``A``'s dtype.

    ``lora_A`` is a convolution with the root's kernel, stride, padding, dilation and padding mode
    and weight ``A`` reshaped to ``(r, in_channels, *kernel)``; ``lora_B`` is the 1x1 convolution
    ``B`` (out, r) over the channel dim. Together ``conv(x, (B A).reshape(W.shape))``.
    Shapes: x (N, in_channels, *spatial) or unbatched; A (r, in_channels·prod(kernel)); B (out, r).
    """
    w = root.weight
    assert isinstance(w, Tensor)
    conv = root._conv_forward
    assert callable(conv)
    h = conv(x.to(A.dtype), A.view(A.shape[0], *w.shape[1:]), None)
    channel = -(w.dim() - 1)  # the channel dim, counted from the end (unbatched inputs too)
    return F.linear(h.movedim(channel, -1), B).movedim(-1, channel)


def principal_factors(W: Tensor, rank: int, scale: float, init: str) -> tuple[Tensor, Tensor]:
    """Factors ``(A, B)`` with ``scale * B @ A`` the part of ``W`` that PiSSA / OLoRA move into the adapter.

    PiSSA (https://arxiv.org/abs/2404.02948): ``W = U S Vh``; ``A = sqrt(S_r / s) Vh_r``,
    ``B = U_r sqrt(S_r / s)``. OLoRA (https://arxiv.org/abs/2406.01775): ``W = Q R``;
    ``A = R_r``, ``B = Q_r``. Both in fp32, exactly as HuggingFace PEFT computes them.

    Shapes: W (out, in) -> A (r, in), B (out, r).
    """
    W = W.detach().float()
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        root = torch.sqrt(S[:rank] / scale)  # (r,)
        return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]
    Q, R = torch.linalg.qr(W)
    return R[:rank].contiguous(), Q[:, :rank].contiguous()


class LoRA(Adapter):
    """LoRA: Low-Rank Adaptation (https://arxiv.org/abs/2106.09685).

    ``y = W0 x + b + s · B A dropout(x)``, ``s = alpha / rank`` (``alpha / sqrt(rank)`` with
    ``rslora``). ``delta_weight() = s · B A``.

    Inits: ``"kaiming"`` (A as ``nn.Linear``'s default, B = 0: the base model at init, as PEFT),
    ``"gaussian"`` (A ~ N(0, 1/rank), B = 0, as PEFT), ``"pissa"`` and ``"olora"`` (A, B from the
    principal part of W0, and W0 rewritten to ``W0 - s B A`` so the output is still the base's). The
    rewriting inits keep the initial factors as buffers ``A0``, ``B0``: ``disabled`` then adds
    ``s B0 A0`` back (the true base output, which PEFT does not give), ``unload`` restores W0, and
    a checkpoint re-creates the same residual on load without recomputing an SVD.

    Shapes: x (..., in) -> (..., out); A (r, in); B (out, r).

    Convolutions and embeddings (as PEFT's ``lora.Conv1d`` / ``Conv2d`` / ``Embedding``):

    * ``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``): ``in = in_channels · prod(kernel)``; ``A`` acts as
      a convolution with the base's kernel, stride, padding, dilation and padding mode, ``B`` as a
      1x1 convolution (``conv_lowrank``); ``delta_weight() = s · (B A).reshape(W.shape)``, so the
      adapted layer is the convolution with ``W + ΔW``. Decision: PEFT's ``lora_A`` drops the base's
      dilation and padding mode (its merge then changes the output); here they are kept, and
      ``to_peft`` refuses a dilated or non-zero-padded convolution.
    * ``nn.Embedding`` (``max_norm=None``): ``in = num_embeddings``, ``out = embedding_dim``;
      ``y = emb(x) + s · emb_A(x) B^T`` with ``emb_A`` the lookup in ``A^T`` (num, r);
      ``delta_weight() = s · (B A)^T`` (num, dim). Inits ``"kaiming"`` and ``"gaussian"`` give
      PEFT's embedding init, ``A = 0``, ``B ~ N(0, 1)`` (loralib's). ``dropout`` is accepted and
      ignored there, as PEFT (token ids cannot be dropped out).

    Args:
        base: the layer to adapt.
        rank: inner dimension r.
        alpha: scale numerator (> 0 for ``init="pissa"``, whose factors are ``sqrt(S_r / s)``).
        dropout: dropout probability on the adapter's input.
        rslora: use the rank-stabilised scale ``alpha / sqrt(rank)``.
        init: one of ``"kaiming"``, ``"gaussian"``, ``"pissa"``, ``"olora"``.

    Example:
        >>> layer = LoRA(nn.Linear(16, 32), rank=4)
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 32])
    """

    A0: Tensor | None
    B0: Tensor | None
    method = "lora"
    paper = "https://arxiv.org/abs/2106.09685"
    formula = "rank * (in + out)"
    default_lr = 1e-3  # the paper's GLUE runs use 2e-4..5e-4 for RoBERTa; 1e-3 is PEFT's common choice
    size_option = "rank"
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv", "embedding")
    declared_options: ClassVar[dict[str, Option]] = lora_options(
        INITS, "how A and B start; pissa / olora factor W0 (SVD / QR) and rewrite it"
    )

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
        super().__init__(base)
        opts = {"rank": rank, "alpha": alpha, "dropout": dropout, "rslora": rslora, "init": init}
        validate(self.declared_options, opts)
        if init in REWRITING_INITS and rank > min(self.in_features, self.out_features):
            raise ValueError(
                f"rank={rank} must be <= min(in_features={self.in_features}, "
                f"out_features={self.out_features}) for init={init!r}"
            )
        if init == "pissa" and not alpha > 0:  # the factors are sqrt(S_r / s): s <= 0 gives inf or NaN
            raise ValueError(f"alpha={alpha!r} must be > 0 for init='pissa' (its factors are sqrt(S_r / scale))")
        if init in REWRITING_INITS and self.stacked:
            raise ValueError(f"init={init!r} rewrites the base weight and cannot stack on another adapter")
        if not is_restoring():
            self.check_base(base, {"init": init})
        self.rank, self.scale, self.init = rank, lora_scale(rank, alpha, rslora), init
        p_drop = float(dropout)
        if self.kind == "embedding":  # PEFT ignores lora_dropout on token ids
            p_drop = 0.0
        self.dropout = nn.Dropout(p_drop) if p_drop else nn.Identity()
        device = self.param_device
        self.A = nn.Parameter(torch.empty(rank, self.in_features, device=device))  # (r, in), fp32
        self.B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))  # (out, r), fp32
        rewrites = init in REWRITING_INITS
        self.register_buffer("A0", torch.zeros_like(self.A) if rewrites else None)  # (r, in)
        self.register_buffer("B0", torch.zeros_like(self.B) if rewrites else None)  # (out, r)
        if not is_restoring():
            self.reset_parameters()

    @classmethod
    def inits(cls) -> tuple[str, ...]:
        return INITS

    @classmethod
    def check_base(cls, base: nn.Module, options: dict[str, Any]) -> None:
        """PiSSA / OLoRA factorise ``W0`` (SVD / QR): its weight must be finite."""
        init = options.get("init")
        w = getattr(root_layer(base), "weight", None)
        if init in REWRITING_INITS and isinstance(w, Tensor):
            why = f"init={init!r} needs finite values (it takes the {'SVD' if init == 'pissa' else 'QR'} of W0)"
            check_finite("the base layer", "weights", w, why)

    @classmethod
    def num_params(cls, in_features: int, out_features: int, *, rank: int = 8, **_: object) -> int:
        return rank * (in_features + out_features)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init in REWRITING_INITS:
            A, B = principal_factors(self.weight, self.rank, self.scale, self.init)
            self.A.copy_(A), self.B.copy_(B)
            self.A0.copy_(A), self.B0.copy_(B)  # type: ignore[union-attr]
            self._shift_base(-1.0)
            return
        if self.kind == "embedding":  # PEFT's (and loralib's) embedding init, whatever init_lora_weights
            nn.init.zeros_(self.A)
            nn.init.normal_(self.B)
            return
        if self.init == "gaussian":
            nn.init.normal_(self.A, std=1.0 / self.rank)
        else:  # nn.Linear's default init, as loralib and PEFT (https://github.com/microsoft/LoRA)
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    @torch.no_grad()
    def _shift_base(self, sign: float) -> None:
        """W0 += sign * s * B0 @ A0, in fp32, written back in the base dtype."""
        assert self.A0 is not None and self.B0 is not None
        W = self.weight
        shifted = W.float() + sign * self.scale * (self.B0 @ self.A0)  # (out, in)
        W.copy_(shifted.to(W.dtype))

    def on_load(self) -> None:
        if self.A0 is not None:
            self._shift_base(-1.0)

    def release(self) -> nn.Module:
        if self.A0 is not None:
            self._shift_base(+1.0)
        return self.base

    peft_type = "LORA"
    peft_keys: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")
    peft_patterns: ClassVar[dict[str, str]] = {"r": "rank_pattern", "lora_alpha": "alpha_pattern"}

    def to_peft(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """PiSSA / OLoRA export as PEFT converts them (``path_initial_model_for_weight_conversion``):
        a LoRA of rank 2r, ``B' = [B, B0]``, ``A' = [A; -A0]``, same scale, on the original W0."""
        A, B = self.A.detach(), self.B.detach()
        if self.A0 is not None and self.B0 is not None:
            A, B = torch.cat([A, -self.A0]), torch.cat([B, self.B0], dim=1)
        r, rslora = A.shape[0], self.options.get("rslora", False)
        if self.kind == "conv":
            root = self.root
            if any(d != 1 for d in root.dilation) or root.padding_mode != "zeros":  # type: ignore[union-attr]
                raise ValueError(
                    f"PEFT's LoRA ignores dilation={root.dilation} and padding_mode={root.padding_mode!r} "
                    "of a convolution (its outputs would differ); only dilation 1 and zero padding export"
                )
            shape = self.root_weight.shape
            A, B = A.view(r, *shape[1:]), B.view(B.shape[0], r, *[1] * (len(shape) - 2))
        config = {
            "r": r,
            "lora_alpha": self.scale * (math.sqrt(r) if rslora else r),
            "use_rslora": rslora,
            "use_dora": False,
            "lora_dropout": self.options.get("dropout", 0.0),
            "fan_in_fan_out": self.transposed,
            "init_lora_weights": True,
        }
        if self.kind == "embedding":
            return config, {"lora_embedding_A": A, "lora_embedding_B": B}
        return config, {"lora_A.weight": A, "lora_B.weight": B}

    @classmethod
    def peft_matches(cls, config: dict[str, Any]) -> bool:
        return not config.get("use_dora", False)

    @classmethod
    def peft_options(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.startswith(("pissa", "olora", "corda", "loftq")):
            raise ValueError(
                f"init_lora_weights={init!r} checkpoints need the rewritten base model they were trained on; "
                "save them with PEFT's path_initial_model_for_weight_conversion first"
            )
        A = tensors.get("lora_A.weight", tensors.get("lora_embedding_A"))
        if A is None or A.ndim < 2:  # (r, in), or (r, in_channels, *kernel) for a convolution
            raise ValueError("PEFT tensor 'lora_A.weight' (or 'lora_embedding_A') is missing or has fewer than 2 dims")
        return {
            "rank": A.shape[0],
            "alpha": float(config.get("lora_alpha", 8)),
            "rslora": bool(config.get("use_rslora", False)),
            "dropout": float(config.get("lora_dropout", 0.0)),
        }

    def lowrank(self, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        """``s · x A^T B^T`` computed in the adapter's dtype: (..., in) -> (..., out).

        Convolutions: ``s · conv_lowrank(x)``; embeddings: ``s · emb_A(x) B^T`` (x: token ids).
        """
        if self.kind == "conv":
            return conv_lowrank(self.root, x, A, B) * self.scale
        if self.kind == "embedding":
            return F.linear(embed(self.root, x, A.T), B) * self.scale
        return F.linear(F.linear(x.to(A.dtype), A), B) * self.scale

    def fusable(self, x: Tensor) -> bool:
        """One fused autograd node applies: plain base layer, no live dropout, frozen fp32 base."""
        live_dropout = self.training and isinstance(self.dropout, nn.Dropout)
        if self.kind != "linear":
            return False
        return not self.stacked and not live_dropout and can_fuse(x, self.weight, self.bias, self.A)

    def forward(self, x: Tensor) -> Tensor:
        if self.active and self.fusable(x):
            return lowrank_linear(x, self.weight, self.bias, self.A, self.B, self.scale)
        y = self.base(x)
        if not self.active:
            if self.A0 is None:
                return y
            return y + self.lowrank(x, self.A0, self.B0).to(y.dtype)  # type: ignore[arg-type]
        return y + self.lowrank(self.dropout(x), self.A, self.B).to(y.dtype)

    def reads_residual_base(self) -> bool:
        """True for a rewriting init (PiSSA / OLoRA): the base weight holds the residual ``W0 - s B0 A0``."""
        return self.A0 is not None

    def factor_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
        """``[(A, B, scale)]``: ``ΔW = s B A`` exactly (any init). Subclasses that rescale (DoRA, BoRA) override."""
        return [(self.A, self.B, float(self.scale))]

    def delta_weight(self) -> Tensor:
        return self.layout(self.scale * (self.B @ self.A))  # (out, in); the layer's layout (Adapter.layout)
