"""Compressed linear layers from Jun Lu's survey (https://arxiv.org/abs/2408.05883): Kronecker and Hadamard.

Alternatives to ``loraplex.compression.layers.LowRankLinear`` (``W ≈ U V``, ``r (in + out)`` weights) for
``loraplex.compress(method="kronecker" | "hadamard")``:

* :class:`KroneckerLinear`: ``W ≈ Σ_{t < T} A_t ⊗ B_t``, A (T, m1, n1), B (T, m2, n2), ``out = m1 m2``,
  ``in = n1 n2``; ``T (m1 n1 + m2 n2)`` weights, fitted by ``nearest_kronecker`` (optimal, by SVD of the
  rearranged ``R(W)``).
* :class:`HadamardLinear`: ``W ≈ (W1 Z1) ⊙ (W2 Z2)`` of ranks ``r1, r2``; ``(r1 + r2)(in + out)`` weights
  (LowRankLinear's at rank ``r1 + r2``) for a rank up to ``r1 r2``, fitted by ``hadamard_als`` (a local
  optimum: the problem is not convex).

Each keeps the original bias, builds empty from ``(in_features, out_features, bias, **options)`` (for loading
from safetensors + the JSON of ``options()``), and is fitted by ``from_linear(linear, **options)``.
``candidates(method, in, out)`` lists the option sets a budgeted compressor may choose from, by weight count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loraplex.adapter import check_int
from loraplex.adapters._kron import kron_flops
from loraplex.adapters.loha import hadamard_linear, hadamard_weight
from loraplex.adapters.lokr import factorization
from loraplex.decompose.hadamard import hadamard_als
from loraplex.decompose.kronecker import kron_sum, nearest_kronecker


def _empty(*shape: int, device: torch.device | str | None, dtype: torch.dtype | None) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, device=device, dtype=dtype))


def _check_linear(linear: Any) -> nn.Linear:
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"can only compress an nn.Linear, not {type(linear).__name__}")
    return linear


class KroneckerLinear(nn.Module):
    """``y = x (Σ_t A_t ⊗ B_t)ᵀ + b``; ``A`` (terms, a_rows, a_cols), ``B`` (terms, out / a_rows, in / a_cols).

    The forward applies ``X ↦ Σ_t A_t X B_tᵀ`` to ``x`` reshaped to (a_cols, in / a_cols) (``_kron.py``'s
    identity, batched over the terms) when its ``terms · kron_flops`` multiply-adds per row are fewer than the
    dense ``in · out``; else it builds ``dense_weight()`` (``T`` below ``in·out / (n1 (n2 + m1) m2)``, e.g.
    9.6 for 384x384 at 16x16 / 24x24).

    Example:
        >>> layer = KroneckerLinear.from_linear(nn.Linear(12, 6), a_rows=2, a_cols=3, terms=2)
        >>> layer.A.shape, layer.B.shape, KroneckerLinear.num_params(12, 6, a_rows=2, a_cols=3, terms=2)
        (torch.Size([2, 2, 3]), torch.Size([2, 3, 4]), 36)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        a_rows: int,
        a_cols: int,
        terms: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        m1, n1, m2, n2 = self.split(in_features, out_features, a_rows, a_cols, terms)
        self.in_features, self.out_features, self.terms = in_features, out_features, terms
        self.A = _empty(terms, m1, n1, device=device, dtype=dtype)  # (T, m1, n1)
        self.B = _empty(terms, m2, n2, device=device, dtype=dtype)  # (T, m2, n2)
        self.bias = _empty(out_features, device=device, dtype=dtype) if bias else None

    @staticmethod
    def split(in_features: int, out_features: int, a_rows: int, a_cols: int, terms: int) -> tuple[int, int, int, int]:
        """``(m1, n1, m2, n2)``; ValueError unless ``a_rows | out``, ``a_cols | in``, ``1 <= terms <= rank bound``."""
        check_int("in_features", in_features)
        check_int("out_features", out_features)
        if isinstance(a_rows, bool) or not isinstance(a_rows, int) or a_rows < 1 or out_features % a_rows:
            raise ValueError(f"a_rows={a_rows!r} must be a positive divisor of out_features={out_features}")
        if isinstance(a_cols, bool) or not isinstance(a_cols, int) or a_cols < 1 or in_features % a_cols:
            raise ValueError(f"a_cols={a_cols!r} must be a positive divisor of in_features={in_features}")
        m2, n2 = out_features // a_rows, in_features // a_cols
        limit = min(a_rows * a_cols, m2 * n2)
        if isinstance(terms, bool) or not isinstance(terms, int) or not 1 <= terms <= limit:
            raise ValueError(f"terms={terms!r} must be an integer in [1, min(m1·n1, m2·n2)] = [1, {limit}]")
        return a_rows, a_cols, m2, n2

    @classmethod
    def num_params(cls, in_features: int, out_features: int, *, a_rows: int, a_cols: int, terms: int = 1) -> int:
        """Weights (bias not included): ``terms · (m1 n1 + m2 n2)``."""
        m1, n1, m2, n2 = cls.split(in_features, out_features, a_rows, a_cols, terms)
        return terms * (m1 * n1 + m2 * n2)

    def options(self) -> dict[str, int]:
        return {"a_rows": self.A.shape[1], "a_cols": self.A.shape[2], "terms": self.terms}

    def dense_weight(self) -> Tensor:
        """``Σ_t kron(A_t, B_t)``: (out, in)."""
        return kron_sum(self.A, self.B)

    def forward(self, x: Tensor) -> Tensor:
        _, m1, n1 = self.A.shape
        _, m2, n2 = self.B.shape
        if self.terms * kron_flops(m1, n1, m2, n2)[0] >= self.in_features * self.out_features:
            return F.linear(x, self.dense_weight(), self.bias)
        X = x.reshape(-1, n1, n2)  # (N, n1, n2): x[j·n2 + l] = X[j, l]
        Z = torch.einsum("Njl,tkl->tNjk", X, self.B)  # (T, N, n1, m2): X B_tᵀ
        Y = torch.einsum("tij,tNjk->Nik", self.A, Z)  # (N, m1, m2): Σ_t A_t X B_tᵀ
        y = Y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, a_rows: int, a_cols: int, terms: int = 1) -> KroneckerLinear:
        """The best ``terms``-term Kronecker approximation of ``linear.weight`` (``nearest_kronecker``)."""
        w = _check_linear(linear).weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, a_rows=a_rows, a_cols=a_cols,
                    terms=terms, device=w.device, dtype=w.dtype)  # fmt: skip
        A, B, _ = nearest_kronecker(w.detach(), (a_rows, a_cols), terms)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            if linear.bias is not None and layer.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer.train(linear.training).requires_grad_(w.requires_grad)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + ", ".join(
            f"{k}={v}" for k, v in self.options().items()
        )


