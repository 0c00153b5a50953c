"""LoRD: one-shot low-rank decomposition of a model's linear layers (Kaushal, Vaidhya, Rish 2023).

Paper: https://arxiv.org/abs/2309.14021. Each targeted linear layer ``y = W x + b``
(``W`` of shape ``(out, in)``) becomes two, ``y = W1 (W2 x) + b'`` with ``W1 (out, r)``,
``W2 (r, in)``, without retraining (:class:`~loraplex.compression.layers.LowRankLinear`). A layer is
replaced only where ``r (in + out) < in * out``, i.e. where that saves parameters.

The paper does not say how the factors are found (methods.md §13: "not pinned down"); both
candidates are offered:

* ``method="svd"`` (default): truncated SVD of the weight, ``W1 = U_r Σ_r^½``, ``W2 = Σ_r^½ V_rᵀ``,
  ``b' = b``. By Eckart–Young this is the best rank-``r`` weight in Frobenius norm; the error is
  ``sqrt(Σ_{i>r} σ_i²)``. The rank is chosen from the spectrum ``σ_i²``.
* ``method="activation"``: principal components of the layer's *outputs* on calibration data.
  With ``μ``, ``Σ_x`` the mean and covariance of the layer inputs, the output covariance is
  ``C = W Σ_x Wᵀ``; with ``U_r`` its top-``r`` eigenvectors and ``P = U_r U_rᵀ``:
  ``W1 = U_r``, ``W2 = U_rᵀ W``, ``b' = P b + (I - P) ȳ`` where ``ȳ = W μ + b``. So
  ``ŷ = ȳ + P (y - ȳ)``, the best rank-``r`` affine reconstruction of the outputs (PCA): its
  expected squared error is the eigenvalue tail ``Σ_{i>r} λ_i``, and the rank is chosen from ``λ``.
  Statistics come from one pass of the calibration batches through the *original* model
  (every layer sees uncompressed inputs); padded positions count like any other token.

Two alternatives from Jun Lu's survey (https://arxiv.org/abs/2408.05883), with ``ratio`` only:
``method="kronecker"`` (``W ≈ Σ_t A_t ⊗ B_t``, the nearest Kronecker sum) and ``method="hadamard"``
(``W ≈ (W1 Z1) ⊙ (W2 Z2)`` by alternating least squares), see :mod:`loraplex.decompose.layers`.
The four are registered, with their requirements, in ``COMPRESSION_METHODS`` (``plan`` and the CLI's
``--method`` choices and help read it).

Rank selection (exactly one of; see :mod:`loraplex.compression.allocate`): ``rank`` (an int for
every layer, or ``{layer name: rank}``), ``energy`` (keep that fraction of each layer's spectral
energy), ``ratio`` (keep that fraction of the targeted weight parameters, spread across layers to
minimise the sum of the relative errors ``||W - Ŵ||_F / ||W||_F`` that :func:`plan` reports;
``allocation="uniform"``: that fraction of every layer).

SVD solver: ``solver="auto"`` computes the full thin SVD (LAPACK, float64 on CPU), except when
the rank is given up front and small (``rank + oversample <= min(in, out) / 8``): then the
randomized range finder (Halko, Martinsson, Tropp 2011; ``torch.svd_lowrank`` with 8 extra
columns and 4 power iterations) is used. Measured on MiniLM's weights (``benchmarks/lord.py``,
whose spectra are nearly flat, the hard case): 3.2-5.8x faster at ranks 8-32 with a relative
error at most 0.3 % above the exact truncation's; at rank 96 it is only 1.06-1.27x faster and
0.7 % worse, so ``auto`` keeps the full SVD there. On decaying spectra the two agree to 1e-6.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from loraplex.adapter import check_finite, check_fraction, is_linear, weight_of
from loraplex.compression.allocate import DENSE, LayerSpectrum, by_energy, by_rank, by_ratio, by_uniform_ratio
from loraplex.compression.layers import LowRankLinear
from loraplex.inject import Targets, resolve
from loraplex.linalg import split_factors, svd

SOLVERS = ("auto", "full", "randomized")
ALLOCATIONS = ("error", "uniform")
# Hadamard ALS iterations per layer in compress: each costs ~4 GEMMs of out x in x r² (about 1.9 s for a
# 1536 x 384 layer at r1 = 76, r2 = 77 on one CPU thread); at 15 it already beats SVD at 25-50 % of the
# weights on MiniLM (benchmarks/results/decompositions_minilm.md).
HADAMARD_ITERS = 15
OVERSAMPLE, POWER_ITERS = 8, 4


@dataclass(frozen=True)
class CompressionMethod:
    """A compression method's declared requirements (``plan`` / ``compress`` and the CLI read them).

    ``calibrated``: its basis is the PCA of the layer outputs on calibration batches (which it needs);
    ``structured``: it replaces the layer by ``loraplex.decompose.LAYERS[name]`` (``ratio=`` only, with
    ``layer_options`` for its ``from_linear``), else by a ``LowRankLinear``; ``solvers``: the SVD solvers it takes.
    """

    description: str
    calibrated: bool = False
    structured: bool = False
    solvers: tuple[str, ...] = ("auto", "full")
    layer_options: tuple[tuple[str, Any], ...] = ()  # passed to the structured layer's ``from_linear``


# name -> method: the one registry of compression methods.
COMPRESSION_METHODS: dict[str, CompressionMethod] = {
    "svd": CompressionMethod("weight SVD (Eckart-Young truncation; randomized for small ranks)", solvers=SOLVERS),
    "activation": CompressionMethod("output PCA on calibration data (LoRD)", calibrated=True),
    "kronecker": CompressionMethod("the survey's nearest Kronecker sum (ratio only)", structured=True),
    "hadamard": CompressionMethod(
        "the survey's Hadamard product by ALS (ratio only)",
        structured=True,
        layer_options=(("max_iter", HADAMARD_ITERS),),
    ),
}
METHODS = tuple(COMPRESSION_METHODS)
STRUCTURED = tuple(m for m, c in COMPRESSION_METHODS.items() if c.structured)


@dataclass
class InputStats:
    """Running first and second moments of a layer's inputs (float64)."""

    count: int
    total: Tensor  # (in,)
    outer: Tensor  # (in, in)
    nan: Tensor | int = 0  # NaN entries among the inputs seen
    inf: Tensor | int = 0  # ±inf entries among the inputs seen

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        mean = self.total / self.count
        return mean, self.outer / self.count - torch.outer(mean, mean)


