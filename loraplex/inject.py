"""Module surgery: find a model's adaptable layers and its adapters, put adapters on them, freeze the rest.

Merging, removing, activating and switching off adapters (by name or all of them) live in :mod:`loraplex.named`.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from loraplex.adapter import Adapter, is_adaptable, is_linear, root_layer
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


def adapters_of(model: nn.Module, method: str | None, name: str | None, who: str) -> dict[str, Adapter]:
    """``layer -> adapter`` of ``method`` (None: any) called ``name`` (None: their only name in the model).

    The allocators' selection (and ``export_peft``'s). By method name, not isinstance: doctests import the
    modules a second time (``--import-mode=importlib``), whose classes are not those that built the adapters.

    Raises:
        ValueError: no such adapter (the message, which starts with ``who``, lists the model's methods); several
            names and ``name`` None; a ``name`` that is none of them.
    """
    found = [(n, a) for n, a in adapters(model) if method is None or a.method == method]
    names, what = sorted({a.name for _, a in found}), f"{method} adapters" if method else "adapters"
    if not found:
        methods = sorted({a.method for _, a in adapters(model)}) or ["none"]
        how = f" (loraplex.adapt(model, {method!r}))" if method else ""
        raise ValueError(f"{who} needs a model with {what}{how}; this model has: {', '.join(methods)}")
    if name is None and len(names) > 1:
        raise ValueError(f"the model has several {what} {names}; pass name=")
    if name is not None and name not in names:
        raise ValueError(f"name={name!r} is not one of the model's {what} {names}")
    return {n: a for n, a in found if a.name == (names[0] if name is None else name)}
