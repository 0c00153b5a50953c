"""Option declarations (issue 19): every method declares its keyword options once, as its ``__init__`` has them."""

from __future__ import annotations

import inspect
import math

import pytest
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