@dataclass(frozen=True)
class Choice:
    """What :func:`compress` did to one layer."""

    name: str
    in_features: int
    out_features: int
    rank: int  # of a low-rank layer; DENSE (-1) when the layer was kept or given another structure
    params_before: int
    params_after: int
    relative_error: float  # ||W - Ŵ||_F / ||W||_F; activation: sqrt(output tail / total); 0 when kept
    kind: str = "lowrank"  # "dense" (kept), "lowrank", "kronecker", "hadamard"
    options: dict[str, int] | None = None  # the kronecker / hadamard layer's options


def _check_linear_target(model: nn.Module, name: str) -> nn.Module:
    layer = model.get_submodule(name)
    if not is_linear(layer):
        raise ValueError(f"layer {name!r} is a {type(layer).__name__}: compress targets linear layers only")
    return layer


def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, tuple | list):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def input_stats(model: nn.Module, names: list[str], calibration: Iterable[Any]) -> dict[str, InputStats]:
    """Input moments of the named layers over ``calibration`` batches (dicts -> ``model(**b)``, tuples, tensors)."""
    stats: dict[str, InputStats] = {}
    hooks = []

    def hook(name: str, in_features: int) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, in_features).double()
            s = stats.get(name)
            if s is None:
                z = x.new_zeros
                s = stats[name] = InputStats(0, z(in_features), z(in_features, in_features))
            nan = torch.isnan(x).sum()  # counted without a device sync; checked after the pass
            s.nan, s.inf = s.nan + nan, s.inf + (~torch.isfinite(x)).sum() - nan
            s.count += x.shape[0]
            s.total += x.sum(0)
            s.outer += x.T @ x

        return fn

    for name in names:
        layer = model.get_submodule(name)
        hooks.append(layer.register_forward_pre_hook(hook(name, weight_of(layer).shape[1])))
    was_training = model.training
    model.eval()
    try:
        for batch in calibration:
            _run(model, batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [n for n in names if n not in stats]
    if missing:
        raise ValueError(f"calibration never reached layer(s) {missing[:3]}: pass batches the model runs through them")
    for name in names:  # module order: the first one named is where the non-finite values start
        s = stats[name]
        nan, inf = int(s.nan), int(s.inf)
        if nan or inf or not bool(torch.isfinite(s.outer).all() and torch.isfinite(s.total).all()):
            raise ValueError(
                f"compress: the calibration activations reaching layer {name!r} are non-finite ({nan} NaN, {inf} inf "
                f'among {s.count * s.total.numel()} input values); method="activation" needs finite calibration data '
                "(check the batches, and the layers before this one)"
            )
    return stats


def weight_energies(w: Tensor) -> Tensor:
    """``σ_i²`` of ``w``, descending: eigenvalues of the smaller Gram matrix in float64.

    Several times faster than ``svdvals``; the absolute error (~1e-16 σ_max²) does not matter
    for choosing ranks, and the factors themselves always come from an SVD.
    """
    x = w.detach().double().cpu()
    gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def output_basis(w: Tensor, stats: InputStats) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, ``min(in, out)`` of them, clipped at 0) and eigenvectors of ``C = W Σ_x Wᵀ``."""
    w64 = w.detach().double().cpu()
    _, cov = stats.mean_cov()
    c = w64 @ cov.cpu() @ w64.T
    vals, vecs = torch.linalg.eigh((c + c.T) / 2)
    k = min(w.shape)
    return vals.flip(0)[:k].clamp_min(0), vecs.flip(1)[:, :k]


def activation_factors(
    w: Tensor, b: Tensor | None, stats: InputStats, vecs: Tensor, rank: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(W1, W2, b')`` of the activation-aware decomposition at ``rank`` (see the module docstring)."""
    w64 = w.detach().double().cpu()
    u = vecs[:, :rank]
    mean, _ = stats.mean_cov()
    b64 = b.detach().double().cpu() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    y_mean = w64 @ mean.cpu() + b64
    bias = u @ (u.T @ b64) + y_mean - u @ (u.T @ y_mean)
    return u, u.T @ w64, bias


