"""Fuzzing (issue 10): every method's options and every layer shape either work or raise a clear ValueError.

For every method in ``loraplex.METHODS`` (and GoRA's ``gora_init``), hypothesis draws options from the
method's option space (``SPACES``, built from its ``declared_options`` plus ``OVERRIDES``: valid values,
values that may not fit the layer, and junk: 0, negatives, floats for ints, bools, None, huge values,
wrong strings, NaN / inf) and a layer shape (non-square, primes, tiny, 1-wide; 0..3 rows, 1-D and 3-D
inputs; one linear or a tiny two-layer model). Each example must end in one of two ways:

* it builds, and the core properties of ``shared/docs/properties.md`` hold: output shape, dtype and
  finiteness; ``base(x) + x @ delta_weight().T`` equals the adapter's output (property 9, in float64);
  finite gradients reach every adapter parameter; merge equals unmerged; save -> load into a fresh
  base gives the same output;
* or it raises ``ValueError`` whose message names an option (``name=value``, with the value given)
  or a layer size, the model left unchanged.

Anything else (another exception type, a wrong result) fails with the method, options and shapes.
A value of the wrong type for an option (a string for a bool, a float for an int, NaN for a number,
a name not among the choices) must be refused.

Budget: ``LORAPLEX_FUZZ_EXAMPLES`` examples per method (default 25, derandomized so CI is
reproducible); ``FUZZ_COUNTS`` counts what ran (printed at the end of the module with ``-s``).
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from matrix import CASES, Case, perturb, tol
from torch import nn

import loraplex
from loraplex import METHODS, Adapter
from loraplex.inject import bind_options
from loraplex.options import Option
from loraplex.rank import ALLOCATORS
from loraplex.rank.gora import GORA_OPTIONS, gora_init

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")

EXAMPLES = int(os.environ.get("LORAPLEX_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # LORAPLEX_FUZZ_NOSHRINK=1: report failures as found (big runs; shrinking a slow example can take minutes)
    phases=[Phase.explicit, Phase.generate] if os.environ.get("LORAPLEX_FUZZ_NOSHRINK") else list(Phase),
)
FUZZ_COUNTS: Counter[str] = Counter()
REFUSALS: Counter[str] = Counter()  # method: error text without numbers (printed with LORAPLEX_FUZZ_VERBOSE=1)

SIZES = (1, 2, 3, 4, 5, 7, 8, 12, 13, 16, 31, 64)
LEADS: tuple[tuple[int, ...], ...] = ((), (0,), (1,), (2,), (3,), (2, 3), (0, 2))  # leading dims of the input
HUGE = 10**5  # large but memory-safe: a rank of 10**5 on a 64-wide layer is 25 MB a factor
JUNK: tuple[Any, ...] = (
    0,
    -1,
    -3,
    2.5,
    4.0,
    True,
    False,
    None,
    HUGE,
    "bogus",
    "",
    float("nan"),
    float("inf"),
    -float("inf"),
    1e30,
    [2],
)


# Option spaces ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Opt:
    """One option: its kind (for the wrong-type rule) and a strategy of plausible values.

    ``kind``: ``int`` (``low`` is the smallest allowed, ``optional`` allows None, ``special`` lists
    extra allowed ints such as lokr's ``decompose_factor=-1``), ``float`` (``positive`` / ``nonzero``
    / ``nonneg`` constraints), ``prob`` (``[0, 1)``), ``unit`` (``(0, 1)``), ``bool``, ``choice`` (``choices``).
    """

    kind: str
    valid: st.SearchStrategy[Any]
    low: int = 1
    optional: bool = False
    special: tuple[int, ...] = ()
    positive: bool = False
    nonneg: bool = False
    nonzero: bool = False
    choices: tuple[str, ...] = ()
    fit: Callable[[int, int], st.SearchStrategy[Any]] | None = None  # values that fit an (in, out) layer

    def wrong(self, v: Any) -> bool:
        """True when ``v`` is certainly not a value of this option (whatever the layer)."""
        if v is None:
            return not self.optional
        if self.kind == "bool":
            return not isinstance(v, bool)
        if self.kind == "choice":
            return not (isinstance(v, str) and v in self.choices)
        if isinstance(v, bool):
            return True
        if self.kind == "int":
            return not isinstance(v, int) or (v < self.low and v not in self.special)
        if not isinstance(v, int | float) or not math.isfinite(v):
            return True
        if self.kind in ("prob", "unit"):
            return not (0 <= v < 1 if self.kind == "prob" else 0 < v < 1)
        return (self.positive and v <= 0) or (self.nonneg and v < 0) or (self.nonzero and v == 0)


def size(low: int = 1, hi: int = 9, **kw: Any) -> Opt:
    return Opt("int", st.integers(low, hi), low=low, **kw)


def opt_size(hi: int = 9, **kw: Any) -> Opt:
    return Opt("int", st.none() | st.integers(1, hi), optional=True, **kw)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def common(n_in: int, n_out: int) -> st.SearchStrategy[int]:
    """A common divisor of both sizes (block sizes, Kronecker factors, GraLoRA's k)."""
    return st.sampled_from(divisors(math.gcd(n_in, n_out)))


def of_out(n_in: int, n_out: int) -> st.SearchStrategy[int]:
    return st.sampled_from(divisors(n_out))


def up_to_min(n_in: int, n_out: int) -> st.SearchStrategy[int]:
    return st.integers(1, min(n_in, n_out))


def number(lo: float = -32.0, hi: float = 64.0, **kw: Any) -> Opt:
    """Floats in ``[lo, hi]``, and ints in that range too (an int is a valid number; 0 only when ``lo <= 0``)."""
    ints = range(max(math.ceil(lo), 1 if lo > 0 else math.ceil(lo)), math.floor(hi) + 1)
    valid = st.floats(lo, hi, allow_nan=False)
    return Opt("float", valid | st.integers(ints[0], ints[-1]) if ints else valid, **kw)


def choice(*names: str) -> Opt:
    return Opt("choice", st.sampled_from(names), choices=names)


PROB = Opt("prob", st.sampled_from((0.0, 0.1, 0.5)) | st.floats(0.0, 0.99))
BOOL = Opt("bool", st.booleans())
POSITIVE = number(1e-3, 64.0, positive=True)


def declared(o: Option) -> Opt:
    """The fuzz space of a declared option (loraplex/options.py): its kind, range and choices."""
    if o.kind == "bool":
        return BOOL
    if o.kind == "prob":
        return PROB
    if o.kind == "choice":
        return choice(*o.choices)
    if o.kind == "unit":  # an EMA factor
        return Opt("unit", st.floats(0.01, 0.99))
    if o.kind == "float":
        return POSITIVE if o.positive else number(0.0, nonneg=True) if o.nonneg else number(nonzero=o.nonzero)
    if o.special:  # lokr / lokh's decompose_factor=-1
        return Opt("int", st.sampled_from((*o.special, *range(o.low, o.low + 4))), low=o.low, special=o.special)
    if o.optional:
        return Opt("int", st.none() | st.integers(o.low, o.low + 8), low=o.low, optional=True)
    return size(o.low, o.low + 8)


# Hand-written overrides: sizes that must fit the layer (``fit``) or stay small, and ranges narrower
# than the declared ones where a value in range is valid but slow or pointless to fuzz.
OVERRIDES: dict[str, dict[str, Opt]] = {
    "gralora": {
        "rank": size(fit=lambda i, o: st.sampled_from((2, 4, 8))),
        "k": size(1, 5, fit=lambda i, o: st.sampled_from([d for d in divisors(math.gcd(i, o)) if d <= 4])),
        "hybrid_rank": size(0, 4),
    },
    "c3a": {"block_size": size(1, 16, fit=common)},
    "miss": {"rank": size(fit=lambda i, o: st.integers(1, i)), "mini_r": size(1, 5, fit=of_out)},
    "bone": {"rank": size(1, 8, fit=common)},
    "loldu": {"rank": size(fit=up_to_min)},
    "singlora": {"ramp_steps": size(0, 5)},
    "kronecker": {"factor": opt_size(8, fit=common)},
    "ldr": {"displacement_rank": size(1, 5)},
    "adapter": {"factor": opt_size(8, fit=of_out)},
    "ardlora": {"heads": size(1, 5, fit=of_out), "temperature": number(1e-2, 4.0, positive=True)},
}

SPACES: dict[str, dict[str, Opt]] = {
    method: {name: OVERRIDES.get(method, {}).get(name) or declared(o) for name, o in cls.declared_options.items()}
    for method, cls in METHODS.items()
}

# GoRA's space: from GORA_OPTIONS, with small pre-passes and rank clamps, step sizes that keep ΔW0 finite.
GORA_OVERRIDES: dict[str, Opt] = {
    "n_steps": opt_size(3),
    "r_min": size(0, 3),
    "r_max": size(1, 16),
    "lr_g": number(1e-3, 1.0, positive=True),
    "stable_gamma": number(1e-3, 1.0, positive=True),
    "seed": Opt("int", st.none() | st.integers(0, 2**31), low=-(2**63), optional=True),
}
GORA_SPACE: dict[str, Opt] = {name: GORA_OVERRIDES.get(name) or declared(o) for name, o in GORA_OPTIONS.items()}


def option_names(method: str) -> list[str]:
    return list(bind_options(method, {}))


def test_every_method_has_a_fuzz_space() -> None:
    """The spaces come from the declarations; an override must name a declared option."""
    assert set(SPACES) == set(METHODS)
    for method, names in OVERRIDES.items():
        assert set(names) <= set(SPACES[method]), method
    for method, space in SPACES.items():
        assert set(space) == set(option_names(method)), method


def test_the_spaces_cover_the_property_matrix() -> None:
    """Every option value of the matrix cases is a value the fuzzer can draw (or a junk value)."""
    for case in CASES:
        for k, v in case.options.items():
            o = SPACES[case.method][k]
            assert not o.wrong(v), f"{case}: {k}={v!r}"
            if o.kind == "choice":
                assert v in o.choices, f"{case}: {k}={v!r}"


@st.composite
def options_of(
    draw: st.DrawFn, space: dict[str, Opt], layer: tuple[int, int], junk: bool = True
) -> tuple[dict[str, Any], str | None]:
    """(options, name of an option given a wrong-type value or None); options with a ``fit`` mostly fit ``layer``."""
    names = sorted(space)
    opts = {}
    for n in names:
        o = space[n]
        if draw(st.integers(0, 3)) < (3 if o.fit else 2):  # given: 3/4 of the time if it must fit the layer, else 1/2
            opts[n] = draw(o.fit(*layer) | o.valid if o.fit else o.valid)
    wrong = None
    if junk and draw(st.integers(0, 2)) == 0:  # a third of the examples: one option gets a junk value
        n = draw(st.sampled_from(names))
        opts[n] = draw(st.sampled_from(JUNK))
        wrong = n if space[n].wrong(opts[n]) else None
    return opts, wrong


# The checks ------------------------------------------------------------------------------------


@dataclass
class Shape:
    sizes: tuple[int, ...]  # feature sizes: (in, out) for one linear, (in, hidden, out) for two
    lead: tuple[int, ...]
    bias: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(self.sizes, self.sizes[1:], strict=False)):
            layers += [nn.Tanh()] if i else []
            layers.append(nn.Linear(a, b, bias=self.bias))
        return nn.Sequential(*layers).eval()

    def input(self, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn((*self.lead, self.sizes[0]), generator=g).to(dtype)


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    """Layer sizes (square with probability 1/3: the structured methods need it) and input leading dims."""
    n_in = draw(st.sampled_from(SIZES))
    n_out = n_in if draw(st.integers(0, 2)) == 0 else draw(st.sampled_from(SIZES))
    sizes: tuple[int, ...] = (n_in, n_out)
    if draw(st.integers(0, 4)) == 0:  # a tiny two-layer model: every linear adapted
        sizes = (n_in, n_out, n_out if draw(st.booleans()) else draw(st.sampled_from(SIZES)))
    return Shape(sizes, draw(st.sampled_from(LEADS)), bias=draw(st.booleans()))


def named(msg: str, options: dict[str, Any], sizes: tuple[int, ...]) -> bool:
    """True when ``msg`` names an option with its value (``rank=0``) or a layer size (``in_features=13``)."""
    for m in re.finditer(r"\b([A-Za-z_][A-Za-z0-9_]*)=", msg):
        name, rest = m.group(1), msg[m.end() :]
        if name in options and any(rest.startswith(s) for s in (repr(options[name]), str(options[name]))):
            return True
        if name in ("in_features", "out_features", "rank", "factor", "d", "f") and re.match(r"\d+", rest):
            if int(re.match(r"\d+", rest).group()) in sizes or name not in ("in_features", "out_features"):
                return True
    return False


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale)


