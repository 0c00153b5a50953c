"""ElaLoRA (Chang et al., 2025): the SVD-form adapter whose rank changes; its allocator is ``loraplex.rank.elalora``."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

import loraplex.options as opt
from loraplex.adapter import Adapter, is_restoring
from loraplex.adapters.adalora import init_triplet, svd_delta, svd_effect
from loraplex.options import Option, validate

NEW_E_CAP = 1e-13  # the reference's cap on a new singular value: ``min(min|E|, 1e-13)``
NORM_EPS = 1e-6  # the reference's guard in ``v / (||v|| + 1e-6)``

# The rank axis of each part: A (r, in) rows, E (r, 1) rows, B (out, r) columns.
RANK_DIM = {"A": 0, "E": 0, "B": 1}


def new_direction(M: Tensor, v: Tensor) -> Tensor:
    """``normalize(v - Mᵀ (M v))`` with ``||·|| + 1e-6`` (the reference's projection). M (r, n), v (n,) -> (n,).

    When M's rows are orthonormal this is the unit vector of v's component orthogonal to them. They
    are not in general (the regulariser only pulls them towards it): then ``I - MᵀM`` is not a
    projection and the result is merely ``v`` with ``MᵀM v`` subtracted, as in the reference; the
    new rank is still a unit vector and starts with ``E ≈ 0``, so ΔW is unchanged either way.
    """
    v = v - M.T @ (M @ v)
    return v / (v.norm() + NORM_EPS)


def new_singular_value(E: Tensor) -> Tensor:
    """``min(min_i |E_i|, 1e-13)`` as a ``(1, 1)`` tensor (0 when some E is 0, e.g. at init); E (r, 1)."""
    return E.abs().min().clamp(max=NEW_E_CAP).view(1, 1)


def select_ranks(A: Tensor, E: Tensor, B: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The ranks ``keep`` (indices, in order): rows of A and E, columns of B."""
    return A.index_select(0, keep), E.index_select(0, keep), B.index_select(1, keep)


def grow_rank(A: Tensor, E: Tensor, B: Tensor, v: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Append one rank: A row ``new_direction(A, v)``, B column ``new_direction(Bᵀ, u)``, E ``new_singular_value``.

    Shapes: A (r, in), E (r, 1), B (out, r), v (in,), u (out,) -> (r+1, in), (r+1, 1), (out, r+1).
    """
    a = new_direction(A, v)
    b = new_direction(B.T, u)
    return torch.cat([A, a[None]]), torch.cat([E, new_singular_value(E)]), torch.cat([B, b[:, None]], dim=1)


class ElaLoRA(Adapter):
    """ElaLoRA: Elastic & Learnable Low-Rank Adaptation (https://arxiv.org/abs/2504.00254), as its reference code.

    ``y = W0 x + b + ((dropout(x) (A ⊙ E)ᵀ) Bᵀ) · alpha / (r0 + 1e-5)``: the AdaLoRA SVD form
    ``ΔW = B diag(E) A · alpha / (r0 + 1e-5)`` (``delta_weight()``), the reference's exact expression
    (``self.scaling / (self.ranknum + 1e-5)`` in ``loralib/loralib/elalora.py::SVDLinear``). Unlike
    AdaLoRA the tensors change shape: the allocator (``loraplex.rank.elalora``) prunes ranks (drops rows
    of A, entries of E, columns of B) and appends new ones (``grow_rank``) with ``prune`` / ``grow``,
    which put new ``nn.Parameter`` objects in place. ``r`` (``current_rank``) is the current rank;
    ``r0`` (``rank``, the non-persistent buffer ``ranknum``) is the initial rank and stays in the scale
    forever, as in the reference.

    Init as the reference's ``reset_parameters``: ``E = 0`` (the base model at init), ``A, B ~ N(0, 0.02²)``.

    Defaults: ``rank = 10`` and ``alpha = 16`` (``NLU/scripts/run_debertav3_*.sh``: ``--lora_r 10
    --lora_alpha 16``), ``dropout = 0``.

    Decisions: the current rank is an option, ``current_rank`` (None = ``rank``), which ``prune`` and
    ``grow`` keep up to date in ``self.options``; ``loraplex.save`` writes the options and
    ``loraplex.load`` builds the adapter with them, so a resized model reloads with its shapes (a rank
    is never a buffer: it would have to be known before the tensors are loaded). ``self.options`` is
    replaced by a new dict on a resize (the layers of one ``adapt`` call share one dict). The reference
    reads ``lora_alpha <= 0`` as "use r"; here ``alpha`` must be > 0. No HuggingFace PEFT equivalent.

    Shapes: x (..., in) -> (..., out); A (r, in); E (r, 1); B (out, r); all fp32.

    Args:
        base: the layer to adapt.
        rank: the initial rank r0 (the reference's ``lora_r``); sets the scale forever.
        alpha: the scale numerator (the reference's ``lora_alpha``).
        dropout: dropout probability on the adapter's input.
        current_rank: the current rank r (None: ``rank``); set by the allocator, read when loading.

    Example:
        >>> layer = ElaLoRA(nn.Linear(16, 32), rank=4)
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 32])
        >>> layer.prune(torch.tensor([0, 2])); layer.current_rank, layer.options["current_rank"]
        (2, 2)
    """

    ranknum: Tensor
    method = "elalora"
    paper = "https://arxiv.org/abs/2504.00254"
    formula = "current_rank * (in + out + 1)"
    default_lr = 8e-4  # NLU/scripts/run_debertav3_cola.sh (the scripts use 5e-4..1.2e-3)
    size_option = "rank"
    declared_options: ClassVar[dict[str, Option]] = {
        "rank": opt.rank(10, "the starting rank (the allocator prunes and grows it)"),
        "alpha": opt.alpha(16.0, "the scale of P E Q", positive=True),
        "dropout": opt.dropout(),
        "current_rank": Option("int", None, "the rank held now (None: rank; set by checkpoints)", optional=True),
    }

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int = 10,
        alpha: float = 16.0,
        dropout: float = 0.0,
        current_rank: int | None = None,
    ) -> None:
        super().__init__(base)
        opts = {"rank": rank, "alpha": alpha, "dropout": dropout, "current_rank": current_rank}
        validate(self.declared_options, opts)
        r = rank if current_rank is None else current_rank
        self.rank, self.scaling = rank, float(alpha)
        self.options = {"rank": rank, "alpha": alpha, "dropout": dropout, "current_rank": current_rank}
        self.dropout = nn.Dropout(p_drop) if (p_drop := float(dropout)) else nn.Identity()
        device = self.param_device
        self.A = nn.Parameter(torch.empty(r, self.in_features, device=device))  # (r, in), Q
        self.E = nn.Parameter(torch.zeros(r, 1, device=device))  # (r, 1), singular values
        self.B = nn.Parameter(torch.empty(self.out_features, r, device=device))  # (out, r), P
        self.register_buffer("ranknum", torch.full((1,), float(rank), device=device), persistent=False)
        if not is_restoring():
            self.reset_parameters()

    @classmethod
    def num_params(
        cls, in_features: int, out_features: int, *, rank: int = 10, current_rank: int | None = None, **_: object
    ) -> int:
        r = rank if current_rank is None else current_rank
        return r * (in_features + out_features + 1)

    @property
    def current_rank(self) -> int:
        return self.A.shape[0]

    def reset_parameters(self) -> None:
        init_triplet(self.A, self.E, self.B)  # the reference's (PEFT-derived) init

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.active:
            return y
        effect = svd_effect(self.dropout(x.to(self.A.dtype)), self.A, self.E, self.B, self.scaling, self.ranknum)
        return y + effect.to(y.dtype)

    def delta_weight(self) -> Tensor:
        return svd_delta(self.A, self.E, self.B, self.scaling, self.ranknum)  # (out, in)

    def rank_axes(self) -> dict[str, int]:
        return dict(RANK_DIM)  # prune / grow slice these

    @torch.no_grad()
    def _replace(self, A: Tensor, E: Tensor, B: Tensor) -> None:
        grad = self.A.requires_grad
        for part, value in (("A", A), ("E", E), ("B", B)):
            setattr(self, part, nn.Parameter(value.contiguous(), requires_grad=grad))
        self.options = {**self.options, "current_rank": self.current_rank}

    @torch.no_grad()
    def prune(self, keep: Tensor) -> None:
        """Keep only the ranks ``keep`` (indices; at least one); new Parameters replace A, E, B."""
        keep = keep.to(self.A.device, torch.long)
        if keep.numel() < 1:
            raise ValueError("prune must keep at least one rank")
        self._replace(*select_ranks(self.A, self.E, self.B, keep))

    @torch.no_grad()
    def grow(self, generator: torch.Generator | None = None) -> None:
        """Append one rank (``grow_rank``); ``v, u ~ N(0, I)`` drawn on the CPU from ``generator``, A's then B's."""
        v = torch.randn(self.in_features, generator=generator).to(self.A)
        u = torch.randn(self.out_features, generator=generator).to(self.A)
        self._replace(*grow_rank(self.A, self.E, self.B, v, u))
