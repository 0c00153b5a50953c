"""TRP, Trained Rank Pruning (Xu et al., IJCAI 2020, https://arxiv.org/abs/2004.14566 and 1812.02402).

Full-rank training in which, every ``period`` iterations and *before the forward*, each targeted weight
``W`` (a conv kernel ``(N, C, kh, kw)`` seen in the channel (NC) scheme as the matrix ``(N, C·kh·kw)``; a
linear weight ``(out, in)`` as it is) is replaced by its truncated SVD ``U_k Σ_k V_kᵀ``, where ``k`` is the
smallest rank keeping the energy fraction ``Σ_{i≤k} σ_i² / Σ_i σ_i² ≥ energy`` (``EnergyThreshold(0.9)``), and
after the backward of the same iteration the nuclear-norm sub-gradient of the *truncated* SVD is added::

    W.grad += λ · U_k V_kᵀ          (λ = nuclear_weight, the paper's 3e-4)

At the end :meth:`TRP.finalize` replaces each targeted layer by a :class:`~loraplex.compression.layers.LowRankLinear`
/ :class:`~loraplex.compression.layers.LowRankConv2d` at the rank ``#{σ_i > final_threshold}`` (``ValueThreshold(0.05)``
of the reference's ``decompose.py``), only where that rank saves parameters.

Where the replacement happens in the loop contract of :mod:`loraplex.rank.base` (``loss.backward();
trp.before_step(); optimizer.step(); trp.step(optimizer)``): the reference replaces at the top of iteration
``t`` before its forward; here ``TRP(...)`` itself does iteration 0's replacement and ``step()`` (after
``optimizer.step()`` of iteration ``t``) does iteration ``t + 1``'s. Nothing touches the weights between
``step()`` and the next forward, so the two orders are the same computation; ``before_step()`` of iteration
``t`` adds the sub-gradient computed for that iteration. As in the reference the replacement is silent: the
optimizer's momentum carries on. Iterations between SVDs (``period > 1``) get neither replacement nor
sub-gradient, as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from loraplex.adapter import check_finite, check_fraction, check_int, check_nonnegative
from loraplex.compression.layers import break_even_rank, factorize
from loraplex.inject import match
from loraplex.linalg import energy_rank, svd, value_rank


def truncate(w: Tensor, energy: float) -> tuple[Tensor, Tensor, int]:
    """``(U_k Σ_k V_kᵀ, U_k V_kᵀ, k)`` in ``w``'s shape and dtype (``k = energy_rank``; convs: NC scheme)."""
    u, s, vh = svd(w)  # (N, m), (m,), (m, C·kh·kw) in float64 on CPU
    k = max(1, energy_rank(s, energy))  # a zero weight keeps one (zero) component
    low = (u[:, :k] * s[:k]) @ vh[:k]
    sub = u[:, :k] @ vh[:k]
    return low.reshape(w.shape).to(w.dtype), sub.reshape(w.shape).to(w.dtype), k


def default_targets(model: nn.Module, skip_first_conv: bool = True) -> list[str]:
    """The reference's look-up table, extended to linears: every conv with kernel ≠ 1×1 and ``groups == 1``
    (the first such conv skipped when ``skip_first_conv``) and every ``nn.Linear``, in module order."""
    names, first = [], skip_first_conv
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) and m.groups == 1:
            if first:
                first = False
                continue
            names.append(name)
        elif isinstance(m, nn.Linear):
            names.append(name)
    return names


def find_targets(model: nn.Module, targets: str | Sequence[str] | None, skip_first_conv: bool = True) -> list[str]:
    """Layer names: ``None`` for :func:`default_targets`, else ``loraplex.inject.match`` over the model's
    ``nn.Linear`` / ``nn.Conv2d`` (``groups == 1``) names; a ValueError when nothing matches."""
    if targets is None:
        found = default_targets(model, skip_first_conv)
    else:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) and _groups(m) == 1]
        found = match(names, targets)
    if not found:
        raise ValueError(f"targets={targets!r} matches no nn.Linear / nn.Conv2d (groups=1) layer of the model")
    return found


def _groups(m: nn.Module) -> int:
    return m.groups if isinstance(m, nn.Conv2d) else 1


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