def check_built(base: nn.Module, model: nn.Module, shape: Shape, tolerance: dict[str, float]) -> None:
    """The core properties on a built, adapted ``model`` whose un-adapted twin is ``base``."""
    found = loraplex.adapters(model)
    assert found, "adapt built no adapter"
    x = shape.input()
    want_shape = (*shape.lead, shape.sizes[-1])
    y0 = model(x)
    assert y0.shape == want_shape and y0.dtype == torch.float32, (y0.shape, y0.dtype)
    assert torch.isfinite(y0).all(), "non-finite output at init"
    perturb(model)
    y = model(x)
    assert y.shape == want_shape and torch.isfinite(y).all(), "non-finite output after perturbing"
    # property 9, in float64, layer by layer
    for _, a in found:
        if not a.weight_update:
            continue
        a64 = copy.deepcopy(a).double()
        x64 = torch.randn((*shape.lead, a.in_features), dtype=torch.float64)
        want = a64(x64)
        _close(a64.base(x64) + x64 @ a64.delta_weight().T, want, rtol=1e-7, atol=1e-7)
    # gradients
    g = torch.randn(want_shape)
    (model(x) * g).sum().backward()
    for name, a in found:
        for pname, p in a.own_parameters():
            if not p.requires_grad:  # an allocator may freeze a pruned part (ARD-LoRA's rank scale)
                continue
            assert p.grad is not None, f"{name}.{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"
    model.zero_grad(set_to_none=True)
    # merge
    merged = copy.deepcopy(model)
    if all(a.weight_update for _, a in found):
        loraplex.merge(merged)
        assert not loraplex.adapters(merged)
        _close(merged(x), y, **tolerance)
    else:
        with pytest.raises(ValueError, match="not a weight update"):
            loraplex.merge(merged)
    # save -> load into a fresh base
    with tempfile.TemporaryDirectory() as d:
        loraplex.save(model, d)
        fresh = copy.deepcopy(base)
        loraplex.load(fresh, d)
        _close(fresh(x), y, **tolerance)


