"""A new adapter from a weighted sum of a model's adapters: ``combine(model, {"a": 0.7, "b": 0.3}, name="ab")``.

Reference: HuggingFace PEFT's ``LoraModel.add_weighted_adapter`` (peft 0.21, ``peft/tuners/lora/model.py``,
https://huggingface.co/docs/peft/package_reference/lora), after task arithmetic (Ilharco et al.,
https://arxiv.org/abs/2212.04089): on every layer, with ``ΔW_i = a_i.delta_weight()`` (out, in) of the
source adapter called ``i`` and its weight ``w_i``, the target is ``ΔW = Σ_i w_i ΔW_i``. The result is always
a plain LoRA (method ``"lora"``, ``alpha = rank`` so its scale is 1, no dropout, fp32 factors).

**"cat"** (exact; LoRA sources, whose ``ΔW_i = s_i B_i A_i``): ``A = cat_i(w_i s_i A_i)`` (Σr_i, in) and
``B = cat_i(B_i)`` (out, Σr_i), so ``B A = Σ_i w_i s_i B_i A_i = Σ_i w_i ΔW_i``. The weight goes on ``A``
as in PEFT, so the tensors equal PEFT's. Rank: the sum of the sources' ranks on that layer.

**"linear"** (PEFT's; LoRA sources of one rank r): with ``c_i = w_i s_i``, ``A = Σ_i √c_i A_i`` and
``B = Σ_i √c_i B_i`` (rank r). Then ``B A = Σ_i Σ_j √(c_i c_j) B_i A_j``: the cross terms ``i ≠ j`` make it
**not** ``Σ w_i ΔW_i`` in general (it is for one source, or when the cross terms vanish); the report gives
the relative error. (PEFT puts the sign of a negative ``c_i`` on ``A``; weights here are ``>= 0``.)

**"svd"** (any weight-update sources, methods mixed): ``ΔW = Σ_i w_i ΔW_i`` truncated at rank ``k``
(Eckart–Young): ``B = U_k Σ_k^½``, ``A = Σ_k^½ V_kᵀ`` (:func:`loraplex.convert.truncate`; PEFT splits
``U_k Σ_k`` / ``V_kᵀ``: the same product ``B A``). ``k = min(rank, in, out)`` per layer.

Decisions (not pinned down by PEFT or the issue; each is tested in ``tests/test_named.py``):

* The new adapter goes on top of the stack of every layer carrying at least one source, and is
  created **inactive**: the model's outputs do not change (sources and their combination would
  otherwise count twice). ``loraplex.activate(model, name)`` switches to it. The sources stay.
* A layer that lacks a source: that source contributes 0 there (cat: no block; linear: left out of
  the sums, as PEFT skips it; svd: no term). The cat rank is then the sum over the sources present.
* Weights are finite numbers ``>= 0``: negative weights (task negation) are refused so that a sign
  error cannot silently subtract an adapter; NaN / inf are refused.
* ``rank`` (svd only; a ``ValueError`` for cat / linear, whose rank is fixed by the sources): default
  the largest source rank over the layers: ``A.shape[0]`` for LoRA-family sources (``Adapter.product_pairs``:
  LoRA, DoRA, BoRA; PEFT's ``max(r)``), the numerical rank of ``ΔW_i`` for other methods (what a LoRA
  needs to hold it exactly).
* Base-dependent sources (DoRA / BoRA norms, Bone, i.e. MiSS's Bat): ``ΔW_i`` is taken at the current base
  weight, so the LoRA is exact for this base only (as :func:`loraplex.to_lora`); PiSSA / OLoRA sources:
  ``ΔW_i = s B A``, relative to the residual base they sit on, like every adapter on that layer.
* Convolutions and embeddings: the same code, in the ``(out, in)`` matrix layout (``Adapter.matrix``, as
  :func:`loraplex.to_lora`): "svd" sums ``w_i ΔW_i`` as matrices (a convolution's ``(out, in_channels ·
  prod(kernel))``, an embedding's ``(dim, num)``); "cat" and "linear" act on LoRA's stored ``A (r, in)``,
  ``B (out, r)``, which are PEFT's ``lora_A`` kernel ``(r, in_channels, *kernel)`` flattened and ``lora_B``
  ``(out, r, 1, 1)`` flattened (or ``lora_embedding_A`` ``(r, num)``, ``lora_embedding_B`` ``(dim, r)``). So
  "cat" concatenates the ``lora_A`` kernels along their out channels and the ``lora_B`` 1x1 kernels along
  their in channels, exactly as PEFT's ``add_weighted_adapter``. All sources on a layer share its root, so
  its kernel, stride, padding and dilation. Decision: PEFT's "svd" reshapes only ``Conv2d`` updates (a
  ``Conv1d``'s 3-D update goes to a batched SVD there); here every convolution is flattened, so ``B A``
  is the best rank-``k`` approximation for ``Conv1d`` too.
* cat / linear take only sources with one ``Adapter.factor_pairs`` pair (plain LoRA, any init); DoRA /
  BoRA have A and B but their ``ΔW`` is not ``s B A`` (no factor pairs): use "svd". Adapters that are
  no weight update (the bottleneck adapter) are refused by every method.

Example:
    >>> import torch, loraplex
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = loraplex.adapt(nn.Sequential(nn.Linear(6, 5)), "lora", rank=2, name="a")
    >>> model = loraplex.adapt(model, "loha", rank=2, name="b")
    >>> for _, ad in loraplex.adapters(model):
    ...     for _, p in ad.own_parameters():
    ...         _ = p.data.add_(0.3)
    >>> report = combine(model, {"a": 0.7, "b": 0.3}, name="ab", method="svd", rank=5)
    >>> report.layers[0].rank, report.max_error < 1e-5
    (5, True)
    >>> loraplex.activate(model, "ab") is model
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from loraplex.adapter import Adapter, check_choice, restoring, root_layer
from loraplex.convert import check_lora_layer, truncate
from loraplex.inject import NAME_RE, add_trained, bind_options, build, layers
from loraplex.linalg import numerical_rank
from loraplex.named import adapter_names

COMBINATIONS = ("svd", "linear", "cat")


@dataclass(frozen=True)
class LayerCombination:
    """One layer of the new adapter: its ``rank`` and ``error = ‖B A - Σ w_i ΔW_i‖_F / ‖Σ w_i ΔW_i‖_F``
    (0 when both are 0, inf when only the target is 0)."""

    layer: str
    rank: int
    error: float


@dataclass(frozen=True)
class CombineReport:
    """What :func:`combine` built: the new adapter's name, the method, the weights and one entry per layer."""

    name: str
    method: str
    weights: dict[str, float]
    layers: tuple[LayerCombination, ...]

    @property
    def max_error(self) -> float:
        return max(c.error for c in self.layers)

    @property
    def mean_error(self) -> float:
        return sum(c.error for c in self.layers) / len(self.layers)


