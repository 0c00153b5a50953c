"""Option declarations (issue 19): every method declares its keyword options once, as its ``__init__`` has them."""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
from torch import nn

from loraplex import METHODS
from loraplex.options import Option, size_of, validate


def keyword_defaults(cls: type) -> dict[str, object]:
    params = inspect.signature(cls.__init__).parameters.values()  # type: ignore[misc]
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_declarations_match_the_signature(method: str) -> None:
    cls = METHODS[method]
    declared = cls.declared_options
    signature = keyword_defaults(cls)
    assert list(declared) == list(signature), method  # same names, same order
    for name, option in declared.items():
        assert option.default == signature[name] and type(option.default) is type(signature[name]), (method, name)
        assert option.accepts(option.default) or option.optional, (method, name)
        assert option.help, (method, name)
        if option.kind == "choice":
            assert option.default in option.choices, (method, name)
    # exactly one size option, the class's size_option (none for circulant, toeplitz, kronecker)
    assert [n for n, o in declared.items() if o.size] == ([cls.size_option] if cls.size_option else []), method
    assert size_of(declared) == cls.size_option


def test_validate_gives_the_methods_messages() -> None:
    declared = {
        "rank": Option("int", 8, "r", size=True),
        "alpha": Option("float", 16.0, "a"),
        "temperature": Option("float", 0.5, "t", positive=True),
        "scale": Option("float", 1.0, "s", nonzero=True),
        "dropout": Option("prob", 0.0, "d"),
        "rslora": Option("bool", False, "b"),
        "init": Option("choice", "a", "i", choices=("a", "b")),
        "factor": Option("int", None, "f", optional=True),
        "hybrid_rank": Option("int", 0, "h", low=0),
    }
    cases = {
        "rank": (0, "rank=0 must be an integer >= 1"),
        "alpha": (math.nan, "alpha=nan must be a finite number"),
        "temperature": (0, "temperature=0 must be a finite number > 0"),
        "scale": (0.0, "scale=0.0 must be a finite non-zero number"),
        "dropout": (1.0, "dropout=1.0 must be a number in [0, 1)"),
        "rslora": (0, "rslora=0 must be True or False"),
        "init": ("c", "init='c' must be one of 'a', 'b'"),
        "factor": (2.5, "factor=2.5 must be an integer >= 1"),
        "hybrid_rank": (True, "hybrid_rank=True must be an integer >= 0"),
    }
    for name, (value, message) in cases.items():
        with pytest.raises(ValueError) as e:
            validate(declared, {name: value})
        assert str(e.value) == message
    good = {"rank": 4, "alpha": -2, "temperature": 1e-3, "scale": -1.0, "dropout": 0, "factor": None, "hybrid_rank": 0}
    assert validate(declared, good) is good


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_refuses_a_bad_declared_value_with_the_declared_message(method: str) -> None:
    cls = METHODS[method]
    for name, option in cls.declared_options.items():
        if not option.checked:
            continue
        bad = "bogus" if option.kind != "choice" else 3
        with pytest.raises(ValueError, match=f"^{name}={bad!r} must be "):
            cls(nn.Linear(8, 8), **{name: bad})


def test_loraplex_methods_prints_every_declared_option(capsys: pytest.CaptureFixture[str]) -> None:
    from loraplex.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for cls in METHODS.values():
        for name, option in cls.declared_options.items():
            assert f"{name}={option.default!r}" in out and option.describe() in out, (cls.method, name)


# Allocators, initialisers, optimizers and the decomposition inits (issue 19) -------------------------

NOT_OPTIONS = {"model", "batches", "loss_fn", "targets", "train", "name", "total_steps"}  # resolved where used


def component_tables() -> dict[str, tuple[object, dict[str, Option]]]:
    from loraplex.decompose.init import GRADIENT_OPTIONS, WEIGHT_OPTIONS, init_from_gradient, init_from_weight
    from loraplex.optim.loraplus import LORA_PLUS_OPTIONS, lora_plus
    from loraplex.optim.lorapro import LoRAPro
    from loraplex.optim.registry import OPTIMIZERS
    from loraplex.rank import ALLOCATORS, INITIALISERS
    from loraplex.rank.gora import GORA_OPTIONS

    assert set(OPTIMIZERS) == {"adamw", "lora-plus", "lora-pro"} and set(INITIALISERS) == {"gora"}
    tables: dict[str, tuple[object, dict[str, Option]]] = {
        f"allocator {n}": (cls.__init__, cls.declared_options) for n, cls in ALLOCATORS.items()
    }
    return tables | {
        "initialiser gora": (INITIALISERS["gora"].init, GORA_OPTIONS),
        "optimizer lora-plus": (lora_plus, LORA_PLUS_OPTIONS),
        "optimizer lora-pro": (LoRAPro.__init__, LoRAPro.declared_options),
        "init_from_weight": (init_from_weight, WEIGHT_OPTIONS),
        "init_from_gradient": (init_from_gradient, GRADIENT_OPTIONS),
    }


