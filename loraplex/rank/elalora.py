"""ElaLoRA's rank allocator (Chang et al., 2025): prune the least important ranks, grow where they are still important.

Pure pieces: ``b_at`` (the cubic schedule of b), ``plan_changes`` (which ranks to prune, how many to grow),
``remap`` (drop / append rank slices of a state tensor) and ``carry_optimizer`` (move a resized parameter's
optimizer state); the EMAs, triplet scores and the orthogonality penalty are AdaLoRA's (``loraplex.rank.adalora``).
``ElaLoRAAllocator`` drives them from the loop contract of ``loraplex.rank.base``.
"""
# size: ElaLoRA also grows ranks: tensor remapping and optimizer-state carry / bias correction

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from loraplex.adapters.elalora import ElaLoRA
from loraplex.inject import adapters_of
from loraplex.options import Option, validate
from loraplex.rank.adalora import PARTS, add_orth_gradients, triplet_scores, update_emas
from loraplex.rank.base import Allocator


def b_at(step: int, *, b0: int, init_warmup: int, final_warmup: int, total: int) -> int:
    """``round(b0 · (1 - p³))``, ``p = clip((step - init_warmup) / (total - final_warmup - init_warmup), 0, 1)``.

    The reference's ``_b_scheduler`` (Python's ``round``: halves to even).

    >>> [b_at(s, b0=4, init_warmup=2, final_warmup=2, total=10) for s in range(10)]
    [4, 4, 4, 4, 4, 4, 3, 2, 0, 0]
    """
    p = min(max((step - init_warmup) / (total - final_warmup - init_warmup), 0.0), 1.0)
    return round(b0 * (1 - p**3))


def plan_changes(scores: Sequence[Tensor], k: int, b: int) -> tuple[list[Tensor], list[int]]:
    """Per matrix: the rank indices to prune and the number of ranks to grow.

    Each matrix offers its ``k_eff = min(k, r - 1)`` lowest triplet scores; of the pooled offers the
    ``n = min(b, pooled)`` smallest are pruned (from their owners) and the owners of the ``n``
    largest grow by one rank per offer (a matrix can grow several ranks, and can both lose and gain).
    Sorting is stable, so ties go to the earlier matrix / rank: the choice is deterministic.

    >>> prune, grow = plan_changes([torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.3, 0.2])], k=2, b=1)
    >>> [p.tolist() for p in prune], grow
    ([[0], []], [1, 0])
    """
    values, owners, ranks = [], [], []
    for i, s in enumerate(scores):
        k_eff = min(k, s.numel() - 1)
        if k_eff < 1:
            continue
        order = torch.sort(s.detach().float().cpu(), stable=True).indices[:k_eff]
        values.append(s.detach().float().cpu()[order])
        owners += [i] * k_eff
        ranks += order.tolist()
    prune: list[list[int]] = [[] for _ in scores]
    grow = [0] * len(scores)
    n = min(b, len(owners))
    if n > 0:
        flat = torch.cat(values)
        for j in torch.sort(flat, stable=True).indices[:n].tolist():
            prune[owners[j]].append(ranks[j])
        for j in torch.sort(flat, stable=True, descending=True).indices[:n].tolist():
            grow[owners[j]] += 1
    return [torch.tensor(sorted(p), dtype=torch.long) for p in prune], grow


def remap(t: Tensor, keep: Tensor, grow: int, dim: int) -> Tensor:
    """The slices ``keep`` of ``t`` along ``dim``, then ``grow`` zero slices appended."""
    t = t.index_select(dim, keep.to(t.device))
    shape = list(t.shape)
    shape[dim] = grow
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def carry_optimizer(
    optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, keep: Tensor, grow: int, dim: int
) -> None:
    """Put ``new`` where ``old`` was in ``optimizer.param_groups`` and carry its state.

    Per-element state (a tensor shaped like ``old``: AdamW's ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``, SGD's ``momentum_buffer``) keeps the surviving slices ``keep`` and gets zeros
    for the ``grow`` new ones; scalars (``step``) and non-tensors are kept. Any other state (factored
    second moments, Adafactor's rows / columns, ...) cannot be carried: ``ValueError``.
    """
    name = type(optimizer).__name__
    found = False
    for group in optimizer.param_groups:
        for j, p in enumerate(group["params"]):
            if p is old:
                group["params"][j], found = new, True
    if not found:
        raise ValueError(f"a resized ElaLoRA parameter {tuple(old.shape)} is not in the optimizer ({name})")
    state = optimizer.state.pop(old, None)
    if not state:
        return
    carried: dict[str, Any] = {}
    for key, v in state.items():
        if isinstance(v, Tensor) and v.shape == old.shape:
            carried[key] = remap(v, keep, grow, dim)
        elif not isinstance(v, Tensor) or v.numel() == 1:
            carried[key] = v
        else:
            raise ValueError(
                f"cannot carry the {name} state {key!r} of shape {tuple(v.shape)} through a rank change of a "
                f"{tuple(old.shape)} parameter; use an optimizer with per-element state (AdamW, Adam, SGD)"
            )
    optimizer.state[new] = carried


