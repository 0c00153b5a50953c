"""Any weight-update adapter turned into a plain LoRA by truncated SVD of its effective update.

Serving engines (vLLM, LoRAX, S-LoRA) accept only plain LoRA; :func:`to_lora` rewrites every
adapter of a model as one, so that :func:`loraplex.export_peft` can write it for them.

**The update factored.** For a layer with root weight ``W`` (as the adapters see it) and adapters
``a_1 .. a_m`` (innermost first), the layer computes ``W_eff = W + Σ_i ΔW_i`` with ``ΔW_i =
a_i.delta_weight()``. Methods that rewrite the base weight at init (LoRA's PiSSA and OLoRA inits,
``W = W0 - s B0 A0``) give it back in ``release()``. To stay generic the conversion computes every
``ΔW_i`` first, then releases the adapters outermost first and adds to ``ΔW_i`` whatever its
``release()`` changed in the root weight: ``ΔW_i' = ΔW_i + (W_before_release_i - W_after_release_i)``.
So ``Σ_i ΔW_i' = W_eff - W0``: the new LoRAs are relative to the *original* base weight ``W0`` (the one
HuggingFace PEFT loads), and the converted model computes what the adapted model computed.

**Truncation** (Eckart–Young–Mirsky). ``ΔW' = U Σ Vᵀ`` (thin SVD, float64 on the CPU, float32 on
accelerators: :func:`loraplex.compression.layers.svd`); rank ``k`` keeps ``B = U_k Σ_k^½`` (out, k) and
``A = Σ_k^½ V_kᵀ`` (k, in) (:func:`~loraplex.linalg.split_factors`, the even split TRP and
Cuttlefish use), with ``alpha = k`` so the LoRA scale is 1 and ``delta_weight() = B A = ΔW'_k``, the best
rank-``k`` approximation. Its relative error ``‖ΔW' - ΔW'_k‖_F / ‖ΔW'‖_F = sqrt(Σ_{i>k} σ_i² / Σ σ_i²)``
(:func:`loraplex.linalg.tail_error`; 0 for ``ΔW' = 0``) is what the report gives per layer.
``energy=e`` picks the least ``k`` with ``Σ_{i<=k} σ_i² >= e · Σ σ_i²``
(:func:`~loraplex.linalg.energy_rank`); singular values below ``4 · eps(ΔW'.dtype) · ‖ΔW'‖_F``
count as 0 (the tolerance of :mod:`loraplex.linalg`), so ``energy=1.0`` keeps the numerical rank.

**Base-dependent methods.** For DoRA-like methods (``dora``, ``bora``: a magnitude times a normalised
``W0 + BA``) and Bone-like ones (``bone``, PEFT's MiSS with ``init_weights="bat"``:
``ΔW_ij = W_ij T_i + T_i``; any method whose ``delta_weight`` reads ``W0``), ``ΔW'`` *includes the
base-dependent part*: the LoRA is exact for this base weight only. Put on another base (a re-quantised
or updated ``W0``) it does not reproduce what the original method would compute there, and further
training of it is plain LoRA training. Such updates are usually of full rank (the table of
``benchmarks/results/to_lora_minilm.md``), so their truncation errors are large.

Decisions (not pinned down by the issue; each is tested in ``tests/test_to_lora.py``):

* Several adapters on one layer: one LoRA per adapter, keeping its name, its place in the stack and
  its ``active`` flag; ``ΔW_i'`` as above, so their sum is the layer's whole update. Reason: the names
  stay meaningful (``export_peft(model, d, name="a")``, activation and removal by name keep working).
* ``rank`` larger than ``min(in, out)`` of a layer: clamped to ``min(in, out)`` (lossless there), so
  one ``rank`` serves layers of different sizes; the report gives the rank actually kept.
* A zero ``ΔW'``: error 0. ``rank=k`` keeps ``min(k, in, out)`` columns; ``energy`` would select
  ``k = 0``, and a LoRA has rank >= 1, so it keeps rank 1. The factors are ``B = 0`` and ``A`` the
  leading right singular vectors (orthonormal rows), so ``ΔW = 0`` exactly while ``B`` still gets
  gradients (LoRA's own init has ``B = 0`` too). ``delta_rank`` in the report is then 0.
* ``rank=k`` keeps ``min(k, in, out)`` columns even when ``ΔW'`` has a lower numerical rank (the extra
  singular values are ~0): a uniform rank gives one PEFT ``r`` and fixed shapes. Use ``energy=1.0``
  for the numerical rank.
* The new LoRA has no dropout (``dropout=0``; the adapter is meant for serving) and keeps fp32 factors
  (every loraplex adapter does), on the root layer's device.
* An adapter that is not a weight update (the serial bottleneck ``adapter``) has no ``ΔW``: a
  ``ValueError`` names the layer, and so does a ``ΔW`` with NaN or inf; the model is checked before
  anything changes, so it is left unchanged.
* Convolutions and embeddings (one mechanism for every method): ``ΔW_i`` is taken in the ``(out, in)``
  matrix layout (``Adapter.matrix``, the inverse of ``Adapter.layout``; the root weight as the view
  ``Adapter.weight``): a convolution's ``(out, in_channels, *kernel)`` flattened to ``(out, in_channels ·
  prod(kernel))``, an embedding's ``(num, dim)`` transposed to ``(dim, num)``. The truncation and the
  new LoRA's ``A (k, in)``, ``B (out, k)`` are then those of a linear layer, and loraplex's LoRA on that
  root reads them as PEFT's conv LoRA (``A`` a convolution with the root's kernel, stride, padding and
  dilation, ``B`` a 1x1 convolution) or embedding LoRA (``lora_embedding_A`` ``(k, num)``,
  ``lora_embedding_B`` ``(dim, k)``), with ``delta_weight() = layout(B A)``. ``rank`` is clamped to
  ``min(in, out)`` of that matrix. ``export_peft`` writes the result, except for a dilated or
  non-zero-padded convolution, which PEFT's LoRA cannot express (``LoRA.to_peft`` refuses it). A root
  LoRA cannot adapt (a grouped convolution) is a ``ValueError`` naming the layer.
* Conv1D (GPT-2) layers: ``delta_weight`` is ``(out, in)`` for them too; the LoRA on a Conv1D exports
  with ``fan_in_fan_out=True``.

Example:
    >>> import torch, loraplex
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = loraplex.adapt(nn.Sequential(nn.Linear(8, 6)), "loha", rank=2)
    >>> with torch.no_grad():
    ...     for _, p in loraplex.adapters(model)[0][1].own_parameters():
    ...         _ = p.add_(0.3)
    >>> x = torch.randn(3, 8)
    >>> y = model(x)
    >>> report = loraplex.to_lora(model, rank=6)
    >>> [(r.layer, r.name, r.method, r.rank) for r in report.layers]
    [('0', 'default', 'loha', 6)]
    >>> loraplex.adapters(model)[0][1].method, torch.allclose(model(x), y, atol=1e-5)
    ('lora', True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from loraplex.adapter import Adapter, check_fraction, check_layer, restoring, root_layer
from loraplex.adapters.lora import LoRA
from loraplex.inject import add_trained, bind_options, build, layers
from loraplex.linalg import default_rtol, energy_rank, numerical_rank, singular_values, split_factors, svd, tail_error


@dataclass(frozen=True)
class LayerConversion:
    """One converted adapter: ``rank`` of the new LoRA, ``delta_rank`` the numerical rank of its ``ΔW'``,
    ``error = ‖ΔW' - ΔW'_rank‖_F / ‖ΔW'‖_F`` (0 for ``ΔW' = 0``), ``method`` the method it replaced;
    ``in_features`` / ``out_features`` those of the ``(out, in)`` matrix (convolution: ``in_channels ·
    prod(kernel)``, ``out_channels``; embedding: ``num_embeddings``, ``embedding_dim``)."""

    layer: str
    name: str
    method: str
    in_features: int
    out_features: int
    rank: int
    delta_rank: int
    error: float


@dataclass(frozen=True)
class LoraReport:
    """What :func:`to_lora` did: one entry per (layer, adapter name), innermost adapter first."""

    layers: tuple[LayerConversion, ...]
    rank: int | None
    energy: float | None

    @property
    def mean_error(self) -> float:
        return sum(c.error for c in self.layers) / len(self.layers)

    @property
    def max_error(self) -> float:
        return max(c.error for c in self.layers)

    @property
    def params(self) -> int:
        """Parameters of the new LoRAs, ``Σ rank · (in + out)``."""
        return sum(c.rank * (c.in_features + c.out_features) for c in self.layers)

    def summary(self) -> str:
        """One line: how many adapters, the ranks kept, the mean and max relative error."""
        target = f"rank={self.rank}" if self.rank is not None else f"energy={self.energy}"
        ranks = [c.rank for c in self.layers]
        methods = ", ".join(sorted({c.method for c in self.layers}))
        return (
            f"to_lora({target}): {len(self.layers)} adapters ({methods}) -> LoRA ranks {min(ranks)}..{max(ranks)}, "
            f"{self.params} params; relative error mean {self.mean_error:.4g}, max {self.max_error:.4g}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the target, the per-layer entries and the summary numbers."""
        return {
            "rank": self.rank,
            "energy": self.energy,
            "mean_error": self.mean_error,
            "max_error": self.max_error,
            "params": self.params,
            "layers": [asdict(c) for c in self.layers],
        }