@pytest.mark.parametrize("component", sorted(component_tables()))
def test_component_declarations_match_the_signature(component: str) -> None:
    fn, declared = component_tables()[component]
    params = [p for p in inspect.signature(fn).parameters.values() if p.name not in NOT_OPTIONS | {"self"}]  # type: ignore[arg-type]
    assert list(declared) == [p.name for p in params], component
    for p in params:
        option, default = declared[p.name], p.default
        if default is inspect.Parameter.empty:  # a required option (lora_plus's lr)
            assert option.default is None, (component, p.name)
            continue
        assert option.default == default and type(option.default) is type(default), (component, p.name)
        assert option.accepts(option.default) or option.optional, (component, p.name)
        assert option.help and option.checked, (component, p.name)


def _call(component: str, **options: object) -> object:
    """Build ``component`` on a tiny model of the methods it needs, with ``options``."""
    import loraplex
    from loraplex.decompose.init import init_from_gradient, init_from_weight
    from loraplex.optim.loraplus import lora_plus
    from loraplex.optim.lorapro import LoRAPro
    from loraplex.rank import ALLOCATORS
    from loraplex.rank.gora import gora_init

    def model(method: str = "lora") -> nn.Module:
        return loraplex.adapt(
            nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), method, rank=10 if method == "adalora" else 2
        )

    loss = lambda m, b: m(b).square().mean()  # noqa: E731
    kind, _, name = component.partition(" ")
    if kind == "allocator":
        return ALLOCATORS[name](model(name), 10, **options)
    if component == "initialiser gora":
        return gora_init(nn.Sequential(nn.Linear(8, 8)), [torch.randn(2, 8)], loss_fn=loss, **options)
    if component == "optimizer lora-plus":
        return lora_plus(model(), **{"lr": 1e-3, **options})  # type: ignore[arg-type]
    if component == "optimizer lora-pro":
        return LoRAPro(model(), **options)  # type: ignore[arg-type]
    if component == "init_from_weight":
        return init_from_weight(model("loha"), **options)  # type: ignore[arg-type]
    return init_from_gradient(model("loha"), loss, [torch.randn(2, 8)], **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("component", sorted(component_tables()))
def test_components_refuse_a_bad_declared_value_with_the_declared_message(component: str) -> None:
    _, declared = component_tables()[component]
    _call(component)  # the defaults are accepted
    for name, option in declared.items():
        bad = "bogus" if option.kind != "choice" else 3
        with pytest.raises(ValueError, match=f"^{name}={bad!r} must be {re.escape(option.must())}$"):
            _call(component, **{name: bad})


def test_the_new_kinds() -> None:
    declared = {
        "beta": Option("unit", 0.85, "b"),
        "weight": Option("float", 0.5, "w", nonneg=True),
        "betas": Option("betas", (0.9, 0.999), "bs"),
    }
    cases = {
        "beta": (1.0, "beta=1.0 must be a number in (0, 1)"),
        "weight": (-0.1, "weight=-0.1 must be a finite number >= 0"),
        "betas": ((0.9, 1.0), "betas=(0.9, 1.0) must be a pair of numbers in [0, 1)"),
    }
    for name, (value, message) in cases.items():
        with pytest.raises(ValueError) as e:
            validate(declared, {name: value})
        assert str(e.value) == message
    for bad in (0, True, math.nan, "0.5"):
        assert not declared["beta"].accepts(bad)
    for bad in (math.inf, math.nan, True):
        assert not declared["weight"].accepts(bad)
    for bad in ((0.9,), (0.9, True), (0.9, math.nan), "ab", (0.9, 0.99, 0.999)):
        assert not declared["betas"].accepts(bad)
    good = {"beta": 0.5, "weight": 0, "betas": [0, 0.5]}
    assert validate(declared, good) is good
