"""The adapter contract shared by every method, and the small helpers built on it.

An adapter is an ``nn.Module`` that owns the frozen layer it adapts as ``self.base`` (an
``nn.Linear``, transformers' ``Conv1D``, or another adapter when several are stacked on one layer)
and adds its own effect to the base output. Every method implements three things:

* ``forward(x)``: the adapted output; ``self.active`` False means "behave as the base".
* ``delta_weight()``: ΔW in the ``(out, in)`` layout, such that ``base(x) + x @ ΔW.T`` equals
  ``forward(x)``. Merging, export and analysis are built on it and on nothing else. On a
  convolution or an embedding (methods that declare them in ``layer_kinds``) ΔW is in the layer's
  own weight layout (``weight_of``: ``(out, in, *kernel)``, ``(num, dim)``) and ``forward(x)`` is
  the layer run with weight ``W + ΔW``.
* ``num_params(in_features, out_features, **options)``: the documented trainable-parameter formula.

Optional, declared capabilities (default: none; consumers ask for them, never for attribute names):

* ``factor_pairs()``: ``(A, B, scale)`` pairs with ``ΔW = Σ scale · B @ A`` exactly (LoRA); LoRA-Pro,
  GoRA, combine's cat / linear and ``to_lora`` rely on it.
* ``factor_blocks()``: the same as terms LoRA-Pro can step, GraLoRA's block grid included.
* ``product_pairs()``: ``(A, B, scale)`` that the adapter uses only through ``scale · B @ A`` (LoRA,
  DoRA, BoRA); LoRA+ gives their ``B`` its fast rate, hot-swap pads their rank.
* ``reads_base_weight``: ΔW depends on the root weight (DoRA, BoRA, Bone, the bottleneck adapter);
  ``merge_named`` / ``remove`` refuse to change the base weight under such an adapter.
* ``rank_axes()``: the parameters and axes along which ΔW is a sum of rank components (AdaLoRA, ElaLoRA,
  ARD-LoRA); the allocators mask, prune and grow along them.
* ``layer_kinds``: the layer kinds the method adapts (``check_layer`` refuses the others).

tests/test_factor_pairs.py checks every registered method's factor claims numerically, the property matrix
(tests/test_properties.py) the others.

Stacked adapters add up: each adapter's effect is taken relative to the innermost (root) layer's
weight, never relative to the output of the adapter below it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loraplex.options import Option, validate

_serial = itertools.count()
_restoring: ContextVar[bool] = ContextVar("loraplex_restoring", default=False)


@contextlib.contextmanager
def restoring() -> Iterator[None]:
    """Inside this block adapters are built for loading: no data-dependent init, base untouched."""
    token = _restoring.set(True)
    try:
        yield
    finally:
        _restoring.reset(token)


def is_restoring() -> bool:
    return _restoring.get()


def _conv1d_type() -> type | None:
    # A model holding a Conv1D has imported transformers already; never import it ourselves.
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_conv1d(layer: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``: ``y = x @ W + b`` with ``W`` of shape ``(in, out)``."""
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(layer, conv1d)