def check_weights(weights: Any, known: list[str]) -> dict[str, float]:
    """``weights`` as ``{name: float}``: known adapter names, finite numbers ``>= 0``, at least one."""
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"weights={weights!r} must be a non-empty dict {{adapter name: weight}}")
    out = {}
    for n, w in weights.items():
        if n not in known:
            raise ValueError(f"weights names {n!r}, which is not an adapter of the model; its adapters are {known}")
        if isinstance(w, bool) or not isinstance(w, int | float) or not (math.isfinite(w) and w >= 0):
            raise ValueError(f"weight {w!r} of adapter {n!r} must be a finite number >= 0")
        out[n] = float(w)
    return out


def is_plain_lora(a: Adapter) -> bool:
    """Whether ``ΔW = s B A`` exactly with one pair (LoRA, any init): ``Adapter.factor_pairs`` declares it."""
    return len(a.factor_pairs()) == 1


def cat_factors(terms: list[tuple[float, Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """PEFT's "cat": ``A = cat(w_i s_i A_i)`` (Σr, in), ``B = cat(B_i)`` (out, Σr); ``B A = Σ w_i s_i B_i A_i``.

    ``terms``: ``(w_i, A_i (r_i, in), B_i (out, r_i), s_i)``.

    >>> one, two = (2.0, torch.ones(1, 3), torch.ones(2, 1), 0.5), (1.0, torch.ones(2, 3), torch.ones(2, 2), 1.0)
    >>> A, B = cat_factors([one, two])
    >>> tuple(A.shape), tuple(B.shape), (B @ A)[0, 0].item()
    ((3, 3), (2, 3), 3.0)
    """
    A = torch.cat([w * s * A_i.float() for w, A_i, _, s in terms], dim=0)
    B = torch.cat([B_i.float() for _, _, B_i, _ in terms], dim=1)
    return A, B


def linear_factors(terms: list[tuple[float, Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """PEFT's "linear": ``A = Σ √(w_i s_i) A_i``, ``B = Σ √(w_i s_i) B_i`` (one rank r; not ``Σ w ΔW`` in general).

    A negative ``c = w s`` (a negative LoRA scale) puts its sign on ``A``, as PEFT does.

    >>> A, B = linear_factors([(4.0, torch.ones(1, 2), torch.ones(3, 1), 1.0)])
    >>> (B @ A)[0, 0].item()  # one source: exactly w s B A
    4.0
    """
    ranks = {A_i.shape[0] for _, A_i, _, _ in terms}
    if len(ranks) != 1:
        raise ValueError(f"method='linear' needs LoRA sources of one rank, not ranks {sorted(ranks)}; use 'cat'")
    A = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * A_i.float() for w, A_i, _, s in terms)
    B = sum(math.sqrt(abs(w * s)) * B_i.float() for w, _, B_i, s in terms)
    assert isinstance(A, Tensor) and isinstance(B, Tensor)
    return A, B


def factors(a: Adapter) -> tuple[Tensor, Tensor, float]:
    """``(A (r, in), B (out, r), s)`` of an adapter with one factor pair (``is_plain_lora``)."""
    ((A, B, s),) = a.factor_pairs()
    return A.detach(), B.detach(), float(s)


def relative_error(approx: Tensor, target: Tensor) -> float:
    """``‖approx - target‖_F / ‖target‖_F`` in float64 (0 when both are 0, inf when only ``target`` is)."""
    diff = float((approx.double() - target.double()).norm())
    norm = float(target.double().norm())
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / norm


def source_rank(a: Adapter) -> int:
    """A source's rank for the svd default: ``Σ A.shape[0]`` over the ``Adapter.product_pairs`` of LoRA-family
    sources (LoRA, DoRA, BoRA), else ``rank(ΔW)`` (>= 1)."""
    if pairs := a.product_pairs():
        return sum(int(A.shape[0]) for A, _, _ in pairs)
    return max(1, numerical_rank(a.matrix(a.delta_weight().detach())))


def _sources(model: nn.Module, weights: dict[str, float]) -> dict[str, tuple[nn.Module, list[tuple[float, Adapter]]]]:
    """``layer -> (top of the stack, [(w_i, source adapter)] in the order of weights)`` where any source sits."""
    out = {}
    for where, top in layers(model).items():
        by_name = {a.name: a for a in Adapter.stack(top)}
        found = [(w, by_name[n]) for n, w in weights.items() if n in by_name]
        if found:
            out[where] = (top, found)
    return out


def _check_sources(plan: dict[str, tuple[nn.Module, list[tuple[float, Adapter]]]], method: str) -> None:
    for where, (top, found) in plan.items():
        check_lora_layer(where, root_layer(top))
        for _, a in found:
            if not a.weight_update:
                raise ValueError(
                    f"layer {where!r}: adapter {a.name!r} ({a.method!r}) is not a weight update: no ΔW to combine"
                )
            if method != "svd" and not is_plain_lora(a):
                raise ValueError(
                    f"layer {where!r}: method={method!r} combines LoRA factors, and adapter {a.name!r} is a "
                    f"{a.method!r} adapter whose ΔW is not s B A; use method='svd'"
                )
            if not torch.isfinite(a.delta_weight()).all():
                raise ValueError(f"layer {where!r}: adapter {a.name!r} ({a.method}) has a ΔW with NaN or inf")


@torch.no_grad()
def combine(
    model: nn.Module,
    weights: dict[str, float],
    name: str,
    method: str = "svd",
    rank: int | None = None,
) -> CombineReport:
    """Add an adapter ``name`` (a plain LoRA) whose ``ΔW`` is the weighted sum ``Σ w_i ΔW_i`` of the adapters
    named in ``weights``, on every layer one of them sits, in place (see the module docstring for the three
    methods, their equations and every decision). The new adapter is **inactive**; the sources stay.

    Args:
        model: a model carrying the adapters named in ``weights``.
        weights: ``{adapter name: weight}``, weights finite and ``>= 0``.
        name: the new adapter's name (letters, digits, ``_``, ``-``; not one the model has).
        method: ``"svd"`` (any weight-update methods, truncated to ``rank``), ``"linear"`` (PEFT's, LoRA
            sources of one rank; not exact), ``"cat"`` (exact, LoRA sources).
        rank: svd only; default the largest source rank (module docstring), clamped per layer to
            ``min(in, out)``.

    Returns:
        A :class:`CombineReport`: per layer the rank and the relative error against ``Σ w_i ΔW_i``.

    Raises:
        ValueError: unknown names, weights that are negative, NaN or not numbers, a ``name`` that exists or
            is malformed, an unknown method, ``rank`` for cat / linear or not an integer >= 1, sources that
            are no weight update, non-LoRA sources for cat / linear, different ranks for linear, a ΔW with
            NaN or inf. Every check runs first: on error the model is unchanged.
    """
    known = adapter_names(model)
    w = check_weights(weights, known)
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"name={name!r} must be letters, digits, '_' or '-'")
    if name in known:
        raise ValueError(f"name={name!r} is already an adapter of the model; its adapters are {known}")
    check_choice("method", method, COMBINATIONS)
    if rank is not None:
        if method != "svd":
            raise ValueError(f"rank={rank!r} applies to method='svd' only: the {method} rank is set by the sources")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank!r} must be an integer >= 1")
    plan = _sources(model, w)
    _check_sources(plan, method)
    if method == "svd" and rank is None:
        rank = max(source_rank(a) for _, found in plan.values() for _, a in found)
    built: list[tuple[str, nn.Module, Tensor, Tensor]] = []
    report: list[LayerCombination] = []
    for where, (top, found) in plan.items():
        target = sum(wi * a.matrix(a.delta_weight().detach()).double() for wi, a in found)  # (out, in)
        assert isinstance(target, Tensor)
        if method == "svd":
            assert rank is not None
            A, B, _, _ = truncate(target, rank, None)
        else:
            terms = [(wi, *factors(a)) for wi, a in found]
            try:
                A, B = (cat_factors if method == "cat" else linear_factors)(terms)
            except ValueError as e:
                raise ValueError(f"layer {where!r}: {e}") from e
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"layer {where!r}: the combined factors hold NaN or inf; model left unchanged")
        built.append((where, top, A, B))
        report.append(LayerCombination(where, int(A.shape[0]), relative_error(B.double() @ A.double(), target)))
    for where, top, A, B in built:
        k = int(A.shape[0])
        with restoring():  # no init: the factors are copied in
            lora = build("lora", top, bind_options("lora", {"rank": k, "alpha": float(k)}), name, where)
        ((lora_A, lora_B, _),) = lora.factor_pairs()
        lora_A.copy_(A)
        lora_B.copy_(B)
        lora.active = False
        model.set_submodule(where, lora)
    add_trained(model, [])  # refreeze: the new factors train, everything else as before
    return CombineReport(name, method, w, tuple(report))