class TRP:
    """Trained Rank Pruning as a training hook (see the module docstring for the loop and the maths).

    Args:
        model: the model, trained full rank; its targeted weights are modified in place.
        targets: regex / list of layer names (``loraplex.inject.match``), default :func:`default_targets`.
        period: iterations between SVDs (reference default 1: every batch).
        energy: energy fraction of the training-time truncation (reference ``EnergyThreshold(0.9)``).
        nuclear_weight: λ of the sub-gradient (``--nuclear-weight``, 3e-4 in the paper's runs; 0 turns it off).
        replace: replace the weights by their truncation (the reference's ``--trp``); when ``False`` only
            the sub-gradient is applied.
        final_threshold: :meth:`finalize`'s ``ValueThreshold`` on singular values (reference 0.05).
        skip_first_conv: with ``targets=None``, leave the first conv full rank (as the reference).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        targets: str | Sequence[str] | None = None,
        period: int = 1,
        energy: float = 0.9,
        nuclear_weight: float = 3e-4,
        replace: bool = True,
        final_threshold: float = 0.05,
        skip_first_conv: bool = True,
    ) -> None:
        self.model = model
        self.period = check_int("period", period)
        self.energy = check_fraction("energy", energy)
        self.nuclear_weight = check_nonnegative("nuclear_weight", nuclear_weight)
        self.final_threshold = check_nonnegative("final_threshold", final_threshold)
        self.replace = bool(replace)
        self.names = find_targets(model, targets, skip_first_conv)
        self.t = 0  # optimizer steps seen
        self.last_ranks: dict[str, int] = {}  # the energy ranks of the last SVD
        self.pending: dict[str, Tensor] = {}  # U_k V_kᵀ for the coming before_step
        self._prepare()

    def weight(self, name: str) -> nn.Parameter:
        w = self.model.get_submodule(name).weight
        assert isinstance(w, nn.Parameter)
        return w

    def _prepare(self) -> None:
        """The work before the forward of iteration ``self.t``: replace and store the sub-gradients."""
        self.pending = {}
        if self.t % self.period:
            return
        self._check_finite()
        with torch.no_grad():
            for name in self.names:
                w = self.weight(name)
                low, sub, k = truncate(w, self.energy)
                if self.replace:
                    w.copy_(low)
                self.pending[name] = sub
                self.last_ranks[name] = k

    def _check_finite(self) -> None:
        """Every targeted weight finite, checked before any is replaced (the SVD's error would name no layer)."""
        for name in self.names:
            check_finite(f"TRP: layer {name!r}", "weights", self.weight(name), "its SVD needs finite values")

    def before_step(self) -> None:
        """After ``loss.backward()``: ``W.grad += λ U_k V_kᵀ`` on SVD iterations."""
        if self.nuclear_weight == 0.0:
            return
        for name, sub in self.pending.items():
            w = self.weight(name)
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            w.grad.add_(sub, alpha=self.nuclear_weight)

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After ``optimizer.step()``: count the step and prepare (replace) for the next iteration's forward."""
        self.t += 1
        self._prepare()

    def ranks(self) -> dict[str, int]:
        """The energy rank of every targeted layer at the last SVD."""
        return dict(self.last_ranks)

    def final_ranks(self) -> dict[str, int]:
        """The ``ValueThreshold`` rank :meth:`finalize` would use for every targeted layer."""
        self._check_finite()
        return {name: value_rank(svd(self.weight(name))[1], self.final_threshold) for name in self.names}

    def finalize(self) -> nn.Module:
        """Replace each targeted layer by its factorised form at :meth:`final_ranks`, where that rank is at most
        ``break_even_rank`` (fewer parameters); other layers stay dense. Any conv stride is kept (the channel
        scheme's first conv carries it; the reference decouples stride-1 convs only, a restriction of its
        FLOP accounting). Returns the model (changed in place); build a new optimizer to fine-tune it."""
        for name, rank in self.final_ranks().items():
            w = self.weight(name)
            if rank <= break_even_rank(w[0].numel(), w.shape[0]):
                set_submodule(self.model, name, factorize(self.model.get_submodule(name), rank))
        self.pending = {}
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """JSON values and the pending sub-gradient tensors (``pending.<layer>``)."""
        out: dict[str, Any] = {"t": self.t, "last_ranks": dict(self.last_ranks)}
        out.update({f"pending.{k}": v.clone() for k, v in self.pending.items()})
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self.last_ranks = {k: int(v) for k, v in state["last_ranks"].items()}
        self.pending = {k[len("pending.") :]: v for k, v in state.items() if k.startswith("pending.")}