def check_target(rank: Any, energy: Any) -> tuple[int | None, float | None]:
    """Exactly one of ``rank`` (an integer >= 1) and ``energy`` (a number in ``(0, 1]``)."""
    if (rank is None) == (energy is None):
        raise ValueError(f"give exactly one of rank and energy, not rank={rank!r} and energy={energy!r}")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank!r} must be an integer >= 1")
        return rank, None
    return None, check_fraction("energy", energy)


def truncate(delta: Tensor, rank: int | None, energy: float | None) -> tuple[Tensor, Tensor, int, float]:
    """LoRA factors of ``delta`` (out, in): ``(A (k, in), B (out, k), delta_rank, error)`` with ``B @ A ≈ delta``.

    ``k = min(rank, in, out)``, or the energy rank (at least 1); see the module docstring.

    >>> A, B, r, err = truncate(torch.diag(torch.tensor([4.0, 3.0, 0.0])), rank=1, energy=None)
    >>> tuple(A.shape), tuple(B.shape), r, err  # error 3 / 5
    ((1, 3), (3, 1), 2, 0.6)
    """
    u, s, vh = svd(delta)  # (out, n), (n,), (n, in); float64 on the CPU
    spectrum = singular_values(s, rtol=default_rtol(delta.dtype))  # rounding noise of delta's dtype set to 0
    n = s.numel()
    k = min(rank, n) if rank is not None else max(1, energy_rank(spectrum, energy if energy is not None else 1.0))
    B, A = split_factors(u, s, vh, k)
    if spectrum[0] == 0:  # ΔW = 0: B = 0 and orthonormal A, so B still gets gradients
        A, B = vh[:k].clone(), torch.zeros_like(B)
    return A, B, numerical_rank(spectrum), tail_error(spectrum, k)


