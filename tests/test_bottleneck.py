"""The serial bottleneck adapter ("adapter"): a float64 re-derivation with explicit matrices of the output and
the gradients of every structure, identity at init, merge refusal, unload, stacking refusal, option errors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from matrix import MODELS, perturb
from test_structured import C, T
from torch import nn

import loraplex
from loraplex.adapters.bottleneck import ACTIVATIONS, Bottleneck, kronecker_factor

# (options, the map(s) from the definitions as explicit matrices, trainable count on a 13 -> 29 layer)
STRUCTURES = [
    ({"bottleneck": 5}, 2 * 5 * 29 + 5 + 29),
    ({"structure": "circulant"}, 3 * 29),
    ({"structure": "circulant", "product": False, "activation": "tanh"}, 2 * 29),
    ({"structure": "toeplitz"}, 3 * 29),
    ({"structure": "toeplitz", "product": False, "activation": "silu"}, 2 * 29),
    ({"structure": "kronecker", "activation": "linear"}, 1 + 29 * 29 + 29),  # 29 is prime: factor 1
]
IDS = [",".join(f"{k}={v}" for k, v in o.items()) for o, _ in STRUCTURES]


def explicit(a: Bottleneck, h: torch.Tensor) -> torch.Tensor:
    """``h + f(h)`` with every map written out as a dense matrix from its definition."""
    act = {"gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu, "linear": lambda z: z, "relu": F.relu}[a.activation]
    if a.structure == "dense":
        return h + act(h @ a.down.T + a.down_bias) @ a.up.T + a.up_bias
    if a.structure == "circulant":
        M = C(a.a if a.b is None else a.a * a.b)
    elif a.structure == "toeplitz":
        M = T(a.a) if a.b is None else T(a.b) @ T(a.a)
    else:
        M = torch.kron(a.B, a.A)
    return h + act(h @ M.T) + a.out_bias


def built(options: dict, layer: tuple[int, int] = (13, 29)) -> Bottleneck:
    torch.manual_seed(0)
    a = Bottleneck(nn.Linear(*layer), **options).double().eval()
    perturb(nn.Sequential(a), scale=0.3)
    return a


# 1. Against the explicit matrices ------------------------------------------------------------------


@pytest.mark.parametrize(("options", "count"), STRUCTURES, ids=IDS)
def test_output_and_gradients_equal_the_explicit_matrices(options: dict, count: int) -> None:
    a = built(options)
    own = [p for _, p in a.own_parameters()]
    assert sum(p.numel() for p in own) == count == Bottleneck.num_params(13, 29, **options)
    x = torch.randn(3, 4, 13, dtype=torch.float64, requires_grad=True)
    y = a(x)
    want = explicit(a, a.base(x))
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y)
    for u, v in zip(torch.autograd.grad(y, [x, *own], gy), torch.autograd.grad(want, [x, *own], gy), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


def test_kronecker_with_a_factor_is_kron_b_a() -> None:
    a = built({"structure": "kronecker", "factor": 4}, layer=(12, 20))
    assert a.A.shape == (4, 4) and a.B.shape == (5, 5)
    x = torch.randn(6, 12, dtype=torch.float64)
    torch.testing.assert_close(a(x), explicit(a, a.base(x)), rtol=1e-10, atol=1e-10)


def test_the_structured_maps_are_square_on_the_output() -> None:
    """As the reference: the structured adapter is one out x out map on the layer output, no bottleneck."""
    layer = nn.Linear(13, 29)
    assert Bottleneck(layer, structure="circulant").a.shape == (29,)
    assert Bottleneck(layer, structure="toeplitz").b.shape == (29,)
    dense = Bottleneck(layer)
    assert dense.down.shape == (64, 29) and dense.up.shape == (29, 64)  # Houlsby's m = 64 by default
    assert [kronecker_factor(d) for d in (384, 768, 16, 20, 29)] == [16, 24, 4, 4, 1]


# 2. Identity at init, inits ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("structure", "activation"),
    [
        (s, a)
        for s in ("dense", "circulant", "toeplitz", "kronecker")
        for a in sorted(ACTIVATIONS)
        if s == "dense" or a not in ("relu", "relu6")
    ],  # fmt: skip
)
def test_identity_at_init(structure: str, activation: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 20)
    x = torch.randn(5, 12)
    assert torch.equal(Bottleneck(layer, structure=structure, activation=activation)(x), layer(x))


def test_inits() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 512)
    a = Bottleneck(layer)
    assert 0.018 < a.down.std() < 0.022 and not a.down_bias.any() and not a.up.any() and not a.up_bias.any()
    for structure in ("circulant", "toeplitz"):
        a = Bottleneck(layer, structure=structure)
        assert 0.018 < a.a.std() < 0.022 and not a.b.any() and not a.out_bias.any()
        assert not Bottleneck(layer, structure=structure, product=False).a.any()
    a = Bottleneck(layer, structure="kronecker")  # 512 = 16 * 32
    assert a.A.shape == (16, 16) and 0.015 < a.A.std() < 0.025 and not a.B.any()


def test_training_leaves_the_init() -> None:
    """Every structure's generators get gradients after the first step (the default gelu has slope 1/2 at 0)."""
    for structure in ("dense", "circulant", "toeplitz", "kronecker"):
        torch.manual_seed(0)
        a = Bottleneck(nn.Linear(12, 20), structure=structure)
        before = {n: p.detach().clone() for n, p in a.own_parameters()}
        opt = torch.optim.AdamW([p for _, p in a.own_parameters()], lr=1e-2)
        for _ in range(3):
            a(torch.randn(5, 12)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        assert all(not torch.equal(p, before[n]) for n, p in a.own_parameters())


# 3. Merge, unload, stacking, dtypes ----------------------------------------------------------------


def test_merge_refuses_and_leaves_the_model() -> None:
    spec = MODELS[1]
    model = loraplex.adapt(spec.make(), "adapter", targets=["out", "down"], structure="toeplitz")
    perturb(model)
    x = spec.input()
    y = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer 'out' carries a 'adapter' adapter, which is not a weight update"):
        loraplex.merge(model)
    assert len(loraplex.adapters(model)) == 2
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"structure='toeplitz'\) is not a weight update"):
        model.out.delta_weight()


