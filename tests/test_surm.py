"""SURM's LoRA-style adapters (circulant, toeplitz, ldr): both compute paths against dense ΔW built from the
definitions, inits, half precision, Conv1D, stacking, and option errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from matrix import MODELS, perturb
from test_structured import C, S, T
from torch import nn

import loraplex
from loraplex.adapter import Adapter
from loraplex.adapters.circulant import Circulant
from loraplex.adapters.ldr import LDR
from loraplex.adapters.toeplitz import Toeplitz

# (class, options, the dense ΔW from the definitions, the options' parameter count for d = 16)
CASES = [
    (Circulant, {}, lambda a: a.alpha * C(a.a * a.b), 32),
    (Circulant, {"product": False, "alpha": 2.5}, lambda a: a.alpha * C(a.a), 16),
    (Toeplitz, {}, lambda a: a.alpha * T(a.b) @ T(a.a), 32),
    (Toeplitz, {"alpha": -0.5}, lambda a: a.alpha * T(a.b) @ T(a.a), 32),
    (LDR, {}, lambda a: a.alpha * C(a.g[0]) @ S(a.h[0]), 32),
    (
        LDR,
        {"displacement_rank": 3, "alpha": 2.0},
        lambda a: a.alpha * sum(C(g) @ S(h) for g, h in zip(a.g, a.h, strict=True)),
        96,
    ),
]
IDS = [f"{cls.method}-{i}" for i, (cls, *_) in enumerate(CASES)]


def make(cls: type[Adapter], options: dict, d: int = 16, dtype: torch.dtype = torch.float64) -> Adapter:
    torch.manual_seed(0)
    a = cls(nn.Linear(d, d), **options).to(dtype).eval()
    perturb(nn.Sequential(a), scale=0.5)
    return a


# 1. Both paths against the definitions ----------------------------------------------------------


@pytest.mark.parametrize(("cls", "options", "dense", "count"), CASES, ids=IDS)
@pytest.mark.parametrize("rows", [3, 40])  # below and above every merged-weight threshold for d = 16
def test_output_and_gradients_equal_the_dense_definition(cls, options, dense, count, rows: int) -> None:
    a = make(cls, options)
    x = torch.randn(2, rows, 16, dtype=torch.float64, requires_grad=True)
    assert a.fusable(x) == (rows == 40)
    own = [p for _, p in a.own_parameters()]
    assert sum(p.numel() for p in own) == count == cls.num_params(16, 16, **options)
    y = a(x)
    want = F.linear(x, a.weight + dense(a), a.bias)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *own], gy)
    for u, v in zip(got, torch.autograd.grad(want, [x, *own], gy), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.delta_weight(), dense(a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("cls", "options", "dense", "count"), CASES, ids=IDS)
def test_the_two_paths_agree_in_fp32_at_a_real_size(cls, options, dense, count) -> None:
    a = make(cls, options, d=96, dtype=torch.float32)
    x = torch.randn(120, 96)
    assert a.fusable(x) and not a.fusable(x[:20])
    y_merged = a(x)
    y_fft = torch.cat([a(chunk) for chunk in x.split(20)])
    torch.testing.assert_close(y_merged, y_fft, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y_merged, a.base(x) + x @ a.delta_weight().T, rtol=1e-4, atol=1e-4)


# 2. Init, counts, registry -------------------------------------------------------------------------


def test_inits_are_the_references() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(512, 512)
    x = torch.randn(4, 512)
    c = Circulant(layer)
    assert 0.9 < c.a.std() < 1.1 and not c.b.any()  # the code's N(0, 1), not its comment's 0.02
    c = Circulant(layer, product=False)
    assert c.b is None and not c.a.any()
    t = Toeplitz(layer)
    assert 0.018 < t.a.std() < 0.022 and not t.b.any()
    r = LDR(layer, displacement_rank=2)
    assert r.g.shape == r.h.shape == (2, 512) and not r.g.any() and 0.018 < r.h.std() < 0.022
    for a in (c, t, r):
        assert torch.equal(a(x), layer(x))  # the base model at init
        assert all(p.dtype == torch.float32 for _, p in a.own_parameters())


def test_circulant_lora_product_false_keeps_the_base_bias_as_the_reference() -> None:
    # issue 18: the reference's circulant LoRA adds F.linear(x, W, bias) in both use_prod branches
    torch.manual_seed(0)
    c = Circulant(nn.Linear(8, 8), product=False, alpha=0.5)
    with torch.no_grad():
        c.a.normal_()
    x = torch.randn(3, 8)
    C = torch.stack([torch.roll(c.a, i) for i in range(8)], dim=1)  # C(a)[i, j] = a[(i - j) mod 8]
    want = x @ c.base.weight.T + c.base.bias + 0.5 * x @ C.T
    torch.testing.assert_close(c(x), want, rtol=1e-5, atol=1e-6)


def test_registry_and_lr() -> None:
    for name, cls in [("circulant", Circulant), ("toeplitz", Toeplitz), ("ldr", LDR)]:
        assert loraplex.METHODS[name] is cls
        assert cls.paper == "https://arxiv.org/abs/2406.17740" and cls.default_lr == 2e-3


def test_dropout_applies_to_the_adapter_input_only_in_training() -> None:
    torch.manual_seed(0)
    a = Toeplitz(nn.Linear(16, 16), dropout=0.5)
    perturb(nn.Sequential(a))
    x = torch.randn(64, 16)
    assert not a.fusable(x)  # live dropout: the FFT path, on dropout(x)
    y = a(x)
    assert not torch.allclose(y, a.base(x) + x @ a.delta_weight().T)
    a.eval()
    assert a.fusable(x)
    torch.testing.assert_close(a(x), a.base(x) + x @ a.delta_weight().T, rtol=1e-5, atol=1e-5)


# 3. Dtypes, Conv1D, stacking -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("cls", "options", "dense", "count"), CASES, ids=IDS)
def test_half_precision_layers(cls, options, dense, count, dtype: torch.dtype) -> None:
    a = make(cls, options, dtype=torch.float32)
    a.base.to(dtype)
    x = torch.randn(40, 16).to(dtype)
    assert not a.fusable(x)  # fp32 adapter on a half layer: the FFT path, in fp32
    y = a(x)
    assert y.dtype == dtype
    want = a.base(x).float() + x.float() @ a.delta_weight().T
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=5e-2)
    y.float().square().mean().backward()
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for _, p in a.own_parameters())


def test_conv1d_layers() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    for method in ("circulant", "toeplitz", "ldr"):
        model = loraplex.adapt(transformers.GPT2LMHeadModel(config).eval(), method, targets=r".*attn\.c_proj")
        perturb(model)
        [(_, a)] = loraplex.adapters(model)
        assert a.transposed
        for rows in (3, 40):
            x = torch.randn(rows, 16)
            torch.testing.assert_close(a(x), a.base(x) + x @ a.delta_weight().T, rtol=1e-5, atol=1e-5)


def test_stacked_adapters_add_up_on_both_paths() -> None:
    model = loraplex.adapt(MODELS[1].make(), "toeplitz", targets=["query"], name="a")
    loraplex.adapt(model, "ldr", targets=["query"], name="b", displacement_rank=2)
    loraplex.adapt(model, "circulant", targets=["query"], name="c")
    perturb(model)
    top = model.query
    adapters = Adapter.stack(top)
    for rows in (3, 40):  # the innermost adapter merges its weight from 16 rows on
        x = torch.randn(rows, 16)
        delta = sum(a.delta_weight() for a in adapters)
        torch.testing.assert_close(top(x), top.root(x) + x @ delta.T, rtol=1e-5, atol=1e-5)


# 4. Errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Circulant, Toeplitz, LDR])
def test_square_only(cls: type[Adapter]) -> None:
    with pytest.raises(ValueError) as e:
        cls(nn.Linear(13, 29))
    assert str(e.value) == f"{cls.method} needs a square layer: in_features=13 != out_features=29"
    with pytest.raises(ValueError, match=rf"layer 'proj' \({cls.method}\): .*in_features=13 != out_features=29"):
        loraplex.adapt(MODELS[2].make(), cls.method)


def test_bad_options() -> None:
    layer = nn.Linear(8, 8)
    for cls in (Circulant, Toeplitz, LDR):
        for bad in (float("nan"), float("inf"), True, "1"):
            with pytest.raises(ValueError, match=r"alpha=.* must be a finite number"):
                cls(layer, alpha=bad)
        with pytest.raises(ValueError, match=r"dropout=1.0 must be a number in \[0, 1\)"):
            cls(layer, dropout=1.0)
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match=rf"product={bad!r} must be True or False"):
            Circulant(layer, product=bad)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"displacement_rank={bad!r} must be an integer >= 1"):
            LDR(layer, displacement_rank=bad)
    with pytest.raises(ValueError, match="method 'toeplitz' has no option 'rank'"):
        loraplex.adapt(MODELS[1].make(), "toeplitz", targets=["query"], rank=4)