def check_refused(exc: ValueError, base: nn.Module, tried: nn.Module, options: dict[str, Any], shape: Shape) -> None:
    REFUSALS[re.sub(r"\d+", "N", str(exc))[:90]] += 1
    assert named(str(exc), options, shape.sizes), f"the error names no option or size: {exc}"
    assert not loraplex.adapters(tried), "a refused adapt left adapters behind"
    b, t = base.state_dict(), tried.state_dict()
    assert b.keys() == t.keys() and all(torch.equal(b[k], t[k]) for k in b), "a refused adapt changed the model"


def defaults(method: str) -> dict[str, Any]:
    return bind_options(method, {})


def _adapt_and_check(method: str, options: dict[str, Any], shape: Shape, wrong: str | None) -> str:
    base = shape.model()
    full = {**defaults(method), **options}
    first = base[0]
    assert isinstance(first, nn.Linear)
    direct: Adapter | None = None
    direct_error: ValueError | None = None
    try:  # the class itself, without adapt's JSON check of the options
        direct = METHODS[method](copy.deepcopy(first), **options).eval()
    except ValueError as e:
        direct_error = e
        assert named(str(e), full, shape.sizes), f"the class's error names no option or size: {e}"
    tried = copy.deepcopy(base)
    try:
        model = loraplex.adapt(tried, method, **options)
    except ValueError as e:
        check_refused(e, base, tried, full, shape)
        if direct is not None:  # only adapt refused (a non-JSON value): the class must still compute finite values
            x = torch.randn((*shape.lead, first.in_features))
            assert torch.isfinite(direct(x)).all(), f"the class accepted options adapt refuses and gave NaN/inf: {e}"
        return "refused"
    assert direct_error is None, f"the class refused ({direct_error}) but adapt built"
    assert wrong is None, f"{wrong}={options[wrong]!r} is not a valid value but was accepted"
    case = Case(method, options)
    check_built(base, model, shape, tol(case) if isinstance(options.get("init"), str) else tol(Case(method)))
    return "built"


