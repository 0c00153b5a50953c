"""Rank selection for one-shot compression: per-layer rank, spectral energy, or a global parameter ratio.

Every layer is described by its *spectrum of energies* ``e_1 >= e_2 >= ... >= 0``: the squared
singular values of ``W`` for weight SVD (then the error of rank ``k`` is the Eckart–Young tail
``||W - W_k||_F^2 = Σ_{i>k} σ_i²``), or the eigenvalues of the output covariance for the
activation-aware decomposition (then the tail is the expected squared output error). The
relative error of rank ``k`` is ``sqrt(tail_k / Σ e)``: ``||W - W_k||_F / ||W||_F`` for weight SVD, the
root of the relative expected squared output error for the activation-aware one; it is the
``relative_error`` that :func:`loraplex.compression.plan` reports per layer.

``ratio`` allocation (not pinned down by LoRD, decided here): keep at most ``ratio`` of the targeted
layers' weight parameters, minimising the **sum over layers of the relative errors** (the
unsquared ones above, the numbers the plan reports and the README promises; until issue 18 the
solver minimised the sum of their squares). A layer is
either kept dense (its ``in * out`` parameters, error 0) or factorised at a rank ``k`` below the
break-even rank (``k (in + out)`` parameters). This is a multiple-choice knapsack: solved exactly by
dynamic programming over the budget in units of the gcd of all layer sizes (384 for MiniLM, 768 for
BERT-base) when the table has at most ``EXACT_LIMIT`` cells; beyond that (billion-parameter models)
by the Lagrangian relaxation: for a
multiplier ``λ`` each layer independently picks ``argmin err_l(k) + λ params_l(k)``; bisection on
``λ`` finds the cheapest multiplier whose choice fits the budget; the budget left over is then filled
greedily, one rank at a time, by the step with the largest error decrease per parameter. The result
always fits the budget and is never worse than the relaxation's point on the lower convex hull.
On near-flat spectra (trained transformer weights) this concentrates the cut on a few layers;
``allocation="uniform"`` instead gives every layer the same fraction (``by_uniform_ratio``);
``benchmarks/lord.py`` measures both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from loraplex.adapter import check_fraction
from loraplex.linalg import energy_rank

DENSE = -1  # the "rank" of a layer left as it is
EXACT_LIMIT = 2 * 10**8  # cells of the dynamic-programming table (budget units x options) solved exactly


@dataclass(frozen=True)
class LayerSpectrum:
    """One layer for the allocator: its weight shape and descending energies (length ``min(in, out)``)."""

    name: str
    in_features: int
    out_features: int
    energies: np.ndarray

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def max_rank(self) -> int:
        """The largest rank that saves parameters: ``k (in + out) < in * out``."""
        return min(len(self.energies), (self.dense_params - 1) // (self.in_features + self.out_features))

    def relative_errors(self) -> np.ndarray:
        """``err[k] = sqrt(tail_k / Σ e)``, the relative error after keeping ``k`` components, ``k = 0 .. len``."""
        e = np.clip(np.asarray(self.energies, dtype=np.float64), 0.0, None)
        total = e.sum()
        if total <= 0:
            return np.zeros(len(e) + 1)
        tail = np.concatenate([np.cumsum(e[::-1])[::-1], [0.0]])
        return np.sqrt(tail / total)

    def params(self, rank: int) -> int:
        return self.dense_params if rank == DENSE else rank * (self.in_features + self.out_features)


def by_energy(layers: Sequence[LayerSpectrum], energy: float) -> dict[str, int]:
    """Each layer's energy rank, or ``DENSE`` where that rank saves no parameters.

    The energy rank is :func:`loraplex.linalg.energy_rank` of the spectrum ``sqrt(energies)``,
    at least 1 (a zero layer keeps one component).
    """
    check_fraction("energy", energy)
    out = {}
    for s in layers:
        e = np.clip(np.asarray(s.energies, dtype=np.float64), 0.0, None)
        k = max(1, energy_rank(torch.from_numpy(np.sqrt(e)), energy))
        out[s.name] = k if k <= s.max_rank else DENSE
    return out


def by_rank(layers: Sequence[LayerSpectrum], rank: int | dict[str, int]) -> dict[str, int]:
    """The given rank (one for all, or per layer name), or ``DENSE`` where it saves no parameters.

    A layer left out of a rank dict stays ``DENSE``; a given rank must be ``>= 1`` (``-1``, the internal
    ``DENSE``, is refused: it would keep every layer dense without a word).
    """
    out = {}
    for s in layers:
        if isinstance(rank, dict) and s.name not in rank:
            out[s.name] = DENSE
            continue
        k = rank[s.name] if isinstance(rank, dict) else rank
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            keep = " (leave a layer out of the rank dict to keep it dense)" if isinstance(rank, dict) else ""
            raise ValueError(f"rank={k!r} for layer {s.name!r} must be a positive integer{keep}")
        out[s.name] = k if k <= s.max_rank else DENSE
    return out


def _choose(layers: Sequence[LayerSpectrum], errs: list[np.ndarray], lam: float) -> list[int]:
    picks = []
    for s, err in zip(layers, errs, strict=True):
        ks = np.arange(1, s.max_rank + 1)
        best, cost = DENSE, lam * s.dense_params
        if len(ks):
            scores = err[ks] + lam * ks * (s.in_features + s.out_features)
            i = int(np.argmin(scores))
            if scores[i] < cost:
                best = int(ks[i])
        picks.append(best)
    return picks


def by_ratio(layers: Sequence[LayerSpectrum], ratio: float) -> dict[str, int]:
    """Ranks that keep at most ``ratio`` of the layers' weight parameters at the least total relative error."""
    check_fraction("ratio", ratio)
    total = sum(s.dense_params for s in layers)
    budget = ratio * total
    floor = sum(s.params(1) if s.max_rank >= 1 else s.dense_params for s in layers)
    if floor > budget:
        raise ValueError(
            f"ratio={ratio} keeps {budget:.0f} of {total} parameters, below the smallest factorisation "
            f"(every layer at rank 1: {floor}, ratio {floor / total:.4f})"
        )
    errs = [s.relative_errors() for s in layers]
    exact = _knapsack(layers, errs, budget)
    if exact is not None:
        return {s.name: k for s, k in zip(layers, exact, strict=True)}
    return _lagrangian(layers, errs, budget)