def check_lora_layer(where: str, root: nn.Module) -> None:
    """A plain LoRA can sit on ``root`` (a linear, convolution or embedding layer LoRA adapts), else a ``ValueError``
    naming the layer ``where``."""
    try:
        check_layer(root, "lora", LoRA.supported_kinds())
    except ValueError as e:
        raise ValueError(f"layer {where!r}: {e}") from e


def _check(stacks: dict[str, Adapter]) -> None:
    """Refuse before anything changes: adapters that are no weight update, ΔW with NaN or inf."""
    if not stacks:
        raise ValueError("the model has no adapter to convert to LoRA")
    for n, top in stacks.items():
        check_lora_layer(n, root_layer(top))
        for a in Adapter.stack(top):
            if not a.weight_update:
                raise ValueError(
                    f"layer {n!r} carries a {a.method!r} adapter (name {a.name!r}), which is not a weight update "
                    "and has no ΔW to convert to LoRA; model left unchanged"
                )
            if not torch.isfinite(a.delta_weight()).all():
                raise ValueError(f"layer {n!r}: adapter {a.name!r} ({a.method}) has a ΔW with NaN or inf")


def _updates(top: Adapter) -> list[Tensor]:
    """``ΔW_i'`` of the stack as ``(out, in)`` matrices (``Adapter.matrix``), outermost first; releases the stack
    (the root weight is ``W0`` again)."""
    stack = Adapter.stack(top)
    deltas = [a.matrix(a.delta_weight().detach()) for a in stack]  # before any release: they may read W
    dtype = torch.promote_types(deltas[0].dtype, torch.float32)
    W = top.weight  # the root weight as the (out, in) matrix view
    out = []
    for a, d in zip(stack, deltas, strict=True):
        before = W.detach().to(dtype, copy=True)
        a.release()
        out.append(d.to(dtype) + (before - W.detach().to(dtype)))  # + whatever release() gave back
    return out