def fuzz_one(method: str, options: dict[str, Any], shape: Shape, wrong: str | None = None) -> str:
    """One fuzz example; every failure is an AssertionError carrying the method, options and shapes."""
    context = f"{method} options={options!r} sizes={shape.sizes} lead={shape.lead} bias={shape.bias}"
    torch.manual_seed(0)
    try:
        outcome = _adapt_and_check(method, options, shape, wrong)
    except AssertionError as e:
        raise AssertionError(f"{context}: {e}") from e
    except Exception as e:  # noqa: BLE001 - the point of the fuzzer: no other exception type
        raise AssertionError(f"{context}: {type(e).__name__}: {e}") from e
    FUZZ_COUNTS[f"{method}:{outcome}"] += 1
    return outcome


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    total = sum(FUZZ_COUNTS.values())
    per = Counter({k.split(":")[0]: 0 for k in FUZZ_COUNTS})
    for k, v in FUZZ_COUNTS.items():
        per[k.split(":")[0]] += v
    if os.environ.get("LORAPLEX_FUZZ_VERBOSE"):
        print("\n".join(f"{n:6d}  {m}" for m, n in REFUSALS.most_common()))
    print(f"\nfuzz examples run: {total} ({', '.join(f'{k}={v}' for k, v in sorted(FUZZ_COUNTS.items()))})")


