"""Data-driven initialisation of LoHa / LoKr / LoKH adapters by their own decompositions.

Jun Lu's survey (https://arxiv.org/abs/2408.05883) pairs each structured adapter with a decomposition; here
each adapter's factors are set so that ``delta_weight() ≈ target`` in least squares, with the matching
solver (``s = alpha / rank`` is each adapter's scale, the fit is of ``target / s``):

* LoHa, ``ΔW = s (w1_a w1_b) ⊙ (w2_a w2_b)``: ``hadamard_als`` at ranks ``(r, r)`` (``restarts`` starts).
* LoKr, ``ΔW = s kron(w1, w2)``: the nearest Kronecker product; a factored ``w1 = w1_a w1_b`` or
  ``w2 = w2_a w2_b`` (rank r) limits that factor's rank, solved by ``kronecker_ranked`` and split by SVD.
* LoKH, ``ΔW = s kron(W1, (B1 A1) ⊙ (B2 A2))``: from the nearest Kronecker term, alternate ``W1`` (exact least
  squares given ``H``: ``mat(R vec(H)) / ‖H‖²``) and ``H`` (``hadamard_als`` of ``mat(Rᵀ vec(W1)) / ‖W1‖²``,
  the same isotropic argument as ``kronecker_ranked``), ``outer = 3`` rounds.

Model helpers: ``init_from_weight`` (PiSSA-style: ΔW fitted to the frozen ``W0``; with ``residual`` the base
becomes ``W0 - ΔW`` so the model's outputs are unchanged) and ``init_from_gradient`` (ΔW fitted to one
gradient-descent step ``-c G``, GoRA / LoRA-GA style, W0 unchanged so the model is the one-step-updated
model; the gradient pass is GoRA's ``average_gradients``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from loraplex.adapter import Adapter
from loraplex.adapters import METHODS as ADAPTER_METHODS
from loraplex.adapters.loha import LoHa
from loraplex.adapters.lokh import LoKH
from loraplex.adapters.lokr import LoKr
from loraplex.decompose.hadamard import hadamard_als
from loraplex.decompose.kronecker import kronecker_ranked, nearest_kronecker, rearrange
from loraplex.inject import adapters
from loraplex.linalg import svd_factors
from loraplex.options import Option, validate
from loraplex.rank.gora import average_gradients


@torch.no_grad()
def _set(p: nn.Parameter | None, value: Tensor) -> None:
    assert p is not None
    p.copy_(value.to(device=p.device, dtype=p.dtype))


def _even(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``(A c, B / c)`` with equal norms: the same ``kron(A, B)``."""
    na, nb = float(A.norm()), float(B.norm())
    if na == 0.0 or nb == 0.0:
        return A, B
    c = (nb / na) ** 0.5
    return A * c, B / c


def _fit_loha(a: LoHa, T: Tensor, restarts: int) -> None:
    W1, Z1, W2, Z2 = hadamard_als(T, a.rank, a.rank, restarts=restarts).factors
    for p, v in ((a.w1_a, W1), (a.w1_b, Z1), (a.w2_a, W2), (a.w2_b, Z2)):
        _set(p, v)


def _set_factor(a: LoKr, name: str, M: Tensor) -> None:
    if getattr(a, name) is not None:
        _set(getattr(a, name), M)
    else:
        up, down = svd_factors(M, min(a.rank, *M.shape))
        r = up.shape[1]  # a rank above min(M.shape) pads with zeros
        _set(getattr(a, f"{name}_a"), torch.cat([up, up.new_zeros(M.shape[0], a.rank - r)], 1))
        _set(getattr(a, f"{name}_b"), torch.cat([down, down.new_zeros(a.rank - r, M.shape[1])], 0))


def _fit_lokr(a: LoKr, T: Tensor) -> None:
    sh = a.shapes
    fit = kronecker_ranked(T, (sh.out_l, sh.in_m), None if sh.full_w1 else a.rank, None if sh.full_w2 else a.rank)
    A, B = _even(*fit.factors)
    _set_factor(a, "w1", A)
    _set_factor(a, "w2", B)


