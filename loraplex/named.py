"""Named adapters in one model: activate, disable, merge and remove them by name, mixed-adapter batches, hot-swap.

Several adapters may sit on one layer (a stack, built by ``adapt(..., name=...)``); every function here
finds them by name (:func:`named_layers`, :func:`adapter_names`).

Mixed batches (``mixed_batch``, ``enable_adapter_names``) follow HuggingFace PEFT's
``adapter_names`` argument
(https://huggingface.co/docs/peft/developer_guides/lora#inference-with-different-lora-adapters-in-the-same-batch)
and the multi-tenant serving of S-LoRA (https://arxiv.org/abs/2311.03285) and Punica
(https://arxiv.org/abs/2310.18547), but work for every method, additive or not (DoRA, BoRA, Bone, the serial
bottleneck adapter), by routing rows at the top of each adapted layer's stack.

Hot-swapping (``prepare_hotswap``, ``hotswap``) follows PEFT's ``hotswap_adapter`` and
``prepare_model_for_compiled_hotswap`` (https://huggingface.co/docs/peft/package_reference/hotswap): the
tensors of a loaded adapter are overwritten in place, so a ``torch.compile``'d model keeps its graph.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from loraplex.adapter import Adapter, root_layer, weight_of
from loraplex.adapters.lora import lora_scale
from loraplex.inject import adapters, bind_options, layers
from loraplex.io import SPEC_FILE, TENSOR_FILE, pick_saved, read_matching_tensors, read_spec
from loraplex.spec import AdapterSpec

# Options that never change what an adapter computes in eval mode: a hot-swap ignores them (the model keeps its own).
INFERENCE_NEUTRAL = frozenset({"dropout"})
# LoRA-family options a hot-swap may change: the rank (up to the padding) and the scale (folded into B).
SCALE_OPTIONS = frozenset({"rank", "alpha", "rslora", "init"})


# ---------------------------------------------------------------------------------------------------------------
# By name: several adapters on one layer (a stack), activated, merged, disabled and removed by name.


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the model's adapters, sorted (each once, however many layers carry it)."""
    return sorted({a.name for _, a in adapters(model)})


def named_layers(model: nn.Module, name: str) -> dict[str, tuple[nn.Module, Adapter]]:
    """``layer -> (top of its stack, the adapter called name)``; a ``ValueError`` listing the names when none."""
    found = {n: (top, a) for n, top in layers(model).items() for a in Adapter.stack(top) if a.name == name}
    if not isinstance(name, str) or not found:
        raise ValueError(f"name={name!r} is not an adapter of the model; its adapters are {adapter_names(model)}")
    return found


