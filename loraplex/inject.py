"""Module surgery: put adapters on a model's linear layers, merge them, remove them, switch them off."""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from loraplex.adapter import Adapter, is_adaptable, is_linear, root_layer, weight_of
from loraplex.adapters import METHODS

Targets = str | Sequence[str]
HEAD_NAMES = frozenset({"classifier", "score", "lm_head"})
NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


def layers(model: nn.Module) -> dict[str, nn.Module]:
    """Adaptable layers by name: linear, convolution and embedding layers, and (as one layer each) stacks of adapters.

    ``targets="all-linear"`` keeps to the linear ones (``resolve``); explicit targets may name the
    others, for the methods that adapt them (``Adapter.layer_kinds``).
    """
    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if inside and name.startswith(inside[-1]):
            continue
        if isinstance(module, Adapter):
            found[name] = module
            inside.append(name + "." if name else "")  # skip what the stack wraps
        elif is_adaptable(module):
            found[name] = module
    return found


def adapters(model: nn.Module) -> list[tuple[str, Adapter]]:
    """Every adapter as ``(layer name, adapter)``, innermost first within a layer."""
    out: list[tuple[str, Adapter]] = []
    for name, layer in layers(model).items():
        out.extend((name, a) for a in reversed(Adapter.stack(layer)))
    return out


def _head_names(model: nn.Module) -> set[str]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            heads.add(name)
        if HEAD_NAMES & set(name.split(".")):
            heads.add(name)
    return heads


def match(names: Iterable[str], pattern: Targets) -> list[str]:
    """Names matched by a regex string (full match) or a list of names (exact or dotted suffix)."""
    if isinstance(pattern, str):
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"targets={pattern!r} is not a valid regular expression: {e}") from e
        return [n for n in names if regex.fullmatch(n)]
    wanted = list(pattern)
    if not all(isinstance(t, str) for t in wanted):
        raise ValueError(f"targets={pattern!r} must be a regex string or a list of module names")
    return [n for n in names if any(n == t or n.endswith("." + t) for t in wanted)]


def resolve(model: nn.Module, targets: Targets, exclude: Targets | None = None) -> list[str]:
    """The layer names that ``targets`` (minus ``exclude``) select; a clear error when none."""
    names = list(layers(model))
    if targets == "all-linear":
        heads = _head_names(model)
        linear = layers(model)
        chosen = [n for n in names if n not in heads and is_linear(root_layer(linear[n]))]
    else:
        chosen = match(names, targets)
    if exclude is not None:
        dropped = set(match(chosen, exclude))
        chosen = [n for n in chosen if n not in dropped]
    chosen = [n for n in chosen if n]  # the model itself cannot be replaced in place
    if not chosen:
        sample = ", ".join(names[:8]) or "(none)"
        raise ValueError(
            f"targets={targets!r} (exclude={exclude!r}) matched no linear layer; "
            f"the model's linear layers include: {sample}"
        )
    return chosen


def bind_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """All options of ``method`` with defaults filled in; unknown names are a ``ValueError``."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of the registered methods: {', '.join(METHODS)}")
    cls = METHODS[method]
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if params[p].kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method {method!r} has no option {unknown[0]!r}; options: {', '.join(allowed)}")
    bound = {p: options.get(p, params[p].default) for p in allowed}
    for key, value in bound.items():  # saved in the spec: NaN, inf and objects cannot be
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{key}={value!r} must be a JSON value (no NaN, inf or objects): {method!r} ({e})") from e
    return bound


def build(method: str, layer: nn.Module, options: dict[str, Any], name: str, where: str) -> Adapter:
    """Construct one adapter; errors name the layer."""
    try:
        adapter = METHODS[method](layer, **options)
    except ValueError as e:
        raise ValueError(f"layer {where!r} ({method}): {e}") from e
    adapter.name, adapter.options = name, options
    return adapter.train(layer.training)  # a new module is in training mode; follow the model


def freeze(model: nn.Module, train: Iterable[str] = ()) -> None:
    """Freeze everything except the adapters' own parameters and the modules named in ``train``."""
    model.requires_grad_(False)
    for _, adapter in adapters(model):
        for _, p in adapter.own_parameters():
            p.requires_grad_(True)
    for name in train:
        model.get_submodule(name).requires_grad_(True)


def _resolve_train(model: nn.Module, train: Sequence[str]) -> list[str]:
    if isinstance(train, str):
        train = [train]
    modules = [n for n, _ in model.named_modules() if n]
    chosen: list[str] = []
    for t in train:
        hits = match(modules, [t])
        if not hits:
            raise ValueError(f"train={t!r} names no module of the model")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def trained_modules(model: nn.Module) -> list[str]:
    """Names of the modules that ``adapt(..., train=...)`` made trainable."""
    return list(getattr(model, "_loraplex_train", []))