@torch.no_grad()
def to_lora(model: nn.Module, rank: int | None = None, energy: float | None = None) -> LoraReport:
    """Replace every adapter of ``model`` by a plain LoRA (method ``"lora"``) of its truncated ``ΔW'``, in place.

    Exactly one of ``rank`` (an integer >= 1, clamped per layer to ``min(in, out)``) and ``energy``
    (in ``(0, 1]``: the share of ``Σ σ_i²`` kept) sets the rank. Every adapter keeps its name, its place
    on the layer and its ``active`` flag; the modules trained with the adapters are untouched. The model
    then computes the original model's outputs up to the truncation (exactly, up to rounding, at full
    rank), relative to the original base weight (PiSSA / OLoRA rewrites are undone), so
    ``loraplex.export_peft`` writes it for PEFT and serving engines. For DoRA-like (``dora``, ``bora``)
    and Bone-like (``bone``: MiSS's Bat) methods ``ΔW'`` includes the base-dependent part: see the module
    docstring for this, the equations and every decision.

    Returns a :class:`LoraReport`: per (layer, name) the rank kept and the relative Frobenius error.
    """
    rank, energy = check_target(rank, energy)
    stacks = {n: top for n, top in layers(model).items() if isinstance(top, Adapter)}
    _check(stacks)
    done: list[LayerConversion] = []
    for n, top in stacks.items():
        stack = Adapter.stack(top)
        updates = _updates(top)
        layer: nn.Module = root_layer(top)
        for a, delta in zip(reversed(stack), reversed(updates), strict=True):  # innermost first
            A, B, delta_rank, error = truncate(delta, rank, energy)
            k = A.shape[0]
            with restoring():  # no init: the factors are copied in
                lora = build("lora", layer, bind_options("lora", {"rank": k, "alpha": float(k)}), a.name, n)
            ((lora_A, lora_B, _),) = lora.factor_pairs()
            lora_A.copy_(A)
            lora_B.copy_(B)
            lora.active = a.active
            done.append(LayerConversion(n, a.name, a.method, a.in_features, a.out_features, k, delta_rank, error))
            layer = lora
        model.set_submodule(n, layer)
    add_trained(model, [])  # refreeze: the new factors train, everything else as before
    return LoraReport(tuple(done), rank, energy)