def is_linear(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or is_conv1d(layer)


KINDS = ("linear", "conv", "embedding")


def is_conv(layer: nn.Module) -> bool:
    """``nn.Conv1d`` or ``nn.Conv2d`` (not transformers' ``Conv1D``, which is a linear layer)."""
    return isinstance(layer, nn.Conv1d | nn.Conv2d)


def layer_kind(layer: nn.Module) -> str | None:
    """``"linear"`` (``nn.Linear``, ``Conv1D``), ``"conv"`` (``nn.Conv1d``, ``nn.Conv2d``), ``"embedding"``, or None."""
    if is_linear(layer):
        return "linear"
    if is_conv(layer):
        return "conv"
    if isinstance(layer, nn.Embedding):
        return "embedding"
    return None


def is_adaptable(layer: nn.Module) -> bool:
    """A layer some method can adapt: linear, convolution or embedding (see ``layer_kind``)."""
    return layer_kind(layer) is not None


def root_layer(layer: nn.Module) -> nn.Module:
    """The innermost linear layer under a stack of adapters."""
    while isinstance(layer, Adapter):
        layer = layer.base
    return layer


def weight_of(layer: nn.Module) -> Tensor:
    """The weight in the layout of ``delta_weight()`` (merging adds the two).

    Linear: ``(out, in)`` (a view for ``Conv1D``); convolution: its own ``(out, in, *kernel)``;
    embedding: its own ``(num_embeddings, embedding_dim)``.
    """
    w = layer.weight
    assert isinstance(w, Tensor)
    return w.T if is_conv1d(layer) else w


def linear_sizes(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a layer or of the layer under an adapter.

    Convolutions: ``in = in_channels · prod(kernel_size)``, ``out = out_channels`` (the weight as an
    ``(out, in)`` matrix, as PEFT's LoHa / LoKr); embeddings: ``in = num_embeddings``,
    ``out = embedding_dim`` (PEFT's ``lora_embedding_A`` is ``(r, num)``, ``lora_embedding_B`` ``(dim, r)``).
    """
    root = root_layer(layer)
    w = root.weight
    assert isinstance(w, Tensor)
    if isinstance(root, nn.Embedding):
        return w.shape[0], w.shape[1]
    if is_conv(root):
        return math.prod(w.shape[1:]), w.shape[0]
    w = weight_of(root)
    return w.shape[1], w.shape[0]


def check_layer(root: nn.Module, method: str, kinds: tuple[str, ...]) -> str:
    """The kind of ``root`` (see ``layer_kind``) when ``method`` adapts it, else a ``ValueError``.

    Convolutions must have ``groups=1`` (a grouped weight is not one ``(out, in·k)`` matrix);
    embeddings must have ``max_norm=None`` (its renormalisation rewrites the weight in place, so
    ``W + ΔW`` would not describe the layer).
    """
    kind = layer_kind(root)
    name = type(root).__name__
    if kind is None:
        raise ValueError(
            f"can only adapt nn.Linear, transformers' Conv1D, nn.Conv1d, nn.Conv2d or nn.Embedding layers, not {name}"
        )
    if kind not in kinds:
        raise ValueError(f"method {method!r} cannot adapt {name} layers (it adapts {' and '.join(kinds)} layers)")
    if kind == "conv" and root.groups != 1:
        raise ValueError(f"{name} with groups={root.groups} must have groups=1 to be adapted by {method!r}")
    if kind == "embedding" and root.max_norm is not None:
        raise ValueError(f"nn.Embedding with max_norm={root.max_norm!r} must have max_norm=None to be adapted")
    return kind


def check_int(name: str, value: Any, *, low: int = 1) -> int:
    """Validate an integer option; ``low`` is the smallest allowed value (through ``options.validate``)."""
    validate({name: Option("int", None, "", low=low)}, {name: value})
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    validate({name: Option("choice", None, "", choices=choices)}, {name: value})
    return value


def check_fraction(name: str, value: Any) -> float:
    """A number in ``(0, 1]`` (an energy, a ratio of parameters kept)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{name}={value!r} must be a number in (0, 1]")
    return float(value)


def check_nonnegative(name: str, value: Any) -> float:
    """A finite number ``>= 0`` (a penalty weight, a threshold)."""
    validate({name: Option("float", None, "", nonneg=True)}, {name: value})
    return float(value)


def nonfinite_counts(tensor: Tensor) -> tuple[int, int]:
    """``(number of NaN, number of ±inf)`` entries of ``tensor``."""
    nan = int(torch.isnan(tensor).sum())
    return nan, int((~torch.isfinite(tensor)).sum()) - nan


def check_finite(where: str, what: str, tensor: Tensor, why: str) -> None:
    """A ``ValueError`` when ``tensor`` holds NaN or inf: ``"{where} has non-finite {what} (n NaN, m inf); {why}"``.

    ``where`` names the caller and the layer (``"compress: layer 'fc1'"``), ``what`` the tensor (``"weights"``),
    ``why`` the method that needs finite values; used to refuse before a decomposition (whose LAPACK error would
    not say which layer) and before any layer of the model is changed.
    """
    if tensor.is_floating_point() or tensor.is_complex():
        if not bool(torch.isfinite(tensor).all()):
            nan, inf = nonfinite_counts(tensor)
            raise ValueError(f"{where} has non-finite {what} ({nan} NaN, {inf} inf); {why}")


def check_dropout(value: Any) -> float:
    validate({"dropout": Option("prob", None, "")}, {"dropout": value})
    return float(value)


class Adapter(nn.Module):
    """Base class of every adapter layer (see the module docstring for the contract).

    Args:
        base: the layer to adapt: ``nn.Linear``, transformers' ``Conv1D``, or an adapter.
    """

    method: ClassVar[str]  # registry name
    # False for adapters whose effect is not a weight update (the serial bottleneck adapter):
    # they have no delta_weight() and merge refuses them.
    weight_update: ClassVar[bool] = True
    paper: ClassVar[str]  # URL of the paper
    formula: ClassVar[str]  # trainable parameters, in words; num_params computes it
    default_lr: ClassVar[float]  # AdamW learning rate used when the user gives none
    size_option: ClassVar[str | None] = None  # the option that sets the parameter count (compare's budget)
    # Declared options (loraplex/options.py): the keyword options of __init__, validated by ``validate``.
    declared_options: ClassVar[dict[str, Option]] = {}

    # The layer kinds a method adapts ("linear", "conv", "embedding"). Read from the class's own
    # namespace only (``supported_kinds``): a subclass whose forward is linear-only must not inherit
    # its parent's convolution support silently.
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    @classmethod
    def supported_kinds(cls) -> tuple[str, ...]:
        """``layer_kinds`` as the class itself declares it; ``("linear",)`` when it does not."""
        kinds = cls.__dict__.get("layer_kinds", ("linear",))
        assert isinstance(kinds, tuple)
        return kinds

    @classmethod
    def check_base(cls, base: nn.Module, options: dict[str, Any]) -> None:
        """A ``ValueError`` when ``options`` cannot adapt ``base``, found without changing it (default: none).

        ``adapt`` calls it on every targeted layer before building any adapter, so that a refusal leaves the
        model exactly as it was (an init that rewrites the base weight, PiSSA's, would otherwise have to be
        rolled back); a method's constructor may call it too.
        """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        root = root_layer(base)
        self.kind = check_layer(root, getattr(self, "method", type(self).__name__), self.supported_kinds())
        root.requires_grad_(False)
        self.base = base
        self.name = "default"
        self.active = True
        self.options: dict[str, Any] = {}
        self.serial = next(_serial)
        self.in_features, self.out_features = linear_sizes(base)
        self.transposed = is_conv1d(root)  # Conv1D keeps its weight as (in, out)

    @staticmethod
    def stack(layer: nn.Module) -> list[Adapter]:
        """The adapters stacked on ``layer``'s root, outermost first (empty for a plain layer)."""
        out = []
        while isinstance(layer, Adapter):
            out.append(layer)
            layer = layer.base
        return out

    @property
    def root(self) -> nn.Module:
        return root_layer(self.base)

    @property
    def weight(self) -> Tensor:
        """The frozen root weight as an ``(out, in)`` matrix (a view: convolutions flattened, embeddings transposed)."""
        w = self.root.weight
        assert isinstance(w, Tensor)
        if self.kind == "conv":
            return w.flatten(1)
        return w.T if self.transposed or self.kind == "embedding" else w

    @property
    def root_weight(self) -> Tensor:
        """The frozen root weight in its own layout (``Conv1D``: ``(in, out)``; convolution: ``(out, in, *kernel)``)."""
        w = self.root.weight
        assert isinstance(w, Tensor)
        return w

    def layout(self, delta: Tensor) -> Tensor:
        """An ``(out, in)`` matrix in the root layer's weight layout (``weight_of``): what ``delta_weight`` returns.

        Linear: unchanged; convolution: reshaped to ``(out, in_channels, *kernel)``; embedding:
        transposed to ``(num_embeddings, embedding_dim)``.
        """
        if self.kind == "conv":
            return delta.reshape(self.root_weight.shape)
        return delta.T if self.kind == "embedding" else delta

    def matrix(self, delta: Tensor) -> Tensor:
        """The inverse of ``layout``: a ``delta_weight()`` (the root's layout) as the ``(out, in)`` matrix."""
        if self.kind == "conv":
            return delta.reshape(delta.shape[0], -1)
        return delta.T if self.kind == "embedding" else delta

    def per_output(self, v: Tensor) -> Tensor:
        """A per-output-channel vector ``(out,)`` shaped to broadcast over this layer's output."""
        if self.kind == "conv":
            return v.view(-1, *[1] * (self.root_weight.dim() - 2))  # channels before the spatial dims
        return v

    def apply_weight(self, x: Tensor, delta: Tensor) -> Tensor:
        """The root layer's operation with weight ``delta`` (its layout) and no bias, in ``delta``'s dtype."""
        root = self.root
        if self.kind == "conv":
            conv = root._conv_forward
            assert callable(conv)
            return conv(x.to(delta.dtype), delta, None)
        if self.kind == "embedding":
            return embed(root, x, delta)
        return F.linear(x.to(delta.dtype), delta)

    @property
    def bias(self) -> Tensor | None:
        """The frozen root bias, ``(out,)``, or None."""
        b = self.root.bias
        assert b is None or isinstance(b, Tensor)
        return b

    @property
    def stacked(self) -> bool:
        """True when this adapter sits on top of another adapter."""
        return isinstance(self.base, Adapter)

    @property
    def param_device(self) -> torch.device:
        return self.weight.device

    def own_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This adapter's parameters, without those of the layer it wraps."""
        for name, p in self.named_parameters():
            if not name.startswith("base."):
                yield name, p

    def own_state_dict(self) -> dict[str, Tensor]:
        """This adapter's tensors (parameters and persistent buffers), without the wrapped layer's."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    @classmethod
    def num_params(cls, in_features: int, out_features: int, **options: Any) -> int:
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        raise NotImplementedError

    # Declared capabilities: consumers (LoRA-Pro, LoRA+, GoRA, hot-swap, combine) ask for these and never
    # guess from attribute names (Kronecker's ``s kron(B, A)`` and ARD-LoRA's gated ``B diag(m) A`` have
    # an ``A``, a ``B`` and a ``scale`` too). tests/test_factor_pairs.py checks every registered method's claim.

    def factor_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
        """``[(A (r, in), B (out, r), scale), ...]`` with ``delta_weight()`` exactly ``Σ scale · B @ A``.

        In the ``(out, in)`` matrix layout (``matrix(delta_weight())``); empty (the default) claims nothing.
        Declared by LoRA (any init: PiSSA / OLoRA's ``ΔW`` is ``s B A`` relative to their residual base),
        not by DoRA / BoRA (rescaled), Kronecker, ARD-LoRA, AdaLoRA, GraLoRA (see ``factor_blocks``).
        """
        return []

    def factor_blocks(self) -> list[tuple[nn.Parameter, nn.Parameter, float, int]]:
        """``[(A, B, scale, k), ...]`` with ``delta_weight()`` exactly the sum of the terms' updates.

        ``k = 0``: a pair of ``factor_pairs``, update ``scale · B @ A``; ``k > 0``: a GraLoRA grid
        (``blocks_A (k, in / k, r)``, ``blocks_B (k, r, out / k)``), update ``scale · block_delta(A, B)``.
        Default: ``factor_pairs`` with ``k = 0``. LoRA-Pro steps these terms.
        """
        return [(A, B, s, 0) for A, B, s in self.factor_pairs()]

    def product_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
        """``[(A (r, in), B (out, r), scale), ...]`` such that the adapter uses ``A`` and ``B`` only through
        the product ``scale · B @ A`` (any ``(A', B')`` with the same product gives the same layer).

        A weaker claim than ``factor_pairs`` (its default): DoRA / BoRA rescale ``W + s B A`` but declare it.
        LoRA+ gives these ``B`` its fast learning rate; hot-swap zero-pads their rank.
        """
        return self.factor_pairs()

    # Declared: the decomposition whose factors this adapter's parameters are, so that ``delta_weight()`` can
    # be fitted to a target weight (``loraplex.decompose.fit_adapter`` keeps one fitter per name, and
    # ``init_from_weight`` / ``init_from_gradient`` fit the adapters that declare one). None (the default):
    # the method cannot be fitted. Declared by LoHa ("hadamard"), LoKr ("kronecker"), LoKH
    # ("kronecker_hadamard"); tests/test_decompose.py checks every registered method's claim numerically.
    fit_structure: ClassVar[str | None] = None

    # Declared: ΔW (or, for an adapter that is no weight update, its effect) reads the root layer's weight, so
    # that changing that weight changes the adapter's effect (DoRA / BoRA: a norm of W0 + s B A; Bone: W0's
    # blocks times T; the serial bottleneck adapter acts on the layer output). Merging another adapter into
    # the base, or giving a residual back to it, would change theirs (``merge_named`` / ``remove`` refuse).
    # The property matrix probes every registered method's claim numerically (test_reads_base_weight_is_declared).
    reads_base_weight: ClassVar[bool] = False

    def rank_axes(self) -> dict[str, int]:
        """``{own parameter name: axis}``: the parameters whose slices along ``axis`` are the rank components.

        Every declared axis has the current rank ``r`` as its length, and ``delta_weight()`` is a sum over
        ``k < r`` of terms each of which reads only slice ``k`` of the declared parameters (and is linear in
        nothing else of them): zeroing slice ``k`` of every declared parameter removes exactly that term, so
        ``ΔW = ΔW(slice k zeroed) + ΔW(all slices but k zeroed)``. Rank allocators mask, prune and grow along
        these axes. Empty (the default) claims nothing. Declared by AdaLoRA and ElaLoRA (``P``, ``Λ``, ``Q`` as
        ``B``, ``E``, ``A``) and ARD-LoRA with one head (``A``, ``B``; with several heads component ``j`` is
        row ``h r0 + j`` of ``A`` for every head ``h``, not one axis). tests/test_properties.py checks it.
        """
        return {}

    def reads_residual_base(self) -> bool:
        """True when the adapter's init rewrote the frozen base weight (PiSSA / OLoRA's ``W0 - s B0 A0``).

        Such an adapter is only meaningful with that residual base, which a hot-swap does not write; default
        False. Declared by LoRA with a data-driven init.
        """
        return False

    # HuggingFace PEFT interop (optional): PEFT's name for the method, and the tensor names under a
    # layer in its checkpoints (the first one marks the adapted layers).
    peft_type: ClassVar[str | None] = None
    peft_keys: ClassVar[tuple[str, ...]] = ()
    peft_patterns: ClassVar[dict[str, str]] = {}  # config key -> PEFT's per-layer pattern field

    def to_peft(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """This layer's PEFT config values and tensors (by ``peft_keys``).

        The tensors are views of this adapter's parameters, so that the default ``load_peft`` can
        copy into them; a method whose export converts (PiSSA's rank-2r LoRA) overrides both.
        """
        raise NotImplementedError(f"{self.method} has no HuggingFace PEFT equivalent")

    @classmethod
    def peft_matches(cls, config: dict[str, Any]) -> bool:
        """Whether a PEFT config of ``peft_type`` describes this method (LoRA vs DoRA, MiSS vs Bone)."""
        return True

    @classmethod
    def peft_options(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
        """Options for one layer from PEFT's config (patterns resolved) and that layer's tensors."""
        raise NotImplementedError(f"{cls.method} has no HuggingFace PEFT equivalent")

    @torch.no_grad()
    def load_peft(self, tensors: dict[str, Tensor]) -> None:
        """Copy one layer's PEFT tensors in; a missing or misshapen tensor is a ``ValueError``."""
        for key, mine in self.to_peft()[1].items():
            got = tensors.get(key)
            if got is None or got.shape != mine.shape:
                shape = None if got is None else tuple(got.shape)
                raise ValueError(f"PEFT tensor {key!r} has shape {shape}, expected {tuple(mine.shape)}")
            mine.copy_(got)

    def advance(self, steps: int) -> None:
        """Called after every optimizer step (``loraplex.advance``); schedules such as SingLoRA's ramp use it."""

    def on_load(self) -> None:
        """Called once after a checkpoint's tensors were loaded into this adapter."""

    def release(self) -> nn.Module:
        """Return the wrapped layer as it was before this adapter (used by ``unload``)."""
        return self.base

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"name={self.name!r}, in={self.in_features}, out={self.out_features}, {opts}"


def embed(layer: nn.Module, ids: Tensor, table: Tensor) -> Tensor:
    """``F.embedding(ids, table)`` with ``layer``'s ``padding_idx`` and gradient options (as PEFT's ``_embed``)."""
    return F.embedding(
        ids,
        table,
        padding_idx=layer.padding_idx,  # type: ignore[arg-type]
        scale_grad_by_freq=bool(layer.scale_grad_by_freq),
        sparse=bool(layer.sparse),
    )