def test_unload_restores_the_base() -> None:
    spec = MODELS[0]
    base = spec.make()
    model = loraplex.adapt(spec.make(), "adapter", bottleneck=3)
    perturb(model)
    x = spec.input()
    assert not torch.allclose(model(x), base(x))
    with loraplex.disabled(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    loraplex.unload(model)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    assert model.state_dict().keys() == base.state_dict().keys()


def test_refuses_to_stack_and_leaves_the_model() -> None:
    model = loraplex.adapt(MODELS[1].make(), "lora", targets=["query"], rank=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot stack on another adapter .*'lora'"):
        loraplex.adapt(model, "adapter", targets=["query"], name="b")
    assert [a.method for _, a in loraplex.adapters(model)] == ["lora"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("options", "count"), STRUCTURES, ids=IDS)
def test_half_precision_layers(options: dict, count: int, dtype: torch.dtype) -> None:
    a = built(options).float()
    a.base.to(dtype)
    x = torch.randn(6, 13).to(dtype)
    y = a(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), explicit(a, a.base(x).float()), rtol=2e-2, atol=3e-2)
    y.float().square().mean().backward()
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for _, p in a.own_parameters())


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    a = Bottleneck(nn.Linear(12, 20), structure="circulant", dropout=0.5)
    perturb(nn.Sequential(a))
    x = torch.randn(5, 12)
    h = a.base(x)
    assert not torch.allclose(a(x), explicit(a, h))
    a.eval()
    torch.testing.assert_close(a(x), explicit(a, h))


# 4. Errors ---------------------------------------------------------------------------------------


def test_option_errors() -> None:
    layer = nn.Linear(12, 20)
    cases = [
        (
            {"structure": "butterfly"},
            "structure='butterfly' must be one of 'dense', 'circulant', 'toeplitz', 'kronecker'",
        ),
        ({"bottleneck": 0}, "bottleneck=0 must be an integer >= 1"),
        ({"bottleneck": 2.5}, "bottleneck=2.5 must be an integer >= 1"),
        ({"structure": "circulant", "bottleneck": 8}, "bottleneck=8 applies to structure='dense' only"),
        ({"factor": 4}, "factor=4 applies to structure='kronecker' only"),
        ({"structure": "kronecker", "factor": 3}, "factor=3 must divide out_features=20"),
        ({"structure": "kronecker", "factor": 0}, "factor=0 must be an integer >= 1"),
        ({"product": False}, "product=False applies to structure='circulant' or 'toeplitz' only"),
        ({"structure": "toeplitz", "product": 0}, "product=0 must be True or False"),
        ({"activation": "sigmoid"}, "activation='sigmoid' must be one of"),
        ({"structure": "circulant", "activation": "relu"}, "activation='relu' has zero slope at 0"),
        ({"structure": "kronecker", "activation": "relu6"}, "activation='relu6' has zero slope at 0"),
        ({"dropout": -0.1}, "dropout=-0.1 must be a number in [0, 1)"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            Bottleneck(layer, **options)
    with pytest.raises(ValueError, match="layer 'fc1' .*factor=3 must divide out_features=20"):
        loraplex.adapt(MODELS[0].make(), "adapter", structure="kronecker", factor=3)


def test_circulant_product_false_keeps_the_output_bias_a_documented_departure() -> None:
    # issue 18: the reference's CirculantLayer drops circulant_bias when use_prod=False; we keep out_bias
    torch.manual_seed(0)
    layer = Bottleneck(nn.Linear(8, 8), structure="circulant", product=False)
    with torch.no_grad():
        layer.a.normal_()
        layer.out_bias.normal_()
    x = torch.randn(3, 8)
    h = layer.base(x)
    c = torch.stack([torch.roll(layer.a, i) for i in range(8)], dim=1)  # C(a)[i, j] = a[(i - j) mod 8]
    want = h + F.gelu(h @ c.T) + layer.out_bias
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    layer(x).sum().backward()
    assert layer.out_bias.grad is not None and layer.out_bias.grad.abs().min() > 0
    assert Bottleneck.num_params(8, 8, structure="circulant", product=False) == 16
    doc = Bottleneck.__doc__ or ""
    assert "Departure (our decision, issue 18)" in doc and "no output bias in its" in doc
