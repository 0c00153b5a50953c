"""AdaLoRA's rank allocator (Zhang et al., ICLR 2023), as HuggingFace PEFT's ``RankAllocator``.

Pure pieces: ``budget_at`` (the cubic budget schedule), ``smooth`` (sensitivity / uncertainty
EMAs), ``triplet_scores`` (one score per rank), ``mask_below`` (the global threshold) and
``orth_penalty`` (the orthogonality regulariser). ``AdaLoRAAllocator`` drives them from the loop
contract of ``loraplex.rank.base``.
"""
# size: AdaLoRA's whole allocator: schedule, EMAs, triplet scores, masks, orthogonality penalty, state

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from loraplex.adapters.adalora import AdaLoRA
from loraplex.inject import adapters_of
from loraplex.options import Option, validate
from loraplex.rank.base import Allocator

PARTS = ("A", "E", "B")


def budget_at(
    step: int, *, init_budget: int, target_budget: int, tinit: int, tfinal: int, total: int, deltaT: int
) -> tuple[int, bool]:
    """``(budget, mask now?)`` at 0-based ``step``, PEFT's ``budget_schedule`` to the float.

    ``step <= tinit``: the initial budget, no masking; ``step > total - tfinal``: the target budget;
    between: ``int((b0 - bT) · (1 - (step - tinit) / (total - tfinal - tinit))³ + bT)``, masking when
    ``step % deltaT == 0``.

    >>> [budget_at(s, init_budget=24, target_budget=8, tinit=2, tfinal=2, total=10, deltaT=2)[0] for s in range(10)]
    [24, 24, 24, 17, 12, 10, 8, 8, 8, 8]
    """
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_budget - target_budget) * (mul_coeff**3) + target_budget), step % deltaT == 0