def activate(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make exactly the adapters called ``names`` active (a name or a list; ``[]``: none), the others inactive.

    Active adapters on one layer add up (each relative to the root weight). Unknown names are a
    ``ValueError`` listing the model's adapters, and leave every flag as it was.
    """
    wanted = [names] if isinstance(names, str) else names
    known = adapter_names(model)
    if not isinstance(wanted, Sequence) or any(not isinstance(n, str) or n not in known for n in wanted):
        raise ValueError(f"names={names!r} must be adapter names of the model; its adapters are {known}")
    for _, a in adapters(model):
        a.active = a.name in wanted
    return model


@torch.no_grad()
def rewrites_base(a: Adapter) -> bool:
    """Whether ``a.release()`` changes the root weight (PiSSA / OLoRA give their residual back); tested on a copy."""
    probe = copy.deepcopy(a)
    W = probe.weight.detach().clone()
    probe.release()
    return not torch.equal(W, probe.weight)


def _detach(model: nn.Module, where: str, top: nn.Module, a: Adapter, below: nn.Module) -> None:
    """Take ``a`` out of the stack ``top`` of layer ``where``: what wrapped it now wraps ``below``."""
    stack = Adapter.stack(top)
    i = next(i for i, s in enumerate(stack) if s is a)
    if i == 0:
        model.set_submodule(where, below)
    else:
        stack[i - 1].base = below


def _blocker(stack: Sequence[Adapter], a: Adapter) -> Adapter | None:
    return next((o for o in stack if o is not a and o.reads_base_weight), None)


def remove(model: nn.Module, name: str) -> nn.Module:
    """Remove the adapters called ``name`` from every layer, wherever they sit in a stack, in place.

    Each is taken out with its ``release()`` (PiSSA / OLoRA put their residual back in the base
    weight) and what wrapped it (the layer's parent, or the adapter above it) then wraps what it
    wrapped. Nothing else in loraplex records per-name state (the spec is recomputed from the modules),
    so no trace is left: the model's ``state_dict``, parameters, buffers, modules, ``requires_grad``
    flags, hooks and outputs are those it had before ``adapt(..., name=name)`` (tested for every
    method). The other adapters keep their outputs.

    Raises:
        ValueError: an unknown ``name`` (the message lists the model's adapters); or an adapter whose
            ``release()`` rewrites the base weight (PiSSA / OLoRA) on a layer where another adapter
            reads that weight (``Adapter.reads_base_weight``: DoRA, BoRA, Bone (Bat), the bottleneck adapter),
            whose output would change. Every check runs first: on error the model is unchanged.
    """
    found = named_layers(model, name)
    for n, (top, a) in found.items():
        other = _blocker(Adapter.stack(top), a) if rewrites_base(a) else None
        if other is not None:
            raise ValueError(
                f"layer {n!r}: removing adapter {name!r} ({a.method}, options {a.options}) gives its residual back "
                f"to the base weight, which the {other.method!r} adapter {other.name!r} on the same layer reads: its "
                "output would change; model left unchanged (remove that adapter first)"
            )
    for n, (top, a) in found.items():
        _detach(model, n, top, a, a.release())
    return model


def merge_named(model: nn.Module, name: str) -> nn.Module:
    """Fold only the adapters called ``name`` into their layers' base weight; the other adapters stay, in place.

    ``W ← W + ΔW_name`` (computed in fp32, written in W's dtype), and the adapter leaves its stack
    without ``release()`` (PiSSA's residual stays merged in: ``W0 - s B0 A0 + s B A``). The layer's output
    is unchanged. Adapters left on the layer whose ``ΔW`` does not read the base weight (LoRA, LoHa, …,
    also PiSSA / OLoRA: their ``s B A`` does not, and their ``release()`` then gives back ``W0`` plus the
    merged ``ΔW``) keep their effect.

    Raises:
        ValueError: an unknown ``name``; a ``name`` adapter that is no weight update; another adapter on
            such a layer that reads the base weight (``Adapter.reads_base_weight``: DoRA / BoRA norms, Bone,
            the bottleneck adapter), whose effect the merge would change (decided: refused
            rather than merged with a changed effect; merge everything with ``merge(model)``); a merged
            weight with NaN or inf. Every check runs first: on error the model is unchanged.
    """
    found = named_layers(model, name)
    for n, (top, a) in found.items():
        if not a.weight_update:
            raise ValueError(
                f"layer {n!r}: adapter {name!r} ({a.method!r}) is not a weight update and cannot be merged; "
                "model left unchanged (loraplex.remove removes it)"
            )
        other = _blocker(Adapter.stack(top), a)
        if other is not None:
            raise ValueError(
                f"layer {n!r}: merging adapter {name!r} changes the base weight, which the {other.method!r} adapter "
                f"{other.name!r} on the same layer reads: its effect would change; model left unchanged (merge "
                "every adapter with merge(model), or remove that one first)"
            )
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for n, (top, a) in found.items():
            W = weight_of(root_layer(top))
            total = W.float() + a.delta_weight().float()
            if not torch.isfinite(total).all():
                raise ValueError(f"merging adapter {name!r} into layer {n!r} gives NaN or inf; model left unchanged")
            merged[n] = total.to(W.dtype)
        for n, (top, a) in found.items():
            weight_of(root_layer(top)).copy_(merged[n])
            _detach(model, n, top, a, a.base)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module, name: str | None = None) -> Iterator[nn.Module]:
    """Inside this block the model computes exactly what its base model computes.

    ``name``: switch off only the adapters called ``name`` (the others keep their ``active`` flag);
    an unknown name is a ``ValueError`` listing the model's adapters.
    """
    found = [a for _, a in adapters(model)] if name is None else [a for _, a in named_layers(model, name).values()]
    before = [a.active for a in found]
    for a in found:
        a.active = False
    try:
        yield model
    finally:
        for a, was in zip(found, before, strict=True):
            a.active = was


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold every adapter into its layer (a plain ``nn.Linear`` / ``Conv1D`` again), in place.

    Refuses, leaving the model unchanged, when a merged weight would hold NaN or inf.
    ``name``: fold only the adapters called ``name`` (see :func:`merge_named`); the others stay.
    """
    if name is not None:
        return merge_named(model, name)
    merged: dict[str, torch.Tensor] = {}
    stacks = {n: layer for n, layer in layers(model).items() if isinstance(layer, Adapter)}
    for n, top in stacks.items():
        for a in Adapter.stack(top):
            if not a.weight_update:
                raise ValueError(
                    f"layer {n!r} carries a {a.method!r} adapter, which is not a weight update and cannot be "
                    "merged; model left unchanged (loraplex.unload removes it)"
                )
    with torch.no_grad():
        for n, top in stacks.items():
            W = weight_of(root_layer(top))
            total = W.float() + sum(a.delta_weight().float() for _, a in adapters(top))
            if not torch.isfinite(total).all():
                raise ValueError(f"merging layer {n!r} gives a weight with NaN or inf; model left unchanged")
            merged[n] = total.to(W.dtype)
        for n, top in stacks.items():
            root = root_layer(top)
            weight_of(root).copy_(merged[n])
            model.set_submodule(n, root)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the model is the base model again."""
    for n, top in list(layers(model).items()):
        layer: nn.Module = top
        while isinstance(layer, Adapter):
            layer = layer.release()
        if layer is not top:
            model.set_submodule(n, layer)
    object.__setattr__(model, "_loraplex_train", [])
    return model


# ---------------------------------------------------------------------------------------------------------------
# Mixed batches


def row_groups(names: Sequence[str | None]) -> dict[str | None, list[int]]:
    """Row indices per adapter name, in order of first appearance.

    Example:
        >>> row_groups(["a", None, "a", "b"])
        {'a': [0, 2], None: [1], 'b': [3]}
    """
    groups: dict[str | None, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n, []).append(i)
    return groups


def scatter_rows(pieces: Sequence[Tensor], rows: Sequence[Sequence[int]]) -> Tensor:
    """Put ``pieces[k]`` back at the rows ``rows[k]`` of one tensor (differentiable; the rows partition ``0..n-1``).

    Shapes: pieces[k] (len(rows[k]), ...) -> (n, ...).

    Example:
        >>> scatter_rows([torch.tensor([10, 12]), torch.tensor([11])], [[0, 2], [1]])
        tensor([10, 11, 12])
    """
    order = torch.tensor([i for r in rows for i in r], device=pieces[0].device)
    return torch.cat(list(pieces))[torch.argsort(order)]


def set_only(stack: Sequence[Adapter], name: str | None) -> None:
    """Make ``name`` the only active adapter of a stack (``None``: none active, the base layer)."""
    for a in stack:
        a.active = a.name == name


class Router(nn.Module):
    """Stand-in for one adapted layer inside ``mixed_batch``: rows grouped by adapter name, one pass per group.

    Each group runs through the layer's whole stack with only its adapter active (``None``: none), so
    the rows get exactly the single-adapter outputs whatever the method; the stack's ``active`` flags
    are restored after each call, also on errors.

    Shapes: x (n, ...) with n = len(names) -> (n, ...out).
    """

    def __init__(self, inner: nn.Module, where: str, names: Sequence[str | None]) -> None:
        super().__init__()
        self.inner = inner
        self.where = where
        self.names = list(names)
        self.groups = row_groups(self.names)
        self.stack = Adapter.stack(inner)

    def forward(self, x: Tensor) -> Tensor:
        n = len(self.names)
        if x.ndim == 0 or x.shape[0] != n:
            raise ValueError(
                f"mixed_batch: layer {self.where!r} got an input of shape {tuple(x.shape)}, whose dim 0 is not the "
                f"batch of len(names)={n} rows (the rows must reach every adapted layer along dim 0)"
            )
        before = [a.active for a in self.stack]
        try:
            if len(self.groups) == 1:
                set_only(self.stack, self.names[0])
                return self.inner(x)
            pieces, rows = [], []
            for name, idx in self.groups.items():
                set_only(self.stack, name)
                pieces.append(self.inner(x[torch.tensor(idx, device=x.device)]))
                rows.append(idx)
            return scatter_rows(pieces, rows)
        finally:
            for a, was in zip(self.stack, before, strict=True):
                a.active = was

    def extra_repr(self) -> str:
        return f"where={self.where!r}, groups={ {k: len(v) for k, v in self.groups.items()} }"


def check_names(model: nn.Module, names: Any) -> list[str | None]:
    """``names`` as a list: one adapter name of the model or ``None`` per row; otherwise a ``ValueError``."""
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) == 0:
        raise ValueError(f"names={names!r} must be a non-empty list with one adapter name (or None) per row")
    known = adapter_names(model)
    for n in names:
        if n is not None and n not in known:
            raise ValueError(f"names contains {n!r}, which is not an adapter of the model; its adapters are {known}")
    return list(names)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside this block, row ``i`` of every batch (dim 0) goes through adapter ``names[i]`` only (``None``: the base).

    Each row's output equals the output of the model with only that adapter active on every layer
    (``None``: the output under ``loraplex.disabled``), for every method: each adapted layer's stack is
    swapped (``model.set_submodule``) for a ``Router`` that runs the stack once per distinct name on
    that name's rows and scatters the results back. The stacks are put back on exit, also when the
    block raises: the model is left as it was (same modules, ``state_dict`` and outputs). Gradients
    flow through the routing, so a mixed batch can also be trained on.

    Decided (PEFT's ``adapter_names`` does the same for LoRA only): the cost is one pass of the
    layer per distinct name on its rows, not one shared base product; modules trained with
    ``adapt(..., train=...)`` (a classifier head) are shared by every row, as they are not adapters.
    Everything between adapted layers must keep rows apart along dim 0 (true of transformers in eval
    mode; batch norm in training mode mixes rows).

    Args:
        model: a model with adapters.
        names: one adapter name of ``model`` or ``None`` per row of the batch.

    Raises:
        ValueError: an unknown name (the message lists the model's adapters), an empty list, or
            (during a forward) an adapted layer whose input's dim 0 is not ``len(names)``.

    Example:
        >>> import loraplex
        >>> model = loraplex.adapt(nn.Sequential(nn.Linear(4, 4)), "lora", rank=2, name="a")
        >>> with mixed_batch(model, ["a", None]):
        ...     model(torch.randn(2, 4)).shape
        torch.Size([2, 4])
        >>> type(model[0]).__name__
        'LoRA'
    """
    rows = check_names(model, names)
    found = {n: top for n, top in layers(model).items() if isinstance(top, Adapter)}
    if any(isinstance(m, Router) for m in model.modules()):
        raise ValueError("mixed_batch blocks cannot be nested: the model is already routing rows by adapter name")
    swapped: list[tuple[str, nn.Module]] = []
    try:
        for where, top in found.items():
            model.set_submodule(where, Router(top, where, rows))
            swapped.append((where, top))
        yield model
    finally:
        for where, layer in reversed(swapped):
            model.set_submodule(where, layer)


class AdapterNamesHandle:
    """The hooks installed by ``enable_adapter_names``; ``remove()`` takes them off."""

    def __init__(self, model: nn.Module, handles: list[Any]) -> None:
        self.model, self.handles = model, handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        if getattr(self.model, "_loraplex_adapter_names", None) is self:
            object.__delattr__(self.model, "_loraplex_adapter_names")


def enable_adapter_names(model: nn.Module) -> AdapterNamesHandle:
    """Let ``model(..., adapter_names=[...])`` run a mixed batch (as ``mixed_batch``) for that call only.

    A forward pre-hook (with kwargs) pops ``adapter_names`` and enters ``mixed_batch``; a forward
    hook with ``always_call=True`` leaves it, also when the forward raises. Calls without
    ``adapter_names`` are untouched. Installing twice returns the first handle.

    Example:
        >>> import loraplex
        >>> model = loraplex.adapt(nn.Sequential(nn.Linear(4, 4)), "lora", rank=2, name="a")
        >>> handle = enable_adapter_names(model)
        >>> model(torch.randn(3, 4), adapter_names=["a", None, "a"]).shape
        torch.Size([3, 4])
        >>> handle.remove()
    """
    existing = getattr(model, "_loraplex_adapter_names", None)
    if isinstance(existing, AdapterNamesHandle):
        return existing
    open_blocks: list[contextlib.ExitStack] = []

    def enter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        names = kwargs.pop("adapter_names", None)
        block = contextlib.ExitStack()
        open_blocks.append(block)  # first: the exit hook pops one entry per call, even if entering fails
        if names is not None:
            block.enter_context(mixed_batch(model, names))
        return args, kwargs

    def leave(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if open_blocks:
            open_blocks.pop().close()

    handle = AdapterNamesHandle(
        model,
        [
            model.register_forward_pre_hook(enter, with_kwargs=True),
            model.register_forward_hook(leave, always_call=True),
        ],
    )
    object.__setattr__(model, "_loraplex_adapter_names", handle)
    return handle


# ---------------------------------------------------------------------------------------------------------------
# Hot-swap


def rank_factors(a: Adapter) -> tuple[str, str] | None:
    """The attribute names of ``(A, B)`` when zero-padding the rank keeps the output, else None.

    That is: one ``Adapter.product_pairs`` pair (``s · B A`` is all the adapter uses of A and B: LoRA,
    DoRA, BoRA), a ``rank`` / ``alpha`` scale (``lora_scale``), and no PiSSA / OLoRA init (whose residual
    ``W0 - s B0 A0`` lives in the base weight).
    """
    pairs = a.product_pairs()
    if len(pairs) != 1 or a.reads_residual_base() or not {"rank", "alpha"} <= set(a.options):
        return None
    names = {id(p): n for n, p in a.own_parameters()}
    A, B, _ = pairs[0]
    keys = names.get(id(A)), names.get(id(B))
    if keys[0] is None or keys[1] is None or "." in keys[0] + keys[1]:
        return None
    return keys[0], keys[1]


def paddable(a: Adapter) -> bool:
    """Whether zero-padding the rank keeps the output (``rank_factors``): LoRA, DoRA, BoRA without PiSSA / OLoRA."""
    return rank_factors(a) is not None


def pad_rank(A: Tensor, B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``A`` (r, in) and ``B`` (out, r) zero-padded to ``rank``: ``B' A' = B A``.

    Example:
        >>> A2, B2 = pad_rank(torch.ones(1, 3), torch.ones(2, 1), 4)
        >>> A2.shape, B2.shape, bool((B2 @ A2 == 1).all())
        (torch.Size([4, 3]), torch.Size([2, 4]), True)
    """
    A2 = A.new_zeros(rank, A.shape[1])
    B2 = B.new_zeros(B.shape[0], rank)
    A2[: A.shape[0]] = A
    B2[:, : B.shape[1]] = B
    return A2, B2


@torch.no_grad()
def prepare_hotswap(model: nn.Module, max_rank: int, *, name: str = "default") -> nn.Module:
    """Zero-pad the LoRA-family adapter ``name`` to rank ``max_rank`` on every layer, so that ``hotswap`` can later
    load any adapter of rank ``<= max_rank`` into it without changing a shape. Call it before ``torch.compile``.

    The output is unchanged (``B' A' = B A`` with zero rows / columns). The adapter's ``options`` get
    ``rank=max_rank`` and an ``alpha`` that keeps its scale (``alpha = s · max_rank``, ``s · sqrt(max_rank)``
    for rsLoRA), so ``save`` / ``load`` round-trip the padded adapter. New ``nn.Parameter`` objects are
    made: build the optimizer afterwards.

    Raises:
        ValueError: ``max_rank`` below an adapter's rank, or an adapter that is not LoRA, DoRA or BoRA
            (or uses a PiSSA / OLoRA init); the model is unchanged.
    """
    found = {layer: a for layer, (_, a) in named_layers(model, name).items()}
    for layer, a in found.items():
        if not paddable(a):
            raise ValueError(
                f"layer {layer!r}: adapter {name!r} ({a.method}, options {a.options}) cannot be padded; only lora, "
                "dora and bora adapters without a PiSSA / OLoRA init have a rank to pad"
            )
    for layer, a in found.items():
        r = a.product_pairs()[0][0].shape[0]
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < r:
            raise ValueError(f"max_rank={max_rank!r} must be an integer >= the rank {r} of layer {layer!r}")
    for a in found.values():
        keys = rank_factors(a)
        assert keys is not None
        ((old_A, old_B, scale),) = a.product_pairs()
        A, B = pad_rank(old_A.detach(), old_B.detach(), max_rank)
        setattr(a, keys[0], nn.Parameter(A, requires_grad=old_A.requires_grad))
        setattr(a, keys[1], nn.Parameter(B, requires_grad=old_B.requires_grad))
        rslora = bool(a.options.get("rslora", False))
        a.rank = max_rank  # type: ignore[assignment]  # LoRA, DoRA, BoRA keep their rank as an int
        a.options = {**a.options, "rank": max_rank, "alpha": scale * (math.sqrt(max_rank) if rslora else max_rank)}
    return model


def saved_layers(spec: AdapterSpec, source: str) -> dict[str, tuple[str, dict[str, Any], tuple[int, int] | None]]:
    """``layer -> (method, bound options, (in, out))`` of the saved adapter ``source``."""
    out: dict[str, tuple[str, dict[str, Any], tuple[int, int] | None]] = {}
    for entry in spec.adapters:
        if entry.name != source:
            continue
        options = bind_options(entry.method, entry.options)
        sizes = entry.sizes or [None] * len(entry.layers)
        for layer, size in zip(entry.layers, sizes, strict=True):
            out[layer] = (entry.method, options, size)
    return out


def swap_plan(
    a: Adapter, layer: str, method: str, options: dict[str, Any], tensors: dict[str, Tensor], where: Path
) -> dict[str, Tensor]:
    """The tensors to write into ``a`` (B already rescaled); every incompatibility is a ``ValueError``."""
    if method != a.method:
        raise ValueError(f"{where}: layer {layer!r} has a {method!r} adapter saved but {a.method!r} in the model")
    if a.reads_residual_base():
        raise ValueError(
            f"layer {layer!r}: init={a.options.get('init')!r} keeps its residual W0 - s B0 A0 in the base weight, "
            "which a hot-swap does not rewrite; load such adapters with loraplex.load"
        )
    mine = a.own_state_dict()
    if sorted(tensors) != sorted(mine):
        raise ValueError(
            f"{where}: layer {layer!r} holds tensors {sorted(tensors)}, the model's adapter {sorted(mine)}"
        )
    keys = rank_factors(a)
    free = INFERENCE_NEUTRAL | (SCALE_OPTIONS if keys else frozenset())
    for key in sorted(set(options) | set(a.options)):
        if key not in free and options.get(key) != a.options.get(key):
            raise ValueError(
                f"{where}: layer {layer!r}: option {key}={options.get(key)!r} differs from the model's "
                f"{a.options.get(key)!r}; a hot-swap keeps the modules, so only the tensors (and, for lora / dora / "
                "bora, rank and alpha) may differ"
            )
    out = {}
    for key, t in tensors.items():
        want = mine[key]
        rank_dim = {keys[0]: 0, keys[1]: 1}.get(key) if keys else None
        fits = t.ndim == want.ndim and all(
            t.shape[d] <= want.shape[d] if d == rank_dim else t.shape[d] == want.shape[d] for d in range(t.ndim)
        )
        if t.dtype != want.dtype or not fits:
            hint = " (pad with prepare_hotswap(model, max_rank) before compiling)" if rank_dim is not None else ""
            raise ValueError(
                f"{where}: layer {layer!r}: tensor {key!r} has shape {tuple(t.shape)} and dtype {t.dtype}, the "
                f"model's adapter {tuple(want.shape)} and {want.dtype}{hint}"
            )
        out[key] = t
    if keys:
        key_A, key_B = keys
        s_old = a.product_pairs()[0][2]
        rank = options["rank"]
        if out[key_A].shape[0] != rank or out[key_B].shape[1] != rank:
            raise ValueError(
                f"{where}: layer {layer!r}: A {tuple(out[key_A].shape)} and B {tuple(out[key_B].shape)} do not have "
                f"the saved rank={rank}"
            )
        s_new = lora_scale(rank, options["alpha"], options.get("rslora", False))
        if s_old == 0 and s_new != 0:
            raise ValueError(
                f"layer {layer!r}: the model's adapter has scale 0, so a scale of {s_new} cannot be folded"
            )
        out[key_B] = out[key_B] * (s_new / s_old if s_old != 0 else 0.0)
    return out


@torch.no_grad()
def hotswap(
    model: nn.Module, directory: str | os.PathLike[str], *, name: str = "default", source: str | None = None
) -> nn.Module:
    """Overwrite, in place, the tensors of the model's adapter ``name`` with those of a saved adapter.

    No module or ``nn.Parameter`` is replaced (only ``Tensor.copy_`` into the existing ones), so a
    ``torch.compile``'d model runs the new adapter without recompiling (tested with a compile counter).
    ``directory`` is a ``loraplex.save`` folder (spec JSON + safetensors, never pickle); ``source`` picks
    the saved adapter (default: the one called ``name``, else the only one). Tensors of modules the
    checkpoint trains (``train=``) are copied in place too.

    Same method, layers, options and shapes: a plain copy. LoRA, DoRA and BoRA may also differ in rank
    (up to the padding of ``prepare_hotswap``: the saved ``A`` / ``B`` go to the leading rows / columns,
    the rest is zeroed) and in ``alpha`` / ``rslora``: the module's scale is a Python float, which
    ``torch.compile`` specialises on, so it is kept and the new scale is folded into the tensor instead:
    ``B ← B_new · s_new / s_old`` (exact for DoRA / BoRA too, whose direction is ``W0 + s B A``).
    ``dropout`` is ignored (the model keeps its own; it does nothing in eval mode).

    Raises:
        ValueError: unknown ``name`` / ``source``, a different method or set of layers, other options
            that differ, a larger rank than the padding, other shapes or dtypes. Every check runs before
            anything is written: on error the model is unchanged.
    """
    d = Path(directory)
    spec = read_spec(d)
    tensors = read_matching_tensors(spec.tensors_sha256, d / SPEC_FILE, d / TENSOR_FILE)
    current = {layer: a for layer, (_, a) in named_layers(model, name).items()}
    src = pick_saved(spec, name, d, source)
    saved = saved_layers(spec, src)
    if set(saved) != set(current):
        missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
        raise ValueError(
            f"{d}: adapter {src!r} is saved on other layers than the model's {name!r}: "
            f"not saved {missing[:5]}, not in the model {extra[:5]}"
        )
    plan: list[tuple[Adapter, dict[str, Tensor]]] = []
    for layer, a in current.items():
        method, options, size = saved[layer]
        if size is not None and size != (a.in_features, a.out_features):
            raise ValueError(
                f"{d}: layer {layer!r} has (in={size[0]}, out={size[1]}) saved but "
                f"(in={a.in_features}, out={a.out_features}) in the model"
            )
        prefix = f"adapter.{src}.{layer}."
        mine = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        plan.append((a, swap_plan(a, layer, method, options, mine, d)))
    modules = dict(model.named_modules())
    train: list[tuple[Tensor, Tensor]] = []
    for m in spec.train:
        if m not in modules:
            raise ValueError(f"{d}: the checkpoint trains module {m!r}, which the model lacks")
        for k, v in modules[m].state_dict(keep_vars=True).items():
            saved_t = tensors.get(f"train.{m}.{k}")
            if saved_t is None or saved_t.shape != v.shape or saved_t.dtype != v.dtype:
                raise ValueError(f"{d}: tensor 'train.{m}.{k}' is missing or does not match {tuple(v.shape)} {v.dtype}")
            train.append((v, saved_t))
    for a, new in plan:
        own = dict(a.named_parameters()) | dict(a.named_buffers())
        for key, t in new.items():
            target = own[key]
            if target.shape == t.shape:
                target.copy_(t)
            else:  # a smaller rank in a padded LoRA: leading rows of A / columns of B, zeros elsewhere
                target.zero_()
                target[tuple(slice(0, n) for n in t.shape)].copy_(t)
        a.on_load()
    for target, t in train:
        target.copy_(t)
    return model