def _fit_lokh(a: LoKH, T: Tensor, restarts: int, outer: int = 3) -> None:
    a_shape = tuple(a.W1.shape)
    R = rearrange(T, a_shape)  # type: ignore[arg-type]
    _, B0, _ = nearest_kronecker(T, a_shape)  # type: ignore[arg-type]
    target = B0[0]
    W1 = H = None
    for _ in range(outer):
        B1, A1, B2, A2 = hadamard_als(target, a.rank, a.rank, restarts=restarts).factors
        H = (B1 @ A1) * (B2 @ A2)
        W1 = (R @ H.reshape(-1)).reshape(a_shape) / H.pow(2).sum().clamp_min(1e-30)
        target = (W1.reshape(-1) @ R).reshape(H.shape) / W1.pow(2).sum().clamp_min(1e-30)
    assert W1 is not None
    _set(a.W1, W1)
    for p, v in ((a.B1, B1), (a.A1, A1), (a.B2, B2), (a.A2, A2)):
        _set(p, v)


def _fit_lokr_any(a: LoKr, T: Tensor, restarts: int) -> None:
    del restarts  # the nearest (ranked) Kronecker product is solved directly
    _fit_lokr(a, T)


# One fitter per declared ``Adapter.fit_structure``: ``fitter(adapter, target / scale, restarts)`` sets the
# adapter's factors so that ``delta_weight() / scale ≈ target / scale``.
FITTERS: dict[str, Callable[[Any, Tensor, int], None]] = {
    "hadamard": _fit_loha,
    "kronecker": _fit_lokr_any,
    "kronecker_hadamard": _fit_lokh,
}

# The registered methods that declare a fittable structure (``fit_structure`` with a fitter here).
METHODS = tuple(m for m, cls in ADAPTER_METHODS.items() if cls.fit_structure in FITTERS)


def fitter(adapter: Adapter) -> Callable[[Any, Tensor, int], None] | None:
    """The fitter for the adapter's declared ``fit_structure``; None when it declares none (or an unknown one)."""
    kind = type(adapter).fit_structure
    return None if kind is None else FITTERS.get(kind)


def fit_adapter(adapter: Adapter, target: Tensor, *, restarts: int = 3) -> float:
    """Set the factors of an adapter declaring ``fit_structure`` so that ``delta_weight() ≈ target`` (out, in).

    LoHa / LoKr / LoKH declare one; any other adapter is a ``ValueError``.

    The returned value is ``‖ΔW - target‖_F / ‖target‖_F`` (0 for a zero target that is met). ``restarts``:
    Hadamard ALS starts for LoHa / LoKH (default 3; the problem is not convex, see ``hadamard_als``).
    The fit is computed in float64 on CPU (float32 on accelerators) and copied into the fp32 parameters.
    """
    fit = fitter(adapter)
    if fit is None:
        raise ValueError(f"fit_adapter handles {', '.join(METHODS)} adapters, not {adapter.method!r}")
    shape = (adapter.out_features, adapter.in_features)
    if not isinstance(target, Tensor) or tuple(target.shape) != shape:
        got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"target of shape {got} must be the adapter's (out, in) = {shape}")
    scale = float(adapter.scale)  # type: ignore[arg-type]
    if scale == 0:
        raise ValueError(f"alpha={adapter.alpha!r} gives the scale 0: no ΔW can be fitted")  # type: ignore[attr-defined]
    T = target.detach().to(torch.float64 if target.device.type == "cpu" else torch.float32) / scale
    fit(adapter, T, restarts)
    with torch.no_grad():
        err = (adapter.delta_weight().double() - target.double()).norm()
        norm = target.double().norm()
    return float(err / norm) if norm > 0 else float(err)


def _fitted(model: nn.Module) -> list[tuple[str, Adapter]]:
    found = [(n, a) for n, a in adapters(model) if fitter(a) is not None]
    if not found:
        raise ValueError(f"the model has no {' / '.join(METHODS)} adapter to initialise")
    return found