def _options(s: LayerSpectrum) -> list[int]:
    return [DENSE, *range(1, s.max_rank + 1)]


def _knapsack(layers: Sequence[LayerSpectrum], errs: list[np.ndarray], budget: float) -> list[int] | None:
    """The exact optimum by dynamic programming over the budget in units of the gcd of all sizes.

    ``None`` when the table would exceed ``EXACT_LIMIT`` cells (then the Lagrangian solver runs).
    """
    sizes = [[s.params(k) for k in _options(s)] for s in layers]
    unit = math.gcd(*(c for row in sizes for c in row))
    units = int(budget // unit)
    if units * sum(len(row) for row in sizes) > EXACT_LIMIT:
        return None
    best = np.zeros(units + 1)  # best[b]: least error of the layers so far within b units
    choice = np.zeros((len(layers), units + 1), dtype=np.int64)
    for i, (s, row) in enumerate(zip(layers, sizes, strict=True)):
        new = np.full(units + 1, np.inf)
        for j, (k, c) in enumerate(zip(_options(s), row, strict=True)):
            c //= unit
            if c > units:
                continue
            cand = best[: units + 1 - c] + (0.0 if k == DENSE else errs[i][k])
            better = cand < new[c:]
            new[c:][better] = cand[better]
            choice[i, c:][better] = j
        best = new
    picks, b = [], units
    for i in reversed(range(len(layers))):
        j = int(choice[i, b])
        picks.append(_options(layers[i])[j])
        b -= sizes[i][j] // unit
    return picks[::-1]


def _lagrangian(layers: Sequence[LayerSpectrum], errs: list[np.ndarray], budget: float) -> dict[str, int]:
    """The fallback for large tables: a Lagrangian relaxation, then a greedy fill of the budget left.

    The relative-error curves are not convex in the rank, so the relaxation can land behind a plain
    uniform rank (9 of 1,000 random 3-layer cases did before this was added): the uniform ranks that fit
    are filled greedily too, and the least total error of all the candidates wins.
    """

    def size(picks: list[int]) -> int:
        return sum(s.params(k) for s, k in zip(layers, picks, strict=True))

    def error(picks: list[int]) -> float:
        return float(sum(0.0 if k == DENSE else e[k] for e, k in zip(errs, picks, strict=True)))

    lo, hi = 0.0, 1.0
    while size(_choose(layers, errs, hi)) > budget:
        hi *= 4
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if size(_choose(layers, errs, mid)) > budget else (lo, mid)
    candidates = [_choose(layers, errs, hi)]
    for k in range(1, min(s.max_rank for s in layers) + 1):
        if size([k] * len(layers)) <= budget:
            candidates.append([k] * len(layers))
    filled = [_fill(layers, errs, picks, budget - size(picks)) for picks in candidates]
    best = min(filled, key=error)
    return {s.name: k for s, k in zip(layers, best, strict=True)}


def _fill(layers: Sequence[LayerSpectrum], errs: list[np.ndarray], picks: list[int], left: float) -> list[int]:
    """Greedy fill: one rank (or the jump to dense) at a time, best error drop per parameter, within ``left``."""
    picks = list(picks)
    while True:
        best, gain = None, 0.0
        for i, (s, k) in enumerate(zip(layers, picks, strict=True)):
            if k == DENSE:
                continue
            nxt = k + 1 if k < s.max_rank else DENSE
            extra = s.params(nxt) - s.params(k)
            drop = errs[i][k] - (0.0 if nxt == DENSE else errs[i][nxt])
            if extra <= left and drop / max(extra, 1) > gain:
                best, gain = i, drop / max(extra, 1)
        if best is None:
            return picks
        k = picks[best]
        s = layers[best]
        nxt = k + 1 if k < s.max_rank else DENSE
        left -= s.params(nxt) - s.params(k)
        picks[best] = nxt


def by_uniform_ratio(layers: Sequence[LayerSpectrum], ratio: float) -> dict[str, int]:
    """Every layer at the largest rank within ``ratio`` of its own weights (``DENSE`` when ``ratio`` saves nothing)."""
    check_fraction("ratio", ratio)
    out = {}
    for s in layers:
        k = min(s.max_rank, int(ratio * s.dense_params) // (s.in_features + s.out_features))
        if k < 1 and ratio < 1:
            raise ValueError(f"ratio={ratio} leaves layer {s.name!r} ({s.out_features}x{s.in_features}) no rank")
        out[s.name] = k if k >= 1 and ratio < 1 else DENSE
    return out


def total_error(layers: Sequence[LayerSpectrum], ranks: dict[str, int]) -> float:
    """Sum of the layers' relative errors at ``ranks`` (``DENSE`` layers add 0)."""
    return float(sum(0.0 if ranks[s.name] == DENSE else s.relative_errors()[ranks[s.name]] for s in layers))