@pytest.mark.parametrize("method", sorted(SPACES))
@FUZZ
@given(data=st.data())
def test_fuzz_method(method: str, data: st.DataObject) -> None:
    shape = data.draw(shapes(), label="shape")
    options, wrong = data.draw(options_of(SPACES[method], shape.sizes[:2]), label="options")
    fuzz_one(method, options, shape, wrong)


# GoRA: an initializer over a model, not an adapter class -----------------------------------------


def _gora_and_check(options: dict[str, Any], shape: Shape, wrong: str | None) -> str:
    base = shape.model()
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn((3, shape.sizes[0]), generator=g) for _ in range(2)]
    tried = copy.deepcopy(base)
    full = {k: p for k, p in options.items()}
    try:
        model = gora_init(tried, batches, loss_fn=lambda m, b: m(b).pow(2).mean(), **options)
    except ValueError as e:
        check_refused(e, base, tried, full, shape)
        return "refused"
    assert wrong is None, f"{wrong}={options[wrong]!r} is not a valid value but was accepted"
    if not loraplex.adapters(model):  # r_min = 0 may give every layer rank 0: no adapter, the base model
        x = shape.input()
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
        return "built"
    check_built(base, model, shape, tol(Case("lora")))
    return "built"


@FUZZ
@given(data=st.data())
def test_fuzz_gora(data: st.DataObject) -> None:
    shape = data.draw(shapes(), label="shape")
    options, wrong = data.draw(options_of(GORA_SPACE, shape.sizes[:2]), label="options")
    context = f"gora options={options!r} sizes={shape.sizes} lead={shape.lead} bias={shape.bias}"
    torch.manual_seed(0)
    try:
        outcome = _gora_and_check(options, shape, wrong)
    except AssertionError as e:
        raise AssertionError(f"{context}: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{context}: {type(e).__name__}: {e}") from e
    FUZZ_COUNTS[f"gora:{outcome}"] += 1


# Rank allocators: their options, then a short training run under them ------------------------------

