"""Cuttlefish (Wang et al., MLSys 2023, https://arxiv.org/abs/2305.02538): low-rank training without rank tuning.

Train full rank; after every epoch record each tracked layer's floored stable rank
``sr(W) = floor(‖W‖_F² / σ_max²)`` (``W`` reshaped to ``(d_out, -1)``; the floor has a relative tolerance
of 1e-9, so a 12×12 orthogonal matrix, whose ratio computes to 11.999999999999989, gets 12). At construction
(the reference's epoch −1) record ``ξ = min(d_out, d_in) / sr(W_0)``; the estimated rank is the scaled stable rank
``r̂ = min(full, ceil(sr(W_t) · ξ))``. A layer is *stable* once, at an epoch ``e ≥ min_epoch`` (0-based, the
reference's "never before epoch 15"), the mean of the last ``tail`` (11) entries of ``|np.gradient(EMA)|`` is at
most ``τ``, the EMA being taken over the per-epoch ``sr`` sequence with weight ``2 / (ema_points + 1)``
(``ema_points = 15``); ``τ = tau`` (0.1), ``× tau_scale`` (2.5) when exactly 2 layers remain unstable,
``× 2·tau_scale`` (5) when 1 does (``utils.layer_rank_stable_detector``; the count is taken before the epoch's
checks). A stable layer stays stable. When all are, :attr:`Cuttlefish.ready` is set and the loop calls
:meth:`Cuttlefish.switch` before the next epoch: each tracked layer becomes ``(U√Σ)_r̂ (√ΣVᵀ)_r̂``
(:func:`~loraplex.compression.layers.factorize`). After the switch, :meth:`Cuttlefish.before_step` adds the
Frobenius decay, the exact gradient of ``λ/2 ‖U V‖_F²`` (``U = up (out, r)``, ``V = down (r, in)``)::

    ∂/∂U = λ (U V) Vᵀ,    ∂/∂V = λ Uᵀ (U V)          (``utils.apply_fd``; λ the weight-decay coefficient)

Decisions where the reference is not pinned down: the first ``keep_first`` targeted layers are neither tracked
nor factorised (the reference hard-codes index ranges per architecture; default 1, like TRP's first conv); a
layer whose ``r̂`` does not save parameters (``> break_even_rank``) stays dense (``only_if_smaller``; the
reference factorises regardless); ``r̂`` is clamped with ``min`` (the reference's ``int(x) > full`` test lets
``ceil`` reach ``full + 1`` for ``x ∈ (full, full + 1)``).

Optimizer after the switch: the factor parameters are new, so build a new optimizer, e.g.
``torch.optim.SGD(cf.param_groups(weight_decay=wd), lr=...)``: the factors (the decay comes from
:meth:`before_step`) and 1-D parameters get ``weight_decay=0``, every other parameter the plain ``wd``; the old
optimizer state is dropped (as in the reference's ``main.py``, which builds a new SGD for the low-rank model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from loraplex.adapter import check_finite, check_int, check_nonnegative
from loraplex.compression.layers import LOW_RANK_LAYERS, break_even_rank, factorize
from loraplex.linalg import floored_stable_rank
from loraplex.lowrank.trp import find_targets, set_submodule

# Cuttlefish's floored stable rank ``floor(Σ σ_i² / σ_max²)`` of ``w`` as ``(d_out, -1)`` (0 for zero), floored
# with a relative tolerance; it lives in :mod:`loraplex.linalg`, this name is ``loraplex.lowrank``'s.
stable_rank = floored_stable_rank


def ema(signal: Sequence[float], points: int) -> np.ndarray:
    """``e_0 = x_0``, ``e_i = w x_i + (1 - w) e_{i-1}`` with ``w = 2 / (points + 1)``.

    >>> ema([0.0, 4.0], 3).tolist()
    [0.0, 2.0]
    """
    w = 2.0 / (points + 1)
    out = np.zeros(len(signal))
    out[0] = signal[0]
    for i in range(1, len(signal)):
        out[i] = w * signal[i] + (1 - w) * out[i - 1]
    return out


def is_stable(history: Sequence[int], threshold: float, *, min_epoch: int, ema_points: int, tail: int) -> bool:
    """The stabilisation test on one layer's per-epoch ``sr`` history (``history[e]`` after epoch ``e``)."""
    epoch = len(history) - 1
    if epoch < max(min_epoch, 1):  # np.gradient needs two points
        return False
    grad = np.abs(np.gradient(ema(history, ema_points)))
    return bool(np.mean(grad[-tail:]) <= threshold)