def randomized_factors(w: Tensor, rank: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors from the randomized SVD (``OVERSAMPLE`` extra columns, ``POWER_ITERS`` iterations)."""
    x = w.detach().double() if w.device.type == "cpu" else w.detach().float()
    q = min(rank + OVERSAMPLE, *x.shape)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(x, q=q, niter=POWER_ITERS)
    return split_factors(u, s, v.T, rank)


def _use_randomized(solver: str, rank: int | dict[str, int] | None, shape: tuple[int, int]) -> bool:
    if solver != "auto":
        return solver == "randomized"
    return isinstance(rank, int) and (rank + OVERSAMPLE) * 8 <= min(shape)


def _check_args(rank: Any, energy: Any, ratio: Any, method: str, solver: str, calibration: Any) -> None:
    given = [k for k, v in (("rank", rank), ("energy", energy), ("ratio", ratio)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of rank, energy, ratio (got {', '.join(given) or 'none'})")
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {', '.join(METHODS)}")
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} must be one of {', '.join(SOLVERS)}")
    spec = COMPRESSION_METHODS[method]
    if spec.calibrated and calibration is None:
        raise ValueError(f'method="{method}" needs calibration batches (calibration=...)')
    if solver not in spec.solvers:
        takers = " or ".join(f'method="{m}"' for m, c in COMPRESSION_METHODS.items() if solver in c.solvers)
        raise ValueError(f'solver="{solver}" applies to {takers} only')
    if spec.structured and ratio is None:
        raise ValueError(f'method="{method}" takes ratio= (the fraction of each layer\'s weights kept)')


def _check_rank_names(rank: Any, names: list[str]) -> None:
    """A rank dict may only name targeted layers (a misspelt name would silently keep the layer dense)."""
    if not isinstance(rank, dict):
        return
    unknown = [k for k in rank if k not in names]
    if unknown:
        raise ValueError(
            f"compress: rank names {len(unknown)} layer(s) that are not targeted linear layers of the model: "
            f"{', '.join(map(repr, unknown[:3]))}; targeted: {', '.join(map(repr, names[:8]))}"
            f"{', ...' if len(names) > 8 else ''}"
        )


def plan(
    model: nn.Module,
    *,
    targets: Targets = "all-linear",
    exclude: Targets | None = None,
    rank: int | dict[str, int] | None = None,
    energy: float | None = None,
    ratio: float | None = None,
    method: str = "svd",
    calibration: Iterable[Any] | None = None,
    solver: str = "auto",
    allocation: str = "error",
) -> list[Choice]:
    """Compress the model in place and return what was done per layer (:func:`compress` returns the model)."""
    _check_args(rank, energy, ratio, method, solver, calibration)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r} must be one of {', '.join(ALLOCATIONS)}")
    names = resolve(model, targets, exclude)
    for n in names:
        _check_linear_target(model, n)
    _check_rank_names(rank, names)
    spec = COMPRESSION_METHODS[method]
    for n in names:  # every layer before any is changed: a LAPACK error would not name the layer
        layer = model.get_submodule(n)
        why = f'method="{method}" needs finite values'
        check_finite(f"compress: layer {n!r}", "weights", weight_of(layer), why)
        if spec.calibrated and (b := _bias(layer)) is not None:  # b' = P b + (I - P) ȳ
            check_finite(f"compress: layer {n!r}", "bias", b, why)
    if spec.structured:
        assert ratio is not None
        return [structured(model, n, method, ratio) for n in names]
    stats = input_stats(model, names, calibration) if calibration is not None and spec.calibrated else {}
    spectra, bases = [], {}
    for n in names:
        w = weight_of(model.get_submodule(n))
        if spec.calibrated:
            vals, vecs = output_basis(w, stats[n])
            bases[n] = vecs
            energies = vals.numpy()
        elif rank is not None and not isinstance(rank, dict):
            energies = np.zeros(min(w.shape))  # not needed to choose: skip the spectrum
        else:
            energies = weight_energies(w).numpy()
        spectra.append(LayerSpectrum(n, w.shape[1], w.shape[0], energies))
    if ratio is not None:
        ranks = (by_ratio if allocation == "error" else by_uniform_ratio)(spectra, ratio)
    elif energy is not None:
        ranks = by_energy(spectra, energy)
    else:
        assert rank is not None
        ranks = by_rank(spectra, rank)
    choices = []
    for s in spectra:
        k = ranks[s.name]
        layer = model.get_submodule(s.name)
        err = 0.0
        if k != DENSE:
            w, b = weight_of(layer), _bias(layer)
            if spec.calibrated:
                up, down, bias = activation_factors(w, b, stats[s.name], bases[s.name], k)
            elif _use_randomized(solver, rank, (w.shape[0], w.shape[1])):
                up, down = randomized_factors(w, k)
                bias = None
            else:
                up, down = split_factors(*svd(w), k)
                bias = None
            if spec.calibrated:
                err = float(s.relative_errors()[k])
            else:
                w64 = w.detach().to(up.dtype)
                err = float(torch.linalg.norm(w64 - up @ down) / torch.linalg.norm(w64).clamp_min(1e-300))
            model.set_submodule(s.name, _lowrank(layer, w, k, up, down, bias))
        kind = "dense" if k == DENSE else "lowrank"
        choices.append(Choice(s.name, s.in_features, s.out_features, k, s.dense_params, s.params(k), err, kind))
    return choices


def structured(model: nn.Module, name: str, method: str, ratio: float) -> Choice:
    """Replace one layer by the largest Kronecker / Hadamard layer within ``ratio`` of its weights.

    Decision: these fits are iterative (Hadamard ALS) or need one SVD per factor shape (Kronecker),
    so the ratio is applied to every layer alike instead of being spread by error as for the SVD;
    a layer whose smallest candidate does not fit is kept dense. Among candidates of the same size
    (Kronecker: ``A`` of shape ``(out_l, in_m)`` or ``(out_k, in_n)``) the one with the least error wins.
    """
    from loraplex.decompose.layers import LAYERS, candidates

    check_fraction("ratio", ratio)
    layer = model.get_submodule(name)
    if not isinstance(layer, nn.Linear):
        raise ValueError(f'layer {name!r} is a {type(layer).__name__}: method="{method}" takes nn.Linear layers')
    out, inp = layer.out_features, layer.in_features
    cls = LAYERS[method]
    fits = [o for o in candidates(method, inp, out) if cls.num_params(inp, out, **o) <= ratio * inp * out]
    if not fits:
        return Choice(name, inp, out, DENSE, inp * out, inp * out, 0.0, "dense")
    size = cls.num_params(inp, out, **fits[-1])
    w = layer.weight.detach().double()
    best: tuple[float, nn.Module, dict[str, int]] | None = None
    for opts in (o for o in fits if cls.num_params(inp, out, **o) == size):  # equal size: keep the best fit
        new = cls.from_linear(layer, **opts, **dict(COMPRESSION_METHODS[method].layer_options))
        with torch.no_grad():
            err = float(torch.linalg.norm(w - new.dense_weight().double()) / torch.linalg.norm(w).clamp_min(1e-300))
        if best is None or err < best[0]:
            best = (err, new, opts)
    assert best is not None
    model.set_submodule(name, best[1])
    return Choice(name, inp, out, DENSE, inp * out, size, best[0], method, best[2])


def _bias(layer: nn.Module) -> Tensor | None:
    b = getattr(layer, "bias", None)
    return b if isinstance(b, Tensor) else None


def _lowrank(layer: nn.Module, w: Tensor, rank: int, up: Tensor, down: Tensor, bias: Tensor | None) -> LowRankLinear:
    out, inp = w.shape
    bias = bias if bias is not None else _bias(layer)
    new = LowRankLinear(inp, out, rank, bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.up.weight.copy_(up)
        new.down.weight.copy_(down)
        if bias is not None and new.up.bias is not None:
            new.up.bias.copy_(bias)
    return new.train(layer.training).requires_grad_(w.requires_grad)


def compress(
    model: nn.Module,
    *,
    targets: Targets = "all-linear",
    exclude: Targets | None = None,
    rank: int | dict[str, int] | None = None,
    energy: float | None = None,
    ratio: float | None = None,
    method: str = "svd",
    calibration: Iterable[Any] | None = None,
    solver: str = "auto",
    allocation: str = "error",
) -> nn.Module:
    """Replace the targeted linear layers by low-rank ones (in place) where that saves parameters.

    ``targets`` / ``exclude``: as :func:`loraplex.adapt` (``"all-linear"`` skips output heads).
    Exactly one of ``rank``, ``energy``, ``ratio``; ``method`` ``"svd"`` or ``"activation"`` (with
    ``calibration``: an iterable of batches, each a dict of model keyword arguments, a tuple of
    positional arguments, or one tensor). Returns ``model``; :func:`plan` returns the per-layer report.
    Refused with a ``ValueError`` naming the layer, before any layer is changed: NaN / inf weights (and, for
    ``"activation"``, biases or calibration activations), a rank below 1, a rank dict naming an untargeted layer.

    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> model = compress(model, targets=["0"], rank=4)
    >>> model[0]
    LowRankLinear(
      in_features=64, out_features=64, rank=4
      (down): Linear(in_features=64, out_features=4, bias=False)
      (up): Linear(in_features=4, out_features=64, bias=True)
    )
    """
    plan(
        model,
        targets=targets,
        exclude=exclude,
        rank=rank,
        energy=energy,
        ratio=ratio,
        method=method,
        calibration=calibration,
        solver=solver,
        allocation=allocation,
    )
    return model


def timed_plan(model: nn.Module, **kw: Any) -> tuple[list[Choice], float]:
    """:func:`plan` and the seconds it took."""
    start = time.perf_counter()
    choices = plan(model, **kw)
    return choices, time.perf_counter() - start