NAME = Opt("choice", st.none() | st.just("default"), optional=True, choices=("default",))
WARMUP = Opt("int", st.none() | st.integers(0, 3), low=0, optional=True)
# The allocators' spaces: from their declared_options (plus ``name``, the adapter picked), with schedules that
# fit a run of a few steps and regulariser weights that keep it finite.
ALLOCATOR_OVERRIDES: dict[str, dict[str, Opt]] = {
    "adalora": {
        "target_r": size(1, 8),
        "tinit": size(0, 3),
        "tfinal": size(0, 3),
        "deltaT": size(1, 3),
        "orth_reg_weight": number(0.0, 2.0, nonneg=True),
    },
    "elalora": {
        "b": size(1, 4),
        "k": size(1, 3),
        "init_warmup": WARMUP,
        "final_warmup": WARMUP,
        "mask_interval": opt_size(3),
        "reg_orth_coef": number(0.0, 2.0, nonneg=True),
        "seed": size(0, 99),
    },
    "ardlora": {
        "l1": number(0.0, 1.0, nonneg=True),
        "tv": number(0.0, 1.0, nonneg=True),
        "lr_scale": number(0.0, 100.0, nonneg=True),
    },
}
ALLOCATOR_SPACES: dict[str, dict[str, Opt]] = {
    method: {
        name: ALLOCATOR_OVERRIDES.get(method, {}).get(name) or declared(o) for name, o in cls.declared_options.items()
    }
    | {"name": NAME}
    for method, cls in ALLOCATORS.items()
}
STEPS = Opt("int", st.integers(1, 8))


def test_every_allocator_has_a_fuzz_space() -> None:
    """The allocator and GoRA spaces come from the declarations; an override must name a declared option."""
    assert set(ALLOCATOR_SPACES) == set(ALLOCATORS) and set(GORA_OVERRIDES) <= set(GORA_SPACE)
    for method, names in ALLOCATOR_OVERRIDES.items():
        assert set(names) <= set(ALLOCATORS[method].declared_options), method
    assert ALLOCATOR_SPACES["adalora"]["beta1"].wrong(1.0) and ALLOCATOR_SPACES["ardlora"]["tv"].wrong(-0.1)
    for name, cls in ALLOCATORS.items():
        params = inspect.signature(cls.__init__).parameters
        assert set(ALLOCATOR_SPACES[name]) == {p for p in params if params[p].kind is inspect.Parameter.KEYWORD_ONLY}


def _allocate_and_check(
    method: str, mopts: dict[str, Any], aopts: dict[str, Any], shape: Shape, wrong: str | None
) -> str:
    from loraplex.rank import ALLOCATORS

    base = shape.model()
    try:
        model = loraplex.adapt(copy.deepcopy(base), method, **mopts)
    except ValueError:
        return "skipped"  # the adapter options do not fit this layer: the method fuzz covers that
    total = aopts.pop("total_steps")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        alloc = ALLOCATORS[method](model, total, **aopts)
    except ValueError as e:
        REFUSALS[re.sub(r"\d+", "N", str(e))[:90]] += 1
        params = inspect.signature(ALLOCATORS[method].__init__).parameters
        full = {**{k: p.default for k, p in params.items()}, **aopts, "total_steps": total}
        assert named(str(e), full, shape.sizes), f"the error names no option: {e}"
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "a refused allocator changed the model"
        return "refused"
    assert wrong is None, f"{wrong}={aopts.get(wrong, total)!r} is not a valid value but was accepted"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train = Shape(shape.sizes, (3,), shape.bias)
    for step in range(total):
        model(train.input(seed=10 + step)).square().mean().backward()
        alloc.before_step()
        opt.step()
        loraplex.advance(model)
        alloc.step(opt)
        opt.zero_grad(set_to_none=True)
    ranks = alloc.ranks()
    assert all(isinstance(r, int) and r >= 0 for r in ranks.values()), ranks
    assert all(torch.isfinite(p).all() for p in model.parameters()), "a parameter went non-finite"
    check_built(base, model, shape, tol(Case(method)))
    return "built"


@pytest.mark.parametrize("method", sorted(ALLOCATOR_SPACES))
@FUZZ
@given(data=st.data())
def test_fuzz_allocator(method: str, data: st.DataObject) -> None:
    shape = data.draw(shapes(), label="shape")
    mopts, _ = data.draw(options_of(SPACES[method], shape.sizes[:2], junk=False), label="method options")
    aopts, wrong = data.draw(options_of({**ALLOCATOR_SPACES[method], "total_steps": STEPS}, (1, 1)), label="options")
    aopts.setdefault("total_steps", 4)
    context = f"{method} allocator options={aopts!r} method options={mopts!r} sizes={shape.sizes} lead={shape.lead}"
    torch.manual_seed(0)
    try:
        outcome = _allocate_and_check(method, mopts, dict(aopts), shape, wrong)
    except AssertionError as e:
        raise AssertionError(f"{context}: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{context}: {type(e).__name__}: {e}") from e
    FUZZ_COUNTS[f"{method}-allocator:{outcome}"] += 1