def fresh_adam_correction(optimizer: torch.optim.Optimizer, param: Tensor, born: Tensor, dim: int) -> Tensor | None:
    """What to add to ``param`` after an Adam / AdamW step so that its slices along ``dim`` born at state step
    ``born[i] > 0`` took the step of their own count ``τ = step - born[i]`` (``None``: nothing to correct).

    torch's update is ``-lr · m / (1 - β1^t) / (sqrt(v) / sqrt(1 - β2^t) + ε)`` (weight decay aside, which is
    the same either way) with the parameter's one ``t``; a slice grown at ``t0`` with zero moments needs
    ``τ = t - t0`` in both bias corrections, as if its moments had their own step count. ``m``, ``v`` (the
    AMSGrad maximum where ``amsgrad``) are the moments after the step, the ones the update used.
    """
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) or not bool((born > 0).any()):
        return None
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    state = optimizer.state.get(param, {})
    if "exp_avg" not in state:
        return None
    (b1, b2), lr, eps = group["betas"], float(group["lr"]), float(group["eps"])
    t = float(state["step"])
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    shape = [1] * param.ndim
    shape[dim] = -1
    tau = (t - born.to(param.device, torch.float64)).clamp_min(1.0)
    bc1, bc2 = (1 - b1**tau).view(shape), (1 - b2**tau).view(shape)
    m = state["exp_avg"].double()
    own = m / bc1 / (v.double().sqrt() / bc2.sqrt() + eps)
    shared = m / (1 - b1**t) / (v.double().sqrt() / math.sqrt(1 - b2**t) + eps)
    return (-lr * (own - shared) * (born > 0).view(shape).to(param.device)).to(param.dtype)


