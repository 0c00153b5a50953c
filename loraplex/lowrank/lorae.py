"""LoRAE, the low-rank autoencoder (Mazumder et al., WACV 2024, https://arxiv.org/abs/2310.16194).

``z = enc(x) ∈ R^n``, ``z̄ = M z`` with ``M ∈ R^{n×n}`` a bias-free linear layer (``layers`` of them stacked,
default 1, PyTorch's default init, not zeros), ``x̂ = dec(z̄)``; the loss is::

    MSE(x̂, x) + λ ‖M‖_*          (λ default 1e-5: index 9 of the reference's λ list; ‖·‖_* the nuclear norm)

Only the first latent layer is penalised even when ``layers > 1`` (the reference's ``hidden[0]``). The
penalty goes through autograd (``torch.linalg.matrix_norm(M, "nuc")``); for a full-rank ``M = U Σ Vᵀ`` its
gradient is ``λ U Vᵀ``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loraplex.adapter import check_int, check_nonnegative


class LowRankLatent(nn.Sequential):
    """``layers`` bias-free ``nn.Linear(n, n)`` applied in turn; ``self[0].weight`` is the penalised ``M``."""

    def __init__(self, n: int, layers: int = 1) -> None:
        check_int("n", n)
        check_int("layers", layers)
        super().__init__(*(nn.Linear(n, n, bias=False) for _ in range(layers)))
        self.n = n

    @property
    def matrix(self) -> Tensor:
        """The penalised ``M`` (the first layer's weight), ``(n, n)``."""
        w = self[0].weight
        assert isinstance(w, Tensor)
        return w


def nuclear_penalty(m: nn.Module | Tensor, weight: float = 1e-5) -> Tensor:
    """``λ ‖M‖_*``, differentiable; ``m`` a :class:`LowRankLatent`, an ``nn.Linear`` or a matrix.

    >>> float(nuclear_penalty(torch.diag(torch.tensor([3.0, -2.0])), weight=0.5))
    2.5
    """
    lam = check_nonnegative("weight", weight)
    if isinstance(m, LowRankLatent):
        mat = m.matrix
    elif isinstance(m, nn.Linear):
        mat = m.weight
    elif isinstance(m, Tensor) and m.dim() == 2:
        mat = m
    else:
        raise ValueError(f"m={type(m).__name__} must be a LowRankLatent, an nn.Linear or a 2-D tensor")
    return lam * torch.linalg.matrix_norm(mat, ord="nuc")


class Autoencoder(nn.Module):
    """``x̂ = decoder(latent(encoder(x)))``; ``latent=None`` gives the plain autoencoder (identity latent).

    :meth:`loss` is ``MSE(x̂, x) + λ ‖M‖_*`` (just the MSE without a latent layer or with ``weight=0``).
    """

    def __init__(
        self, encoder: nn.Module, decoder: nn.Module, latent: LowRankLatent | None = None, weight: float = 1e-5
    ) -> None:
        super().__init__()
        self.encoder, self.decoder, self.latent = encoder, decoder, latent
        self.weight = check_nonnegative("weight", weight)

    def encode(self, x: Tensor) -> Tensor:
        """The latent code fed to the decoder, ``z̄ = M z`` (``z`` without a latent layer)."""
        z = self.encoder(x)
        return self.latent(z) if self.latent is not None else z

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encode(x))

    def loss(self, x: Tensor) -> Tensor:
        mse = nn.functional.mse_loss(self(x), x)
        if self.latent is None or self.weight == 0.0:
            return mse
        return mse + nuclear_penalty(self.latent, self.weight)