def add_trained(model: nn.Module, names: Iterable[str]) -> None:
    """Record ``names`` as trained modules (saved with the adapters) and refreeze the model."""
    known = trained_modules(model)
    object.__setattr__(model, "_loraplex_train", known + [n for n in names if n not in known])
    freeze(model, trained_modules(model))


def adapt(
    model: nn.Module,
    method: str,
    *,
    targets: Targets = "all-linear",
    exclude: Targets | None = None,
    train: Sequence[str] = (),
    name: str = "default",
    **options: Any,
) -> nn.Module:
    """Put a ``method`` adapter on every targeted linear layer of ``model``, in place.

    Freezes every parameter except the adapters' and those of the modules named in ``train``.
    ``targets``: a list of module names (exact or dotted suffix: ``"query"`` matches
    ``bert.encoder.layer.0.attention.self.query``), a regex string (full match), or
    ``"all-linear"`` (every linear layer except the output head). A layer that already carries an
    adapter gets the new one stacked on top (its effect adds to the others').

    Example:
        >>> import loraplex
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> model = loraplex.adapt(model, "lora", rank=2)
        >>> sum(p.numel() for p in model.parameters() if p.requires_grad)
        88
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"name={name!r} must be letters, digits, '_' or '-'")
    bound = bind_options(method, options)
    names = resolve(model, targets, exclude)
    train_names = _resolve_train(model, train)
    found = layers(model)
    for n in names:
        if name in {a.name for a in Adapter.stack(found[n])}:
            raise ValueError(f"layer {n!r} already has an adapter named {name!r}")
    for n in names:  # refusals that need no adapter built, before any layer changes
        try:
            METHODS[method].check_base(found[n], bound)
        except ValueError as e:
            raise ValueError(f"layer {n!r} ({method}): {e}") from e
    built: list[tuple[str, Adapter]] = []
    try:
        for n in names:
            built.append((n, build(method, found[n], bound, name, n)))
    except ValueError:
        for _, a in built:  # roll back base rewrites (PiSSA / OLoRA) of the layers already built
            a.release()
        raise
    for n, a in built:
        model.set_submodule(n, a)
    add_trained(model, train_names)
    return model


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
# Named adapters: several on one layer (a stack), activated, merged, disabled and removed by name.


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


def _probe_noise(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A deterministic random perturbation of ``t``'s size: ``0.5 (mean|t| + 1) N(0, 1)``."""
    scale = 0.5 * (t.detach().float().abs().mean().item() + 1.0)
    return (scale * torch.randn(t.shape, generator=g)).to(device=t.device, dtype=t.dtype)


@torch.no_grad()
def reads_base(a: Adapter) -> bool:
    """Whether ``a``'s effect depends on its root layer's weight (so changing that weight changes the effect).

    True for adapters that are no weight update (the serial bottleneck adapter acts on the layer output)
    and for those whose ``delta_weight()`` reads ``W0`` (DoRA / BoRA norms, Bone, i.e. MiSS's Bat). Decided: tested on
    a copy, not from a list of methods: its own parameters and then its root weight are moved at random
    (:func:`_probe_noise`); the relative change of ``ΔW`` must stay below ``1e-4``. The first move puts
    adapters that start at ``ΔW = 0`` (Bone's ``T = 0``) at a generic point.
    """
    if not a.weight_update:
        return True
    probe = copy.deepcopy(a).eval()  # with the stack below it, down to the root layer
    g = torch.Generator().manual_seed(0)
    for _, p in probe.own_parameters():
        if p.is_floating_point():
            p.add_(_probe_noise(p, g))
    before = probe.delta_weight().detach().clone()
    W = probe.weight
    W.add_(_probe_noise(W, g))
    after = probe.delta_weight().detach()
    change = (after.double() - before.double()).norm().nan_to_num(float("inf"))
    return bool(change > 1e-4 * (before.double().norm().nan_to_num(0.0) + 1e-12))


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
    return next((o for o in stack if o is not a and reads_base(o)), None)


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
            reads that weight (:func:`reads_base`: DoRA, BoRA, Bone (Bat), the bottleneck adapter),
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
            such a layer that reads the base weight (:func:`reads_base`: DoRA / BoRA norms, Bone,
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


def advance(model: nn.Module, steps: int = 1) -> None:
    """Tell every adapter that ``steps`` optimizer steps were taken (SingLoRA's ramp counts them).

    Call it once per optimizer step, not per forward or per micro-batch, or let
    ``track_steps(model, optimizer)`` call it for you.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be an integer >= 0")
    for _, a in adapters(model):
        a.advance(steps)


def track_steps(model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """Advance ``model``'s adapters after every ``optimizer.step()``; returns the hook's removable handle.

    Gradient accumulation then counts one step per optimizer update, however many micro-batches
    fed it.
    """
    return optimizer.register_step_post_hook(lambda *_: advance(model))


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