def smooth(ipt: Tensor, avg: Tensor, unc: Tensor, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """One EMA step: sensitivity ``Ī ← β1 Ī + (1-β1) I``, uncertainty ``Ū ← β2 Ū + (1-β2) |I - Ī|`` (new Ī)."""
    avg = beta1 * avg + (1 - beta1) * ipt
    return avg, beta2 * unc + (1 - beta2) * (ipt - avg).abs()


def triplet_scores(score_A: Tensor, score_E: Tensor, score_B: Tensor) -> Tensor:
    """Per rank: ``s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)``. Shapes (r, in), (r, 1), (out, r) -> (r,)."""
    ab = torch.cat([score_A.mean(dim=1, keepdim=True), score_B.mean(dim=0).view(-1, 1)], dim=1)
    return score_E.view(-1) + ab.sum(dim=1).view(-1)


def mask_below(scores: Sequence[Tensor], drop: int) -> list[Tensor]:
    """Keep masks (True = kept): the ``drop``-th smallest pooled score is the threshold, ``<=`` it is dropped.

    ``drop < 1`` keeps everything (PEFT would fail in ``kthvalue``; the allocator's checks make it unreachable).
    """
    if drop < 1:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    threshold = torch.kthvalue(torch.cat(list(scores)), k=drop)[0].item()
    return [~(s <= threshold) for s in scores]


def orth_penalty(matrices: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """``mean over the 2L matrices of ||A Aᵀ - I||_F, ||Bᵀ B - I||_F`` (PEFT's ``regu_loss / num_param``)."""
    total: Any = 0
    for A, B in matrices:
        for cov in (A @ A.T, B.T @ B):
            eye = torch.eye(*cov.size(), dtype=cov.dtype, device=cov.device)
            total = total + torch.norm(cov - eye, p="fro")
    return total / (2 * len(matrices))


def orth_grad(X: Tensor, gram_of_rows: bool) -> Tensor:
    """``∂‖G - I‖_F / ∂X`` for a batch ``X (L, m, n)`` with ``G = X Xᵀ`` (rows) or ``Xᵀ X``: ``2 (G - I) X / ‖G - I‖``.

    Zero where ``G = I`` exactly (the norm's subgradient that autograd also takes there).
    """
    G = X @ X.mT if gram_of_rows else X.mT @ X
    G = G - torch.eye(G.shape[-1], dtype=X.dtype, device=X.device)
    norm = torch.linalg.matrix_norm(G)[:, None, None]
    g = (G @ X if gram_of_rows else X @ G) * 2
    return torch.where(norm > 0, g / norm.clamp_min(torch.finfo(X.dtype).tiny), torch.zeros_like(g))


@torch.no_grad()
def add_orth_gradients(layers: Iterable[Any], weight: float) -> None:
    """Add the gradient of ``weight · orth_penalty`` of the layers' trainable (A, B) pairs to their ``.grad``.

    Closed form (:func:`orth_grad`), batched over layers of equal shapes: a handful of kernels per
    shape group instead of an autograd graph of ~10 small kernels per layer (the allocator's
    bookkeeping is on every step's critical path; ``benchmarks/speed.py`` times it).
    """
    if weight == 0:
        return
    pairs = [(a.A, a.B) for a in layers if a.A.requires_grad and a.B.requires_grad]
    groups: dict[tuple[Any, ...], list[tuple[Tensor, Tensor]]] = {}
    for A, B in pairs:
        groups.setdefault((A.shape, B.shape, A.dtype, A.device), []).append((A, B))
    scale = weight / (2 * len(pairs)) if pairs else 0.0
    params: list[Tensor] = []
    grads: list[Tensor] = []
    for group in groups.values():
        As, Bs = [A for A, _ in group], [B for _, B in group]
        grads += (orth_grad(torch.stack(As), True) * scale).unbind(0)
        grads += (orth_grad(torch.stack(Bs), False) * scale).unbind(0)
        params += As + Bs
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)


@torch.no_grad()
def update_emas(
    layers: dict[str, Any],
    avg: dict[str, dict[str, Tensor]],
    unc: dict[str, dict[str, Tensor]],
    beta1: float,
    beta2: float,
) -> None:
    """One ``smooth`` step of every layer's A, E, B sensitivity ``|p ⊙ ∇p|`` (no gradient: zero), in place.

    The same arithmetic as :func:`smooth`, as multi-tensor (``torch._foreach_*``) kernels over every
    tensor at once: a few launches per step instead of ~8 per tensor.
    """
    keys = [(n, part) for n in layers for part in layers[n].rank_axes()]  # A, E, B
    ps = [layers[n].get_parameter(part) for n, part in keys]
    for (n, part), p in zip(keys, ps, strict=True):
        avg.setdefault(n, {}).setdefault(part, torch.zeros_like(p))
        unc.setdefault(n, {}).setdefault(part, torch.zeros_like(p))
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
    ipt = torch._foreach_mul(ps, grads)
    torch._foreach_abs_(ipt)
    old_avg = [avg[n][part] for n, part in keys]
    old_unc = [unc[n][part] for n, part in keys]
    new_avg = torch._foreach_add(torch._foreach_mul(old_avg, beta1), torch._foreach_mul(ipt, 1 - beta1))
    dev = torch._foreach_sub(ipt, new_avg)
    torch._foreach_abs_(dev)
    new_unc = torch._foreach_add(torch._foreach_mul(old_unc, beta2), torch._foreach_mul(dev, 1 - beta2))
    for (n, part), a_, u_ in zip(keys, new_avg, new_unc, strict=True):
        avg[n][part], unc[n][part] = a_, u_


class AdaLoRAAllocator(Allocator):
    """AdaLoRA's allocator (https://arxiv.org/abs/2303.10512): importance-scored masking of E, PEFT's math.

    Per step (0-based ``step`` = optimizer steps before this one, PEFT's ``global_step`` in its
    examples and under ``Trainer``):

    * ``before_step``: the gradient of ``orth_reg_weight · mean(||AAᵀ - I||_F, ||BᵀB - I||_F)`` is
      added to ``.grad`` (PEFT adds the same term to ``outputs.loss``).
    * ``step``, while ``step < total_steps - tfinal``: ``I = |p ⊙ ∇p|`` of every A, E, B entry, the
      EMAs ``Ī`` (``beta1``) and ``Ū`` (``beta2``), element score ``Ī · Ū``; then at masking steps
      (``budget_at``) the ranks whose triplet score is at or below the ``(b0 - b(t))``-th smallest
      over all layers get ``E_i = 0`` in place (their optimizer state and A / B stay; they can
      regrow until the next masking). At ``step == total_steps - tfinal`` the last mask to the
      target budget is taken and the EMAs dropped; after it, the same mask is re-applied every step.

    Budgets: ``b0`` = sum of the adapters' ranks, ``bT = target_r · layers``. Defaults are PEFT's
    ``AdaLoraConfig``: ``target_r = 8``, ``tinit = 0``, ``tfinal = 0``, ``deltaT = 1``,
    ``beta1 = beta2 = 0.85``, ``orth_reg_weight = 0.5``; PEFT's ``total_step`` is ``total_steps``.
    Decisions: ``bT < b0`` is required (PEFT crashes in ``kthvalue`` otherwise); with several
    AdaLoRA adapter names in the model, ``name`` picks one (PEFT trains one adapter at a time);
    ``ranks()`` counts the ranks the last masking kept (PEFT's ``rank_pattern``), not the nonzero
    entries of E: E is 0 at init, and masked entries regrow between maskings when ``deltaT > 1``.
    Trainable A / E / B without a gradient (unused in the forward) count as zero sensitivity.

    Args:
        model: a model carrying ``adalora`` adapters.
        total_steps: optimizer steps of the whole run.
        target_r: the average final rank per layer.
        tinit, tfinal: steps without masking at the start, steps with a fixed mask at the end.
        deltaT: steps between two maskings.
        beta1, beta2: EMA factors of sensitivity and uncertainty, in (0, 1).
        orth_reg_weight: weight of the orthogonality regulariser (>= 0).
        name: the adapter name to allocate (None: the only AdaLoRA adapter name).

    Example:
        >>> import loraplex
        >>> model = loraplex.adapt(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), "adalora", rank=4)
        >>> alloc = AdaLoRAAllocator(model, total_steps=10, target_r=2)
        >>> alloc.ranks()
        {'0': 4, '1': 4}
    """

    name = "adalora"
    declared_options = {
        "target_r": Option("int", 8, "the average rank the budget ends at"),
        "tinit": Option("int", 0, "steps without masking at the start", low=0),
        "tfinal": Option("int", 0, "steps with a fixed mask at the end", low=0),
        "deltaT": Option("int", 1, "steps between two maskings"),
        "beta1": Option("unit", 0.85, "EMA factor of the sensitivity"),
        "beta2": Option("unit", 0.85, "EMA factor of the uncertainty"),
        "orth_reg_weight": Option("float", 0.5, "weight of the orthogonality regulariser", nonneg=True),
    }

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        *,
        target_r: int = 8,
        tinit: int = 0,
        tfinal: int = 0,
        deltaT: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg_weight: float = 0.5,
        name: str | None = None,
    ) -> None:
        validate(self.declared_options, locals())
        super().__init__(model, total_steps)
        found = adapters_of(model, AdaLoRA.method, name, "the adalora allocator")
        self.layers: dict[str, AdaLoRA] = {n: cast(AdaLoRA, a) for n, a in found.items()}
        self.target_r, self.tinit, self.tfinal, self.deltaT = target_r, tinit, tfinal, deltaT
        if self.tinit >= total_steps - self.tfinal:
            raise ValueError(
                f"tinit={tinit} must be < total_steps - tfinal = {total_steps} - {tfinal}: no budgeting phase is left"
            )
        self.beta1, self.beta2, self.orth_reg_weight = float(beta1), float(beta2), float(orth_reg_weight)
        self.init_budget = sum(a.rank for a in self.layers.values())
        self.target_budget = self.target_r * len(self.layers)
        if self.target_budget >= self.init_budget:
            raise ValueError(
                f"target_r={target_r} over {len(self.layers)} layers gives a target budget of {self.target_budget}, "
                f"which must be < the initial budget {self.init_budget} (the sum of the adapters' ranks)"
            )
        self.avg: dict[str, dict[str, Tensor]] = {}  # layer -> part -> sensitivity EMA
        self.unc: dict[str, dict[str, Tensor]] = {}  # layer -> part -> uncertainty EMA
        # The keep masks of the last masking (PEFT's rank_pattern); all True before the first one.
        self.keep: dict[str, Tensor] = {n: torch.ones(a.rank, dtype=torch.bool) for n, a in self.layers.items()}

    @classmethod
    def at_budget(cls, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Final average rank ``r`` at the budget: start at ``ceil(1.5 r)`` (PEFT's default ratio, init_r 12 for
        target_r 8) and budget down to ``target_r = r``."""
        r = int(options["rank"])
        return dict(options) | {"rank": max(r + 1, math.ceil(1.5 * r))}, {"target_r": r}

    def schedule(self, step: int) -> tuple[int, bool]:
        return budget_at(
            step,
            init_budget=self.init_budget,
            target_budget=self.target_budget,
            tinit=self.tinit,
            tfinal=self.tfinal,
            total=self.total_steps,
            deltaT=self.deltaT,
        )

    def before_step(self) -> None:
        add_orth_gradients(self.layers.values(), self.orth_reg_weight)

    def update_importance(self) -> None:
        update_emas(self.layers, self.avg, self.unc, self.beta1, self.beta2)

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        scores = [triplet_scores(*(self.avg[n][k] * self.unc[n][k] for k in PARTS)) for n in self.layers]
        keep = mask_below(scores, self.init_budget - budget)
        self.keep = {n: m.cpu() for n, m in zip(self.layers, keep, strict=True)}
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """``E_i = 0`` in place for every rank the last masking dropped (PEFT's ``masked_fill_``)."""
        for n, a in self.layers.items():
            a.E.masked_fill_(~self.keep[n].view(-1, 1).to(a.E.device), 0.0)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        step, last = self.t, self.total_steps - self.tfinal
        self.t += 1
        if step < last:
            self.update_importance()
            budget, now = self.schedule(step)
            if now:
                self.mask_to_budget(budget)
        elif step == last:  # the final allocation; the EMAs are not needed any more
            self.mask_to_budget(self.schedule(step)[0])
            self.avg, self.unc = {}, {}
        else:
            self.apply()

    def ranks(self) -> dict[str, int]:
        """Ranks kept by the last masking (PEFT's ``rank_pattern`` sums): each layer's rank before the first."""
        return {n: int(m.sum()) for n, m in self.keep.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "avg": {n: {k: v.detach().clone() for k, v in d.items()} for n, d in self.avg.items()},
            "unc": {n: {k: v.detach().clone() for k, v in d.items()} for n, d in self.unc.items()},
            "keep": {n: m.to(torch.int64) for n, m in self.keep.items()},  # int64: plain safetensors dtypes only
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("avg", "unc", "keep"):
            unknown = set(state[key]) - set(self.layers)
            if unknown:
                raise ValueError(f"allocator state {key!r} names layers {sorted(unknown)} this model lacks")
        keep = {n: m.to("cpu", torch.bool) for n, m in state["keep"].items()}
        if set(keep) != set(self.layers) or any(keep[n].shape != (a.rank,) for n, a in self.layers.items()):
            raise ValueError(f"allocator state 'keep' does not fit this model's layers {sorted(self.layers)}")

        def place(d: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
            out = {}
            for n, parts in d.items():
                out[n] = {k: v.to(getattr(self.layers[n], k).device, torch.float32).clone() for k, v in parts.items()}
            return out

        self.avg, self.unc, self.keep = place(state["avg"]), place(state["unc"]), keep
        super().load_state_dict(state)
