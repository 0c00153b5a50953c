"""AdaLoRA (Zhang et al., ICLR 2023): the SVD-form adapter; its rank allocator is ``loraplex.rank.adalora``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

import loraplex.options as opt
from loraplex.adapter import Adapter, is_restoring
from loraplex.options import Option, validate

RANKNUM_EPS = 1e-5  # PEFT's guard in ``scaling / (ranknum + 1e-5)``


def svd_delta(A: Tensor, E: Tensor, B: Tensor, scaling: float, ranknum: Tensor) -> Tensor:
    """``ΔW = B (A ⊙ E) · scaling / (ranknum + 1e-5)`` = ``P diag(E) Q · scaling / r0``, PEFT's order of operations.

    Shapes: A (r, in), E (r, 1), B (out, r), ranknum (1,) -> (out, in).
    """
    return B @ (A * E) * scaling / (ranknum + RANKNUM_EPS)


def svd_effect(h: Tensor, A: Tensor, E: Tensor, B: Tensor, scaling: float, ranknum: Tensor) -> Tensor:
    """``((h (A ⊙ E)ᵀ) Bᵀ) · scaling / (ranknum + 1e-5)``: the effect on an input ``h (..., in)``, PEFT's order."""
    return (h @ (A * E).T @ B.T) * scaling / (ranknum + RANKNUM_EPS)


@torch.no_grad()
def init_triplet(A: Tensor, E: Tensor, B: Tensor) -> None:
    """PEFT's AdaLoRA init (also ElaLoRA's): ``E = 0`` (so ΔW = 0), ``A, B ~ N(0, 0.02²)``."""
    nn.init.zeros_(E)
    nn.init.normal_(A, mean=0.0, std=0.02)
    nn.init.normal_(B, mean=0.0, std=0.02)