class ElaLoRAAllocator(Allocator):
    """ElaLoRA's allocator (https://arxiv.org/abs/2504.00254), as ``loralib/loralib/elalora.py::RankAllocator``.

    Per step (0-based ``step`` = optimizer steps before this one, the reference's ``global_step``):

    * ``before_step``: the gradient of ``reg_orth_coef · mean over the 2L matrices of (||AAᵀ - I||_F,
      ||BᵀB - I||_F)`` is added to ``.grad`` (the reference's ``compute_orth_regu``, added to the loss:
      it divides by the count of A and B matrices, AdaLoRA's ``orth_penalty``).
    * ``step``, while ``step < total_steps - final_warmup``: ``I = |p ⊙ ∇p|`` of every A, E, B entry, the
      EMAs ``Ī`` (``beta1``), ``Ū`` (``beta2``), element score ``Ī · Ū``, triplet score per rank
      (AdaLoRA's ``smooth`` / ``triplet_scores``); ``b = b_at(step)`` when ``enable_scheduler`` (else
      ``b``); when ``step > init_warmup``, ``(step - init_warmup) % mask_interval == 0`` and ``b > 0``:
      ``plan_changes`` then, per changed matrix, prune (rows of A, entries of E, columns of B and the
      same slices of the EMAs) and grow (``ElaLoRA.grow``: new A row ``normalize(v - AᵀAv)``, B column
      ``normalize(u - BBᵀu)``, ``E = min(min|E|, 1e-13)``, zero EMAs). After the last budgeting step the
      ranks stay fixed.
    * The optimizer is fixed in place: each replaced Parameter takes the old one's slot in its param
      group, and its state keeps the surviving rows (zeros for new ones, ``step`` kept) (``carry_optimizer``).
      The reference rebuilds the optimizer and loses all its state at every change; that is not copied.
      With Adam / AdamW the grown slices get their own step count: ``step`` records the parameter's state
      step at which each slice was born and corrects every later update of that slice to the bias
      correction of its own count (``fresh_adam_correction``), so its first step is Adam's first,
      ``≈ lr · sign(g)``. (With the shared count, zero moments under ``1 - β^t ≈ 1`` made those slices step
      up to 5-6 × lr for their first ~30 steps; issue 18.) Surviving slices are untouched.

    Defaults: ``b = 4``, ``k = 2``, ``enable_scheduler = True`` (``NLU/scripts/run_debertav3_*.sh``),
    ``beta1 = beta2 = 0.85`` and ``reg_orth_coef = 0.1`` (``run_glue.py``). The scripts' ``init_warmup`` /
    ``final_warmup`` (300..1000, mostly 500) and ``mask_interval`` (50..500, mostly 100) are step counts
    for runs of a few thousand steps; here None means ``min(500, total_steps // 5)`` for both warm-ups
    and ``min(100, max(1, total_steps // 25))`` for the interval, so that short runs still reallocate.

    Decisions: exactly the ``n`` smallest pooled offers are pruned (the reference prunes, in each owner,
    all offers ``<= τ``, which is the same set unless scores tie); ``n = min(b, pooled offers)`` (the
    reference's ``topk`` fails when fewer than b offers exist, e.g. when most matrices are at rank 1),
    so the total rank is conserved by every update: n pruned, n grown. A matrix at rank 1 offers nothing
    (``k_eff = 0``), so it never grows either (as the reference). The reference's ``target_rank`` is
    unused there and absent here. Random directions come from a CPU ``torch.Generator`` seeded with
    ``seed`` whose state is in ``state_dict``, so a resumed run reallocates identically. Trainable
    A / E / B without a gradient count as zero sensitivity. Under DDP every process holds the same
    parameters, gradients and generator (same ``seed``), so all would take the same decisions; but DDP's
    buckets and FSDP's shards keep the replaced Parameters: with several processes the loop must rebuild
    its DDP wrapper after every step that sets ``resized`` and say so with ``ddp_rewrap=True``
    (``loraplex.finetune`` does; tested on 2 processes), else the allocator refuses to start rather than
    silently train stale tensors. FSDP is not supported. ``at_budget`` is the base class's: the total
    rank is conserved (the parameter count moves a little when layers of different sizes trade ranks).

    Args:
        model: a model carrying ``elalora`` adapters.
        total_steps: optimizer steps of the whole run.
        b: ranks pruned and grown per update (at the start of the schedule).
        k: the most ranks one matrix offers for pruning per update.
        init_warmup, final_warmup: steps without changes at the start and at the end (None: see above).
        mask_interval: steps between two updates (None: see above).
        beta1, beta2: EMA factors of sensitivity and uncertainty, in (0, 1).
        reg_orth_coef: weight of the orthogonality regulariser (>= 0).
        enable_scheduler: decay b along ``b_at``; False keeps b fixed.
        seed: seed of the generator of new directions.
        name: the adapter name to allocate (None: the only ElaLoRA adapter name).
        ddp_rewrap: the loop rebuilds its DDP wrapper after resizes (required with several processes).

    Example:
        >>> import loraplex
        >>> model = loraplex.adapt(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), "elalora", rank=4)
        >>> alloc = ElaLoRAAllocator(model, total_steps=100)
        >>> alloc.ranks(), alloc.init_warmup, alloc.final_warmup, alloc.mask_interval
        ({'0': 4, '1': 4}, 20, 20, 4)
    """

    name = "elalora"
    resizes = True
    declared_options = {
        "b": Option("int", 4, "ranks pruned and grown per update (at the start of the schedule)"),
        "k": Option("int", 2, "the most ranks one matrix offers for pruning per update"),
        "init_warmup": Option("int", None, "steps without changes at the start", low=0, optional=True),
        "final_warmup": Option("int", None, "steps without changes at the end", low=0, optional=True),
        "mask_interval": Option("int", None, "steps between two updates", optional=True),
        "beta1": Option("unit", 0.85, "EMA factor of the sensitivity"),
        "beta2": Option("unit", 0.85, "EMA factor of the uncertainty"),
        "reg_orth_coef": Option("float", 0.1, "weight of the orthogonality regulariser", nonneg=True),
        "enable_scheduler": Option("bool", True, "decay b along b_at; False keeps b fixed"),
        "seed": Option("int", 0, "seed of the generator of new directions", low=0),
        "ddp_rewrap": Option("bool", False, "the loop rebuilds its DDP wrapper after resizes"),
    }

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        *,
        b: int = 4,
        k: int = 2,
        init_warmup: int | None = None,
        final_warmup: int | None = None,
        mask_interval: int | None = None,
        beta1: float = 0.85,
        beta2: float = 0.85,
        reg_orth_coef: float = 0.1,
        enable_scheduler: bool = True,
        seed: int = 0,
        name: str | None = None,
        ddp_rewrap: bool = False,
    ) -> None:
        validate(self.declared_options, locals())
        super().__init__(model, total_steps)
        dist = torch.distributed
        if not ddp_rewrap and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                "the elalora allocator replaces parameters when it resizes, which a DDP wrapper does not see: "
                f"with {dist.get_world_size()} processes, rebuild the wrapper whenever `resized` is True and pass "
                "ddp_rewrap=True (loraplex.finetune does both)"
            )
        found = adapters_of(model, ElaLoRA.method, name, "the elalora allocator")
        self.layers: dict[str, ElaLoRA] = {n: cast(ElaLoRA, a) for n, a in found.items()}
        self.b0, self.k = b, k
        warm = min(500, total_steps // 5)
        self.init_warmup = warm if init_warmup is None else init_warmup
        self.final_warmup = warm if final_warmup is None else final_warmup
        self.mask_interval = min(100, max(1, total_steps // 25)) if mask_interval is None else mask_interval
        if self.init_warmup + self.final_warmup >= total_steps:
            raise ValueError(
                f"init_warmup={self.init_warmup} + final_warmup={self.final_warmup} must be < total_steps="
                f"{total_steps}: no budgeting phase is left"
            )
        self.beta1, self.beta2, self.reg_orth_coef = float(beta1), float(beta2), float(reg_orth_coef)
        self.enable_scheduler = enable_scheduler
        self.generator = torch.Generator().manual_seed(seed)
        self.avg: dict[str, dict[str, Tensor]] = {}  # layer -> part -> sensitivity EMA
        self.unc: dict[str, dict[str, Tensor]] = {}  # layer -> part -> uncertainty EMA
        # layer -> part -> per rank slice, the optimizer state step at which it was grown (0: not grown / fresh)
        self.born: dict[str, dict[str, Tensor]] = {}
        self._seen: dict[tuple[str, str], float] = {}  # the state step last corrected, per (layer, part)

    def b_now(self, step: int) -> int:
        if not self.enable_scheduler:
            return self.b0
        return b_at(
            step, b0=self.b0, init_warmup=self.init_warmup, final_warmup=self.final_warmup, total=self.total_steps
        )

    def before_step(self) -> None:
        add_orth_gradients(self.layers.values(), self.reg_orth_coef)

    def update_importance(self) -> None:
        update_emas(self.layers, self.avg, self.unc, self.beta1, self.beta2)

    def scores(self) -> list[Tensor]:
        """The triplet score of every rank, per layer (in ``self.layers`` order)."""
        return [triplet_scores(*(self.avg[n][p] * self.unc[n][p] for p in PARTS)) for n in self.layers]

    @torch.no_grad()
    def reallocate(self, optimizer: torch.optim.Optimizer, b: int) -> None:
        """One rank update with ``b`` (``plan_changes``), the EMAs and the optimizer state carried along."""
        prune, grow = plan_changes(self.scores(), self.k, b)
        for (n, a), drop, more in zip(self.layers.items(), prune, grow, strict=True):
            if drop.numel() == 0 and more == 0:
                continue
            self.resized = True
            axes = a.rank_axes()  # the parameters prune / grow slice, and their rank axis
            old = {p: a.get_parameter(p) for p in axes}
            mask = torch.ones(a.current_rank, dtype=torch.bool)
            mask[drop] = False
            keep = mask.nonzero().view(-1)
            if drop.numel():
                a.prune(keep)
            for _ in range(more):
                a.grow(self.generator)
            for p, dim in axes.items():
                self.avg[n][p] = remap(self.avg[n][p], keep, more, dim)
                self.unc[n][p] = remap(self.unc[n][p], keep, more, dim)
                carry_optimizer(optimizer, old[p], a.get_parameter(p), keep, more, dim)
                state = optimizer.state.get(a.get_parameter(p), {})
                now = float(state["step"]) if "step" in state else 0.0
                born = self.born.get(n, {}).get(p, torch.zeros(old[p].shape[dim], dtype=torch.float64))
                born = torch.cat([born[keep], torch.full((more,), now, dtype=torch.float64)])
                self.born.setdefault(n, {})[p] = born
                self._seen[(n, p)] = now

    def correct_grown(self, optimizer: torch.optim.Optimizer) -> None:
        """After ``optimizer.step()``: give the grown slices the Adam step of their own step count."""
        betas = [b for g in optimizer.param_groups for b in g.get("betas", ())]
        beta = max(betas, default=0.9999)
        with torch.no_grad():
            for n, parts in self.born.items():
                for p, born in parts.items():
                    param = getattr(self.layers[n], p)
                    state = optimizer.state.get(param, {})
                    if "step" not in state or float(state["step"]) == self._seen.get((n, p)):
                        continue  # not stepped since the last correction (no gradient)
                    self._seen[(n, p)] = float(state["step"])
                    fix = fresh_adam_correction(optimizer, param, born, self.layers[n].rank_axes()[p])
                    if fix is not None:
                        param.add_(fix)
                    tau = float(state["step"]) - born
                    done = (born > 0) & (beta**tau < 1e-17)  # both bias corrections are 1 in float64 by then
                    born[done] = 0.0

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.correct_grown(optimizer)
        step = self.t
        self.t += 1
        self.resized = False
        if step >= self.total_steps - self.final_warmup:
            return
        self.update_importance()
        b = self.b_now(step)
        if step > self.init_warmup and (step - self.init_warmup) % self.mask_interval == 0 and b > 0:
            self.reallocate(optimizer, b)

    def ranks(self) -> dict[str, int]:
        """The current rank of every layer (the rows of its A)."""
        return {n: a.current_rank for n, a in self.layers.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "avg": {n: {k: v.detach().clone() for k, v in d.items()} for n, d in self.avg.items()},
            "unc": {n: {k: v.detach().clone() for k, v in d.items()} for n, d in self.unc.items()},
            "generator": self.generator.get_state().to(torch.int64),  # int64: plain safetensors dtypes only
            "born": {n: {k: v.clone() for k, v in d.items()} for n, d in self.born.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("avg", "unc"):
            unknown = set(state[key]) - set(self.layers)
            if unknown:
                raise ValueError(f"allocator state {key!r} names layers {sorted(unknown)} this model lacks")
            for n, parts in state[key].items():
                for p, v in parts.items():
                    mine = getattr(self.layers[n], p)
                    if tuple(v.shape) != tuple(mine.shape):
                        raise ValueError(
                            f"allocator state {key!r} of {n}.{p} has shape {tuple(v.shape)}, the model's is "
                            f"{tuple(mine.shape)} (load the model saved with this state first)"
                        )

        for n, parts in state.get("born", {}).items():
            for p, v in parts.items():
                if n not in self.layers or p not in self.layers[n].rank_axes():
                    raise ValueError(f"allocator state 'born' names {n}.{p}, which this model lacks")
                want = self.layers[n].get_parameter(p).shape[self.layers[n].rank_axes()[p]]
                if tuple(v.shape) != (want,):
                    raise ValueError(
                        f"allocator state 'born' of {n}.{p} has shape {tuple(v.shape)}, the model's rank is {want} "
                        "(load the model saved with this state first)"
                    )

        def place(d: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
            out = {}
            for n, parts in d.items():
                out[n] = {k: v.to(getattr(self.layers[n], k).device, torch.float32).clone() for k, v in parts.items()}
            return out

        self.avg, self.unc = place(state["avg"]), place(state["unc"])
        self.generator.set_state(state["generator"].to("cpu", torch.uint8))
        # "born" is absent from states saved before issue 18: their grown slices then share the step count
        self.born = {
            n: {k: v.to("cpu", torch.float64).clone() for k, v in d.items()} for n, d in state.get("born", {}).items()
        }
        self._seen = {}
        super().load_state_dict(state)