# Regression examples (found by the fuzzer) ---------------------------------------------------------

REGRESSIONS: list[tuple[str, dict[str, Any], Shape, str | None]] = [
    # A falsy dropout (False, None, "") skipped its check (`Dropout(check(p)) if p else Identity()`).
    *((m, {"dropout": False}, Shape((1, 1), ()), "dropout") for m in sorted(SPACES) if "dropout" in SPACES[m]),
    ("lora", {"dropout": None}, Shape((3, 5), (2,)), "dropout"),
    ("miss", {"dropout": ""}, Shape((3, 5), (2,)), "dropout"),
    # rslora was used for its truthiness: rslora=0 or "no" silently picked a scale.
    ("lora", {"rslora": 0}, Shape((1, 1), ()), "rslora"),
    ("bora", {"rslora": "no"}, Shape((3, 5), (2,)), "rslora"),
    ("singlora", {"rslora": 0}, Shape((1, 1), ()), "rslora"),
    # adapt's JSON check named the whole option dict, not the NaN option.
    ("lora", {"alpha": float("nan")}, Shape((1, 1), ()), "alpha"),
    ("toeplitz", {"alpha": float("inf")}, Shape((4, 4), (2,)), "alpha"),
    # GraLoRA's fused kernel viewed a 0-row batch as (0, k, -1): RuntimeError.
    ("gralora", {"k": 1, "alpha": 0}, Shape((1, 1, 1), (0,), bias=False), None),
    ("gralora", {"k": 2, "rank": 4, "hybrid_rank": 1}, Shape((4, 6), (0, 2)), None),
    # PiSSA's factors are sqrt(S_r / scale): alpha <= 0 gave NaN weights (and an adapt refused on a later layer
    # could not restore the NaN-rewritten first layer).
    ("lora", {"init": "pissa", "alpha": 0}, Shape((8, 8), ()), "alpha"),
    ("lora", {"init": "pissa", "alpha": -4.0, "rank": 2}, Shape((8, 8), (2,)), "alpha"),
    ("lora", {"init": "pissa", "alpha": 0.0, "rank": 8}, Shape((8, 8, 1), ()), "alpha"),
    ("lora", {"init": "olora", "alpha": 0.0, "rank": 2}, Shape((8, 8), (2,)), None),
]


@pytest.mark.parametrize(("method", "options", "shape", "wrong"), REGRESSIONS, ids=str)
def test_regression(method: str, options: dict[str, Any], shape: Shape, wrong: str | None) -> None:
    assert fuzz_one(method, options, shape, wrong) == ("refused" if wrong else "built")


def test_the_checks_can_fail() -> None:
    """The fuzzer's own checks catch a wrong delta_weight, a non-ValueError and an unnamed error."""
    shape = Shape((5, 7), (2,))
    lora = METHODS["lora"]
    original = lora.delta_weight
    try:
        lora.delta_weight = lambda self: 2 * original(self)  # type: ignore[method-assign]
        with pytest.raises(AssertionError, match="lora options"):
            fuzz_one("lora", {"rank": 2}, shape)
    finally:
        lora.delta_weight = original  # type: ignore[method-assign]
    assert not named("something went wrong", {"rank": 0}, (5, 7))
    assert named("rank=0 must be an integer >= 1", {"rank": 0}, (5, 7))
    assert named("k=3 must divide in_features=5", {"k": 3}, (5, 7))
    assert SPACES["lora"]["rslora"].wrong("bogus") and not SPACES["lora"]["rslora"].wrong(True)
    assert SPACES["lora"]["rank"].wrong(4.0) and SPACES["lora"]["alpha"].wrong(float("nan"))


def test_elalora_allocator_refuses_a_non_bool_ddp_rewrap() -> None:
    """Found by the allocator fuzz (200 examples): ``ddp_rewrap=-1`` was accepted as truthy."""
    from loraplex.rank import ALLOCATORS

    model = loraplex.adapt(Shape((4, 4), (3,)).model(), "elalora")
    with pytest.raises(ValueError, match="ddp_rewrap=-1"):
        ALLOCATORS["elalora"](model, 4, ddp_rewrap=-1)
