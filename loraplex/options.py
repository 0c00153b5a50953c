"""Method options as typed declarations, and the one path that validates them (issue 19).

Every registered adapter declares its keyword options once, in ``declared_options``: a name ->
:class:`Option` table (kind, default, range, a one-line meaning, and whether it is the size option
that sets the parameter count). :func:`validate` produces every option error from it, with the
texts the methods always gave (``rank=0 must be an integer >= 1``, ``alpha=nan must be a finite
number``, ``dropout=1.0 must be a number in [0, 1)``, ``rslora='no' must be True or False``,
``init='x' must be one of 'a', 'b'``). Checks that depend on the layer or on another option
(divisibility by ``in_features``, ``factor`` only with ``structure='kronecker'``) stay in the method.

The fuzz spaces (tests/test_reliability_fuzz.py) and ``loraplex methods`` are built from these tables;
tests/test_options.py keeps each table equal to its ``__init__`` signature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["int", "float", "prob", "unit", "betas", "bool", "choice"]


@dataclass(frozen=True)
class Option:
    """One keyword option of a method.

    ``kind``: ``int`` (an integer ``>= low``; ``special`` lists other accepted integers, such as
    ``decompose_factor=-1``), ``float`` (a finite number; ``positive``: ``> 0``, ``nonneg``: ``>= 0``,
    ``nonzero``: ``!= 0``), ``prob`` (a number in ``[0, 1)``), ``unit`` (a number in ``(0, 1)``, an EMA
    factor), ``betas`` (a pair of numbers in ``[0, 1)``, Adam's), ``bool`` (True or False), ``choice``
    (one of ``choices``).
    ``optional``: None is accepted too (it means "derive it"). ``size``: the option that sets the
    parameter count (``size_option``, compare's budgets). ``checked``: False when the method checks the
    option itself because its meaning depends on another option (then the table only documents it).
    ``rule``: the text after "must be" when it is not the kind's (``decompose_factor``'s).
    """

    kind: Kind
    default: Any
    help: str
    low: int = 1
    positive: bool = False
    nonneg: bool = False
    nonzero: bool = False
    choices: tuple[str, ...] = ()
    special: tuple[int, ...] = ()
    optional: bool = False
    size: bool = False
    checked: bool = True
    rule: str = ""

    def must(self) -> str:
        """What a valid value is, as the error messages say it after "must be"."""
        if self.rule:
            return self.rule
        if self.kind == "int":
            return f"an integer >= {self.low}"
        if self.kind == "float":
            bound = " > 0" if self.positive else " >= 0" if self.nonneg else ""
            return "a finite non-zero number" if self.nonzero else "a finite number" + bound
        if self.kind in ("prob", "unit", "betas"):
            ranges = {"prob": "a number in [0, 1)", "unit": "a number in (0, 1)"}
            return ranges.get(self.kind, "a pair of numbers in [0, 1)")
        if self.kind == "bool":
            return "True or False"
        return f"one of {', '.join(map(repr, self.choices))}"

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return value in self.choices
        if self.kind == "betas":
            prob = Option("prob", 0.0, "")
            return isinstance(value, tuple | list) and len(value) == 2 and all(map(prob.accepts, value))
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int":
            return isinstance(value, int) and (value >= self.low or value in self.special)
        if self.kind == "prob":
            return 0.0 <= value < 1.0
        if self.kind == "unit":
            return 0.0 < value < 1.0
        finite = math.isfinite(value)
        low = (self.positive and value <= 0) or (self.nonneg and value < 0)
        return finite and not low and not (self.nonzero and value == 0)

    def describe(self) -> str:
        """One line of documentation: the valid values and the meaning (``loraplex methods``)."""
        valid = self.must() + (" or None" if self.optional else "")
        return f"{valid}; {self.help}" + (" (the size option)" if self.size else "")


def validate(declared: dict[str, Option], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` unchanged when every declared (and ``checked``) option given holds a valid value.

    Otherwise a ``ValueError`` ``"{name}={value!r} must be {rule}"`` for the first wrong one, in the
    declaration's order. Names not declared are not looked at (the signature refuses unknown ones).
    """
    for name, option in declared.items():
        if option.checked and name in options and not option.accepts(value := options[name]):
            raise ValueError(f"{name}={value!r} must be {option.must()}")
    return options


def size_of(declared: dict[str, Option]) -> str | None:
    """The name of the size option, or None when the method has none."""
    sizes = [name for name, option in declared.items() if option.size]
    return sizes[0] if sizes else None


# Shared declarations (a method copies them with its own default / help through ``dataclasses.replace``).
def rank(default: int, help: str = "the rank r of the update") -> Option:
    return Option("int", default, help, size=True)


def alpha(default: float, help: str = "the update's scale numerator (scale = alpha / rank)", **kw: Any) -> Option:
    return Option("float", default, help, **kw)


def dropout(default: float = 0.0, help: str = "dropout on the adapter's input") -> Option:
    return Option("prob", default, help)


def flag(default: bool, help: str) -> Option:
    return Option("bool", default, help)


def choice(default: str, choices: tuple[str, ...], help: str) -> Option:
    return Option("choice", default, help, choices=choices)