class AdaLoRA(Adapter):
    """AdaLoRA: Adaptive Budget Allocation for PEFT (https://arxiv.org/abs/2303.10512), as HuggingFace PEFT.

    ``y = W0 x + b + ((dropout(x) (A ⊙ E)ᵀ) Bᵀ) · alpha / (r0 + 1e-5)``: ``ΔW = P Λ Q`` with
    ``P = B`` (left singular vectors), ``Λ = diag(E)`` (singular values) and ``Q = A`` (right singular
    vectors), kept near-orthogonal by the allocator's regulariser, not by construction.
    ``delta_weight() = B (A ⊙ E) · alpha / (r0 + 1e-5)``. ``r0`` (``ranknum``, a non-persistent
    buffer) is the initial rank and stays so: masking a rank zeroes its entry of ``E`` in place
    (``loraplex.rank.adalora``, PEFT's ``masked_fill_``), it never shrinks the tensors or the scale.

    Init as PEFT's ``reset_lora_parameters``: ``E = 0`` (the base model at init; A and B get zero
    gradient until E moves), ``A, B ~ N(0, 0.02²)``.

    Defaults: ``rank = 12`` (PEFT's ``AdaLoraConfig.init_r``), ``alpha = 8`` (``LoraConfig.lora_alpha``;
    PEFT's scale is ``lora_alpha`` itself, not ``lora_alpha / r``), ``dropout = 0``.

    Decisions: PEFT reads ``lora_alpha <= 0`` as "use r"; here ``alpha`` must be > 0 and the import
    maps PEFT's ``lora_alpha <= 0`` to ``alpha = init_r``. PEFT allows ``r = 0``; here ``rank >= 1``.
    The attribute is ``scaling`` (not ``scale``) on purpose: ``ΔW`` is not ``scale · B A``, so this
    adapter must not look ``Factorized`` to LoRA-Pro / GoRA.

    PEFT checkpoints: ``lora_A``, ``lora_E``, ``lora_B`` (``ranknum`` is not saved; it is ``init_r``).
    Export writes the full-rank tensors (masked ranks keep ``E = 0``) and ``rank_pattern = None``.
    Import also reads checkpoints that PEFT pruned by its ``rank_pattern`` (tensors of k <= init_r
    ranks, still scaled by ``init_r``): the k kept ranks fill the first k slots and the rest are
    zero (A rows, E entries, B columns), which gives the same ΔW.

    Shapes: x (..., in) -> (..., out); A (r, in); E (r, 1); B (out, r); all fp32.

    Args:
        base: the layer to adapt.
        rank: the initial rank r0 (PEFT's ``init_r``).
        alpha: the scale numerator (PEFT's ``lora_alpha``).
        dropout: dropout probability on the adapter's input.

    Example:
        >>> layer = AdaLoRA(nn.Linear(16, 32), rank=4)
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 32])
        >>> layer.delta_weight().any().item()  # E = 0 at init
        False
    """

    ranknum: Tensor
    method = "adalora"
    paper = "https://arxiv.org/abs/2303.10512"
    formula = "rank * (in + out + 1)"
    default_lr = 1e-3  # PEFT's AdaLoRA examples; the paper's GLUE runs use 5e-4..1.2e-3
    size_option = "rank"
    declared_options: ClassVar[dict[str, Option]] = {
        "rank": opt.rank(12, "the starting rank (the allocator prunes it)"),
        "alpha": opt.alpha(8.0, "the scale of P E Q (PEFT: alpha, not alpha / rank)", positive=True),
        "dropout": opt.dropout(),
    }

    def __init__(self, base: nn.Module, *, rank: int = 12, alpha: float = 8.0, dropout: float = 0.0) -> None:
        super().__init__(base)
        validate(self.declared_options, {"rank": rank, "alpha": alpha, "dropout": dropout})
        self.rank, self.scaling = rank, float(alpha)
        self.dropout = nn.Dropout(p_drop) if (p_drop := float(dropout)) else nn.Identity()
        device = self.param_device
        self.A = nn.Parameter(torch.empty(rank, self.in_features, device=device))  # (r, in), Q
        self.E = nn.Parameter(torch.zeros(rank, 1, device=device))  # (r, 1), singular values
        self.B = nn.Parameter(torch.empty(self.out_features, rank, device=device))  # (out, r), P
        self.register_buffer("ranknum", torch.full((1,), float(rank), device=device), persistent=False)
        if not is_restoring():
            self.reset_parameters()

    @classmethod
    def num_params(cls, in_features: int, out_features: int, *, rank: int = 12, **_: object) -> int:
        return rank * (in_features + out_features + 1)

    def reset_parameters(self) -> None:
        init_triplet(self.A, self.E, self.B)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.active:
            return y
        effect = svd_effect(self.dropout(x.to(self.A.dtype)), self.A, self.E, self.B, self.scaling, self.ranknum)
        return y + effect.to(y.dtype)

    def delta_weight(self) -> Tensor:
        return svd_delta(self.A, self.E, self.B, self.scaling, self.ranknum)  # (out, in)

    def rank_axes(self) -> dict[str, int]:
        return {"A": 0, "E": 0, "B": 1}  # Q's rows, Λ, P's columns: ΔW = Σ_k P_k Λ_k Q_k · scaling / r0

    peft_type = "ADALORA"
    peft_keys: ClassVar[tuple[str, ...]] = ("lora_A", "lora_E", "lora_B")

    def to_peft(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Full-rank tensors; ``total_step = 1`` only satisfies PEFT's config check (the schedule is the
        allocator's, not the adapter's, and PEFT does not use it when loading for inference)."""
        config = {
            "init_r": self.rank,
            "lora_alpha": self.scaling,
            "lora_dropout": self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0,
            "fan_in_fan_out": self.transposed,
            "init_lora_weights": True,
            "total_step": 1,
            "rank_pattern": None,
        }
        return config, {"lora_A": self.A.detach(), "lora_E": self.E.detach(), "lora_B": self.B.detach()}

    @classmethod
    def peft_options(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
        rank = config.get("init_r", 12)
        alpha = config.get("lora_alpha", 8)
        return {
            "rank": rank,
            "alpha": float(alpha) if isinstance(alpha, int | float) and alpha > 0 else float(rank),
            "dropout": float(config.get("lora_dropout", 0.0)),
        }

    @torch.no_grad()
    def load_peft(self, tensors: dict[str, Tensor]) -> None:
        """Copy PEFT's tensors in; k < rank ranks (a checkpoint pruned by ``rank_pattern``) fill the first k slots."""
        got = [tensors.get(k) for k in self.peft_keys]
        first = got[0]
        k = first.shape[0] if first is not None and first.ndim == 2 else -1
        want = {"lora_A": (k, self.in_features), "lora_E": (k, 1), "lora_B": (self.out_features, k)}
        for key, t in zip(self.peft_keys, got, strict=True):
            if t is None or tuple(t.shape) != want[key] or not 0 <= k <= self.rank:
                shape = None if t is None else tuple(t.shape)
                raise ValueError(
                    f"PEFT tensor {key!r} has shape {shape}, expected {want[key]} with k <= init_r={self.rank}"
                )
        A, E, B = got
        assert A is not None and E is not None and B is not None
        for mine in (self.A, self.E, self.B):
            mine.zero_()
        self.A[:k].copy_(A)
        self.E[:k].copy_(E)
        self.B[:, :k].copy_(B)
