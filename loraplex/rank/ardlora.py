"""ARD-LoRA's rank regulariser (Shinwari & Usama, 2025): ℓ1 sparsity and temporal total variation on α.

Pure pieces: ``ard_penalty`` (the regulariser) and ``clamp_scales`` (the feasible range of α).
``ARDLoRAAllocator`` drives them from the loop contract of ``loraplex.rank.base``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from loraplex.adapters.ardlora import ARDLoRA
from loraplex.inject import adapters_of
from loraplex.options import Option, validate
from loraplex.rank.base import Allocator


def ard_penalty(scales: Sequence[Tensor], previous: Sequence[Tensor], l1: float, tv: float) -> Tensor:
    """``l1 · Σ |α| + tv · Σ |α − α_prev|`` over every head of every layer (a scalar).

    The paper's ``λ R(α)`` with ``R = ℓ1 + β TV`` is this with ``l1 = λ`` and ``tv = λ β``; we weight
    the two terms independently so that either can be switched off alone. TV is the total variation
    the paper names, ``|Δα|`` (the ℓ1 norm of the change; over a run its sum is α's path length),
    not the smooth ``(Δα)²``: the squared form's gradient ``2 Δα`` vanishes for the small per-step
    changes Adam makes, so it would not damp anything; ``|Δα|``'s gradient is ``tv · sign(Δα)``
    (0 at ``Δα = 0``).

    >>> ard_penalty([torch.tensor([1.0, 0.5])], [torch.tensor([0.5, 0.5])], l1=0.1, tv=2.0)
    tensor(1.1500)
    """
    total: Any = 0
    for a, p in zip(scales, previous, strict=True):
        total = total + l1 * a.abs().sum() + tv * (a - p).abs().sum()
    return torch.as_tensor(total)


@torch.no_grad()
def clamp_scales(scale: Tensor, rank: int) -> None:
    """``α ← clamp(α, 1/r0, 1)`` in place: effective ranks between 1 and r0 (``effective_ranks``)."""
    scale.clamp_(1.0 / rank, 1.0)


class ARDLoRAAllocator(Allocator):
    """ARD-LoRA's allocator (https://arxiv.org/abs/2506.18267): ℓ1 + TV gradients on α, then α clamped.

    Per step:

    * ``before_step``: the gradient of ``l1 · Σ_{l,h} |α_{l,h}| + tv · Σ_{l,h} |α_{l,h} − α_{l,h}^prev|``
      (``ard_penalty``) is back-propagated into the ``rank_scale`` gradients. ℓ1 drives scales (and so
      ranks: the adapter's hard mask keeps exactly ``max(1, round(r0 α))`` components) down wherever
      the task does not hold them up; TV penalises change.
    * ``step``: after the optimizer step, α's step is multiplied by ``lr_scale`` (``α ← α_seen +
      lr_scale · (α − α_seen)``, ``α_seen`` the value before the step), then every α is clamped to
      ``[1/r0, 1]`` in place (effective ranks 1..r0; no shapes change, the hard mask does the rank
      work, so the optimizer state stays valid), and ``α^prev`` becomes the value this step's
      forward used.

    Decisions (the paper's exact R, its weights and the TV's axis are not pinned down):

    * TV is over time (``α(t) − α(t−1)``, the values of the previous step, kept here), not across
      adjacent layers: in a transformer the adapter order interleaves q / k / v / out / MLP layers,
      which have no reason to share ranks, and "stable rank transitions" is a statement about time.
      At the first step ``α^prev = α`` (no penalty).
    * ``lr_scale`` default 10: under Adam α moves by at most ~lr per step and one rank is ``1/r0`` of
      α, so at LoRA's lr 1e-3 (with warm-up and linear decay) a head could lose at most one rank of
      8 in a 125-step epoch, whatever ``l1``; ten times the step lets a short run move several
      ranks. Only α's step is scaled (A, B and the optimizer state are untouched); 1 is the plain
      optimizer step.
    * ``l1`` default 1e-3: under Adam the ℓ1 gradient acts as a threshold, a scale shrinks where the
      task gradient on it is below ``l1``; small, so that only scales the task barely uses go down
      (the paper's λ is not given: sweep it). With the hard mask the task gradient on α (straight
      through) is what switching the boundary component off or on would change in the loss, so
      ℓ1 now trades loss against rank.
    * ``tv`` default 1e-4, a tenth of ``l1``: with ``|Δα|`` the TV gradient ``tv · sign(Δα)`` opposes
      the last move at constant strength, so a steady ℓ1 drift survives only while ``tv < l1`` (at
      ``tv`` = 0.1 ≫ ``l1`` it would cancel any ℓ1 drift); a tenth damps reversals without
      stopping the drift. Measured (MiniLM, embedded data, 1 epoch = 125 steps,
      ``--max-length 32``, all defaults): the 37 layers end at ranks 4–8 of r0 = 8, mean 6.05, 78% of
      the r0 factor parameters.
    * ``ranks()`` is the sum over heads of each layer's effective ranks (``head_ranks()`` gives them
      per head); the rank table then reads as a layer's total rank, comparable with AdaLoRA's.
    * With several ARD-LoRA adapter names in the model, ``name`` picks one.
    * ``at_budget`` is the base class's: the trainable-parameter count never changes (the factors
      keep rank r0; only the effective rank shrinks), so a budget's size is the starting size.

    Args:
        model: a model carrying ``ardlora`` adapters.
        total_steps: optimizer steps of the whole run (unused: the regulariser has no schedule).
        l1: weight of ``Σ |α|`` (>= 0).
        tv: weight of ``Σ |α − α_prev|`` (>= 0).
        lr_scale: α's optimizer step is multiplied by this (>= 0; 1: the optimizer's own step; 0: α frozen).
        name: the adapter name to regularise (None: the only ARD-LoRA adapter name).

    Example:
        >>> import loraplex
        >>> model = loraplex.adapt(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), "ardlora", rank=4, heads=2)
        >>> ARDLoRAAllocator(model, total_steps=10).ranks()
        {'0': 8, '1': 8}
    """

    name = "ardlora"
    declared_options = {
        "l1": Option("float", 1e-3, "weight of sum |alpha|", nonneg=True),
        "tv": Option("float", 1e-4, "weight of sum |alpha - alpha_prev|", nonneg=True),
        "lr_scale": Option("float", 10.0, "alpha's optimizer step is multiplied by this (0: frozen)", nonneg=True),
    }

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        *,
        l1: float = 1e-3,
        tv: float = 1e-4,
        lr_scale: float = 10.0,
        name: str | None = None,
    ) -> None:
        validate(self.declared_options, locals())
        super().__init__(model, total_steps)
        found = adapters_of(model, ARDLoRA.method, name, "the ardlora allocator")
        self.layers: dict[str, ARDLoRA] = {n: cast(ARDLoRA, a) for n, a in found.items()}
        self.l1, self.tv, self.lr_scale = float(l1), float(tv), float(lr_scale)
        self.prev: dict[str, Tensor] = {n: a.rank_scale.detach().clone() for n, a in self.layers.items()}
        self._seen: dict[str, Tensor] | None = None  # α as this step's forward used it (set in before_step)

    def before_step(self) -> None:
        self._seen = {n: a.rank_scale.detach().clone() for n, a in self.layers.items()}
        if self.l1 == 0 and self.tv == 0:
            return
        live = [n for n, a in self.layers.items() if a.rank_scale.requires_grad]
        if live:
            scales = [self.layers[n].rank_scale for n in live]
            ard_penalty(scales, [self.prev[n] for n in live], self.l1, self.tv).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.t += 1
        if self._seen is not None and self.lr_scale != 1:
            with torch.no_grad():  # α's optimizer step, times lr_scale
                for n, a in self.layers.items():
                    seen = self._seen[n]
                    a.rank_scale.copy_(seen + self.lr_scale * (a.rank_scale - seen))
        for a in self.layers.values():
            clamp_scales(a.rank_scale, a.rank)
        if self._seen is None:  # before_step was skipped: the clamped values stand in
            self._seen = {n: a.rank_scale.detach().clone() for n, a in self.layers.items()}
        self.prev, self._seen = self._seen, None

    def head_ranks(self) -> dict[str, list[int]]:
        """Effective ranks per head, by layer name."""
        return {n: a.effective_ranks().tolist() for n, a in self.layers.items()}

    def ranks(self) -> dict[str, int]:
        """Each layer's effective rank summed over its heads."""
        return {n: int(a.effective_ranks().sum()) for n, a in self.layers.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "prev": {n: p.detach().clone() for n, p in self.prev.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        prev = state["prev"]
        if set(prev) != set(self.layers):
            raise ValueError(
                f"allocator state 'prev' names layers {sorted(prev)}, this model has {sorted(self.layers)}"
            )
        for n, a in self.layers.items():
            if tuple(prev[n].shape) != tuple(a.rank_scale.shape):
                raise ValueError(
                    f"allocator state 'prev' of {n!r} has shape {tuple(prev[n].shape)}, "
                    f"expected {tuple(a.rank_scale.shape)}"
                )
        self.prev = {n: prev[n].to(a.rank_scale.device, torch.float32).clone() for n, a in self.layers.items()}
        self._seen = None
        super().load_state_dict(state)