def scaled_rank(sr: int, xi: float, full: int) -> int:
    """``min(full, ceil(sr · ξ))``, at least 1."""
    return max(1, min(full, math.ceil(sr * xi)))


class Cuttlefish:
    """Cuttlefish's rank tracking, switch and Frobenius decay (see the module docstring).

    Args:
        model: the full-rank model.
        targets: regex / list of layer names; default every ``nn.Linear`` and non-1×1 ``nn.Conv2d``.
        keep_first: the first targeted layers (in module order) that stay full rank and are not tracked.
        tau, tau_scale, min_epoch, ema_points, tail: the stabilisation test (reference 0.1, 2.5, 15, 15, 11).
        frobenius_decay: λ of the Frobenius decay on the factors after the switch (reference: the wd, 1e-4).
        only_if_smaller: keep dense the layers whose ``r̂`` saves no parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        targets: str | Sequence[str] | None = None,
        keep_first: int = 1,
        tau: float = 0.1,
        tau_scale: float = 2.5,
        min_epoch: int = 15,
        ema_points: int = 15,
        tail: int = 11,
        frobenius_decay: float = 1e-4,
        only_if_smaller: bool = True,
    ) -> None:
        names = find_targets(model, targets, skip_first_conv=False)
        self.keep_first = check_int("keep_first", keep_first, low=0)
        if keep_first >= len(names):
            raise ValueError(f"keep_first={keep_first} must be < the number of targeted layers ({len(names)})")
        self.model, self.names = model, names[keep_first:]
        self.tau, self.tau_scale = check_nonnegative("tau", tau), check_nonnegative("tau_scale", tau_scale)
        self.min_epoch = check_int("min_epoch", min_epoch, low=0)
        self.ema_points, self.tail = check_int("ema_points", ema_points), check_int("tail", tail)
        self.frobenius_decay = check_nonnegative("frobenius_decay", frobenius_decay)
        self.only_if_smaller = bool(only_if_smaller)
        self._check_finite()
        self.full = {n: min(w.shape[0], w[0].numel()) for n, w in ((n, self._weight(n)) for n in self.names)}
        sr0 = {n: stable_rank(self._weight(n)) for n in self.names}
        self.xi = {n: self.full[n] / max(sr0[n], 1) for n in self.names}
        self.history: dict[str, list[int]] = {n: [] for n in self.names}
        self.stable = dict.fromkeys(self.names, False)
        self.switched = False
        self.factorized: dict[str, int] = {}  # layer -> rank, after the switch

    def _check_finite(self) -> None:
        """Every tracked weight finite, checked before any is used (the SVD's error would name no layer)."""
        for name in self.names:
            check_finite(f"Cuttlefish: layer {name!r}", "weights", self._weight(name), "its SVD needs finite values")

    def _weight(self, name: str) -> Tensor:
        w = self.model.get_submodule(name).weight
        assert isinstance(w, Tensor)
        return w

    @property
    def epoch(self) -> int:
        """Epochs recorded so far."""
        return len(next(iter(self.history.values())))

    @property
    def ready(self) -> bool:
        """All tracked layers are stable: switch before the next epoch."""
        return all(self.stable.values()) and not self.switched

    def threshold(self, remaining: int) -> float:
        return self.tau * (self.tau_scale if remaining == 2 else 2 * self.tau_scale if remaining == 1 else 1.0)

    def epoch_end(self) -> None:
        """Record every tracked layer's ``sr`` and update the stable flags (nothing after the switch)."""
        if self.switched:
            return
        self._check_finite()
        threshold = self.threshold(sum(not s for s in self.stable.values()))
        for name in self.names:
            self.history[name].append(stable_rank(self._weight(name)))
            if not self.stable[name]:
                self.stable[name] = is_stable(
                    self.history[name], threshold, min_epoch=self.min_epoch, ema_points=self.ema_points, tail=self.tail
                )

    def ranks(self) -> dict[str, int]:
        """The estimated rank ``r̂`` of every tracked layer (after the switch: the ranks used)."""
        if self.switched:
            return dict(self.factorized)
        last = {n: h[-1] if h else stable_rank(self._weight(n)) for n, h in self.history.items()}
        return {n: scaled_rank(last[n], self.xi[n], self.full[n]) for n in self.names}

    def switch(self) -> nn.Module:
        """Factorise the tracked layers at :meth:`ranks` (in place; returns the model). Build a new optimizer."""
        if self.switched:
            raise ValueError("switched=True: the model was already factorised")
        self._check_finite()
        for name, rank in self.ranks().items():
            w = self._weight(name)
            if self.only_if_smaller and rank > break_even_rank(w[0].numel(), w.shape[0]):
                continue
            set_submodule(self.model, name, factorize(self.model.get_submodule(name), rank))
            self.factorized[name] = rank
        self.switched = True
        return self.model

    def factors(self) -> list[tuple[Tensor, Tensor]]:
        """``(up.weight, down.weight)`` of every factorised layer."""
        out = []
        for name in self.factorized:
            m = self.model.get_submodule(name)
            assert isinstance(m, LOW_RANK_LAYERS)
            out.append((m.up.weight, m.down.weight))
        return out

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups as the reference's ``add_weight_decay(model, wd, skip_list=factors)``: the factors
        (decayed by :meth:`before_step`) and every 1-D parameter (biases, norms) without weight decay, every
        other trainable parameter with ``weight_decay``."""
        ids = {id(p) for pair in self.factors() for p in pair}
        params = [p for p in self.model.parameters() if p.requires_grad]
        free = [p for p in params if id(p) in ids or p.dim() == 1]
        return [
            {"params": free, "weight_decay": 0.0},
            {"params": [p for p in params if id(p) not in {id(q) for q in free}], "weight_decay": weight_decay},
        ]

    def before_step(self) -> None:
        """After ``loss.backward()``: add the Frobenius-decay gradients to the factors (after the switch)."""
        if not self.switched or self.frobenius_decay == 0.0:
            return
        with torch.no_grad():
            for up, down in self.factors():
                u, v = up.flatten(1), down.flatten(1)  # (out, r), (r, in·kh·kw)
                uv = u @ v
                for p, g in ((up, uv @ v.T), (down, u.T @ uv)):
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.add_(g.reshape(p.shape), alpha=self.frobenius_decay)

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Nothing per step (the contract's hook; Cuttlefish acts per epoch)."""

    def state_dict(self) -> dict[str, Any]:
        """JSON values only (the factorised model's own ``state_dict`` holds the weights)."""
        return {
            "xi": dict(self.xi),
            "history": {k: list(v) for k, v in self.history.items()},
            "stable": dict(self.stable),
            "switched": self.switched,
            "factorized": dict(self.factorized),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; when the state says ``switched``, the same layers are factorised (weights then come from the
        model's ``state_dict``)."""
        self.xi = {k: float(v) for k, v in state["xi"].items()}
        self.history = {k: [int(x) for x in v] for k, v in state["history"].items()}
        self.stable = {k: bool(v) for k, v in state["stable"].items()}
        if state["switched"] and not self.switched:
            for name, rank in state["factorized"].items():
                set_submodule(self.model, name, factorize(self.model.get_submodule(name), int(rank)))
            self.factorized = {k: int(v) for k, v in state["factorized"].items()}
            self.switched = True