RESTARTS = Option("int", 3, "random restarts of LoHa's alternating least squares (the best fit is kept)")
# init_from_weight's and init_from_gradient's keyword options (loraplex/options.py)
WEIGHT_OPTIONS = {"residual": Option("bool", True, "set the base weight to W0 - ΔW"), "restarts": RESTARTS}
GRADIENT_OPTIONS = {
    "scale": Option("float", None, "the step size c (None: relative · ‖W0‖ / ‖G‖)", positive=True, optional=True),
    "relative": Option("float", 1e-2, "the step's size relative to ‖W0‖ when scale is None", positive=True),
    "n_steps": Option("int", None, "gradient pre-pass batches (None: every batch)", optional=True),
    "restarts": RESTARTS,
}


def init_from_weight(model: nn.Module, *, residual: bool = True, restarts: int = 3) -> dict[str, float]:
    """Fit every LoHa / LoKr / LoKH adapter's ΔW to its frozen base weight ``W0``; returns the relative errors.

    ``residual=True`` (default, PiSSA's choice) then sets the base weight to ``W0 - ΔW`` (in its own layout and
    dtype), so the model's outputs are unchanged at init while the adapter holds the structured part of
    ``W0``. With ``residual=False`` the base is untouched (the layer computes ``W0 + ΔW ≈ 2 W0``). Stacked
    adapters on one layer are fitted innermost first, each to the (residual) root weight at its turn.
    Keys: ``"layer name/adapter name"``.
    """
    validate(WEIGHT_OPTIONS, locals())
    errors = {}
    for name, a in _fitted(model):
        errors[f"{name}/{a.name}"] = fit_adapter(a, a.weight.detach().float(), restarts=restarts)
        if residual:
            with torch.no_grad():
                d = a.delta_weight().detach()
                w = a.root.weight
                assert isinstance(w, Tensor)
                w.sub_((d.T if a.transposed else d).to(w.dtype))
    return errors


def init_from_gradient(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None,
    batches: Iterable[Any],
    *,
    scale: float | None = None,
    relative: float = 1e-2,
    n_steps: int | None = None,
    restarts: int = 3,
) -> dict[str, float]:
    """Fit every LoHa / LoKr / LoKH adapter's ΔW to ``-c · G``, ``G`` the mean gradient of the loss in ``W0``.

    ``G = Σ_batches ∂L/∂W0 / n`` by ``loraplex.rank.gora.average_gradients`` (only the adapted root weights
    require grad during the pass; every flag and ``.grad`` is restored; ``loss_fn(model, batch)``, or
    ``model(**batch).loss`` when None). ``W0`` is not changed: the adapted model starts one (structured,
    projected) gradient-descent step away from the base model, as GoRA and LoRA-GA.

    Scale (decision; GoRA's ``lr_g · sqrt(in / r)`` compensates a random projection, which a least-squares
    fit does not have): ``scale`` given is the step size ``c``; ``None`` (default) takes, per layer,
    ``c = relative · ‖W0‖_F / ‖G‖_F`` so that the step moves ``W0`` by ``relative`` (1e-2, 1 %) of its norm
    whatever the loss scale. ``⟨ΔW, G⟩ < 0`` whenever the fit has relative error below 1. Returns the
    relative errors of the fits, keyed ``"layer name/adapter name"``.
    """
    validate(GRADIENT_OPTIONS, locals())
    found = _fitted(model)
    names = sorted({n for n, _ in found})
    G = average_gradients(model, names, batches, loss_fn, n_steps)
    errors = {}
    for name, a in found:
        g = G[name]
        gnorm = float(g.norm())
        if gnorm == 0.0:
            raise ValueError(f"the loss has a zero gradient in layer {name!r}: nothing to fit")
        c = float(scale) if scale is not None else relative * float(a.weight.detach().float().norm()) / gnorm
        errors[f"{name}/{a.name}"] = fit_adapter(a, -c * g, restarts=restarts)
    return errors