class HadamardLinear(nn.Module):
    """``y = x ((W1 Z1) ⊙ (W2 Z2))ᵀ + b``; W1 (out, r1), Z1 (r1, in), W2 (out, r2), Z2 (r2, in).

    The forward is LoHa's ``hadamard_linear``: the exact factored form ``x Qᵀ Pᵀ`` (Khatri–Rao factors, rank
    ``r1 r2``) when it costs fewer multiply-adds than building ``W``, else ``W`` built per call.

    Example:
        >>> layer = HadamardLinear(16, 8, rank1=2, rank2=3)
        >>> HadamardLinear.num_params(16, 8, rank1=2, rank2=3), sum(p.numel() for p in layer.parameters()) - 8
        (120, 120)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank1: int,
        rank2: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.check(in_features, out_features, rank1, rank2)
        self.in_features, self.out_features, self.rank1, self.rank2 = in_features, out_features, rank1, rank2
        self.W1 = _empty(out_features, rank1, device=device, dtype=dtype)  # (out, r1)
        self.Z1 = _empty(rank1, in_features, device=device, dtype=dtype)  # (r1, in)
        self.W2 = _empty(out_features, rank2, device=device, dtype=dtype)  # (out, r2)
        self.Z2 = _empty(rank2, in_features, device=device, dtype=dtype)  # (r2, in)
        self.bias = _empty(out_features, device=device, dtype=dtype) if bias else None

    @staticmethod
    def check(in_features: int, out_features: int, rank1: int, rank2: int) -> None:
        check_int("in_features", in_features)
        check_int("out_features", out_features)
        limit = min(in_features, out_features)
        for name, r in (("rank1", rank1), ("rank2", rank2)):
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= limit:
                raise ValueError(f"{name}={r!r} must be an integer in [1, min(in, out)] = [1, {limit}]")

    @classmethod
    def num_params(cls, in_features: int, out_features: int, *, rank1: int, rank2: int) -> int:
        """Weights (bias not included): ``(r1 + r2)(in + out)``."""
        cls.check(in_features, out_features, rank1, rank2)
        return (rank1 + rank2) * (in_features + out_features)

    def options(self) -> dict[str, int]:
        return {"rank1": self.rank1, "rank2": self.rank2}

    def dense_weight(self) -> Tensor:
        """``(W1 Z1) ⊙ (W2 Z2)``: (out, in)."""
        return hadamard_weight(self.W1, self.Z1, self.W2, self.Z2)

    def forward(self, x: Tensor) -> Tensor:
        y = hadamard_linear(x, self.W1, self.Z1, self.W2, self.Z2, 1.0).to(x.dtype)
        return y if self.bias is None else y + self.bias

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, rank1: int, rank2: int, max_iter: int = 50, seed: int = 0
    ) -> HadamardLinear:
        """Fit ``linear.weight`` by ``hadamard_als`` (SVD start, at most ``max_iter`` iterations, ``seed`` for the
        start's noise). ``max_iter=50`` is a cost cap, not a tuned value: on MiniLM weights 15 iterations already
        beat SVD at 25 % and 50 % of the parameters (benchmarks/decompositions.py), and each iteration costs
        about 0.5-2 s on CPU for 384x1536 at r1 = r2 = 76."""
        w = _check_linear(linear).weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, rank1=rank1, rank2=rank2,
                    device=w.device, dtype=w.dtype)  # fmt: skip
        fit = hadamard_als(w.detach(), rank1, rank2, max_iter=max_iter, seed=seed, tol=1e-6)
        with torch.no_grad():
            for p, v in zip((layer.W1, layer.Z1, layer.W2, layer.Z2), fit.factors, strict=True):
                p.copy_(v)
            if linear.bias is not None and layer.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer.train(linear.training).requires_grad_(w.requires_grad)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank1={self.rank1}, rank2={self.rank2}"
        )


LAYERS: dict[str, type[KroneckerLinear] | type[HadamardLinear]] = {
    "kronecker": KroneckerLinear,
    "hadamard": HadamardLinear,
}


def candidates(method: str, in_features: int, out_features: int) -> list[dict[str, int]]:
    """Option sets of ``LAYERS[method]`` for an (out, in) weight, ascending by weight count, each below ``in·out``.

    Kronecker (decision): ``A`` of LoKr's near-square-root split (``factorization``) in both orders, i.e.
    ``(a_rows, a_cols) = (out_l, in_m)`` and ``(out_k, in_n)``, with every ``terms`` up to the rank bound;
    other splits exist but these minimise ``m1 n1 + m2 n2`` for the rank they reach. Hadamard: ``r1 + r2 = s``
    for every ``s >= 2``, split as evenly as possible (``r1 = s // 2``, which maximises the rank ``r1 r2``).
    Ties in the count keep this order (Kronecker: the ``(out_l, in_m)`` split first).

    Example:
        >>> candidates("hadamard", 16, 16)[:3]
        [{'rank1': 1, 'rank2': 1}, {'rank1': 1, 'rank2': 2}, {'rank1': 2, 'rank2': 2}]
    """
    check_int("in_features", in_features)
    check_int("out_features", out_features)
    full = in_features * out_features
    found: list[dict[str, int]] = []
    if method == "kronecker":
        (out_l, out_k), (in_m, in_n) = factorization(out_features), factorization(in_features)
        for a_rows, a_cols in dict.fromkeys([(out_l, in_m), (out_k, in_n)]):
            limit = min(a_rows * a_cols, full // (a_rows * a_cols))
            found += [{"a_rows": a_rows, "a_cols": a_cols, "terms": t} for t in range(1, limit + 1)]
        count = KroneckerLinear.num_params
    elif method == "hadamard":
        limit = min(in_features, out_features)
        found = [{"rank1": s // 2, "rank2": s - s // 2} for s in range(2, 2 * limit + 1)]
        count = HadamardLinear.num_params  # type: ignore[assignment]
    else:
        raise ValueError(f"method={method!r} must be one of {', '.join(map(repr, LAYERS))}")
    sized = [(count(in_features, out_features, **o), k, o) for k, o in enumerate(found)]
    return [o for n, _, o in sorted(sized, key=lambda t: t[:2]) if n < full]
