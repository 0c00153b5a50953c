"""GraLoRA: parity with HuggingFace PEFT (outputs, ΔW, checkpoints both ways), errors, and properties."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from matrix import MODELS, export_to_peft, import_from_peft, perturb
from torch import nn

import loraplex
from loraplex.adapters.gralora import GraLoRA, block_delta, gralora_linear
from loraplex.adapters.lora import LoRA

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.gralora.layer import Linear as PeftGraLoRA  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-5}
# loraplex's export writes PEFT's LoRA pattern fields (rank_pattern: {}), which GraloraConfig does not know.


def peft_twin(ours: GraLoRA) -> nn.Module:
    """PEFT's GraLoRA layer over a copy of the same base, holding the same parameter values."""
    config = peft.GraloraConfig(
        r=ours.grid_rank, alpha=ours.alpha, gralora_k=ours.k, hybrid_r=ours.hybrid_rank, fan_in_fan_out=ours.transposed
    )
    theirs = PeftGraLoRA(copy.deepcopy(ours.base), "default", "layer", config=config, r=ours.grid_rank)
    with torch.no_grad():
        theirs.gralora_A["default"].copy_(ours.blocks_A)
        theirs.gralora_B["default"].copy_(ours.blocks_B)
        if ours.hybrid_A is not None and ours.hybrid_B is not None:
            theirs.gralora_A_general["default"].weight.copy_(ours.hybrid_A)
            theirs.gralora_B_general["default"].weight.copy_(ours.hybrid_B)
    return theirs


@torch.no_grad()
def perturb_B(layer: GraLoRA, std: float = 0.05) -> None:
    """B (and the hybrid B) away from zero, A as initialised: trained-adapter magnitudes."""
    g = torch.Generator().manual_seed(7)
    for B in (layer.blocks_B, layer.hybrid_B):
        if B is not None:
            B.add_(std * torch.randn(B.shape, generator=g))


# (12, 20, 4, 2, 2), fc1 of test_peft_parity.py's gralora-hybrid, lives there (with gradients).
@pytest.mark.parametrize(
    "n_in, n_out, rank, k, hybrid",
    [(384, 384, 8, 2, 0), (384, 1536, 32, 4, 0), (1536, 384, 16, 2, 8), (40, 16, 8, 4, 3),
     (16, 40, 6, 2, 0), (13, 29, 3, 1, 1)],
)  # fmt: skip
def test_same_parameters_as_peft_same_outputs_and_delta(n_in, n_out, rank, k, hybrid) -> None:
    torch.manual_seed(0)
    ours = GraLoRA(nn.Linear(n_in, n_out), rank=rank, alpha=2.5 * rank, k=k, hybrid_rank=hybrid).eval()
    perturb_B(ours)  # a non-trivial check
    theirs = peft_twin(ours).eval()
    x = torch.randn(2, 3, n_in)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default"), **TOL)


def test_conv1d_matches_peft() -> None:
    torch.manual_seed(0)
    ours = GraLoRA(transformers.pytorch_utils.Conv1D(24, 16), rank=4, alpha=8, k=2, hybrid_rank=2)
    perturb(ours)
    theirs = peft_twin(ours)
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    torch.testing.assert_close(ours.delta_weight().T, theirs.get_delta_weight("default"), **TOL)  # PEFT: (in, out)
    torch.testing.assert_close(ours(x), ours.base(x) + x @ ours.delta_weight().T, **TOL)


def test_same_seed_same_init_as_peft() -> None:
    torch.manual_seed(5)
    ours = GraLoRA(nn.Linear(12, 20), rank=4, alpha=8, k=2, hybrid_rank=2)
    torch.manual_seed(5)
    theirs = PeftGraLoRA(
        nn.Linear(12, 20), "default", "l", config=peft.GraloraConfig(r=4, gralora_k=2, hybrid_r=2), r=4
    )
    torch.testing.assert_close(ours.blocks_A, theirs.gralora_A["default"], rtol=0, atol=0)
    assert not ours.blocks_B.any() and ours.hybrid_B is not None and not ours.hybrid_B.any()


# Export / import / round trips at k = 2 (hybrid 0 and 2, and the official convention, which comes back as
# PEFT's: rank 4, the same scale): test_peft_parity.py, cases gralora, gralora-hybrid, gralora-official.


def test_peft_checkpoints_import_at_k_4(tmp_path) -> None:
    spec = MODELS[1]  # a transformer block: d = 16, hidden 40
    base = spec.make()
    config = peft.GraloraConfig(r=8, alpha=12, gralora_k=4, target_modules=["query", "value", "up"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    back = import_from_peft(theirs, base, tmp_path / "peft")
    x = spec.input()
    torch.testing.assert_close(back(x), theirs(x), **TOL)
    assert {n for n, _ in loraplex.adapters(back)} == {"query", "value", "up"}
    assert back.up.k == 4 and back.up.scale == 1.5


def test_conv1d_checkpoints_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    base = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = loraplex.adapt(copy.deepcopy(base), "gralora", rank=4, alpha=8, k=2, hybrid_rank=2)
    perturb(ours)
    theirs = export_to_peft(ours, base, tmp_path)
    torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, **TOL)
    back = loraplex.import_peft(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(back(ids).logits, ours(ids).logits, **TOL)


@pytest.mark.parametrize("rank, hybrid", [(8, 4), (6, 2), (4, 0)])
def test_official_convention_counts_the_hybrid_part_in_rank(rank: int, hybrid: int) -> None:
    # issue 18: SqueezeBits' GraLoRA counts r as the total rank (grid r - h, s = alpha / r); PEFT's r is the grid's
    torch.manual_seed(0)
    official = GraLoRA(nn.Linear(12, 20), rank=rank, alpha=16, k=2, hybrid_rank=hybrid, convention="official")
    assert official.grid_rank == rank - hybrid and official.blocks_A.shape == (2, 6, rank - hybrid)
    assert official.scale == 16 / rank  # PEFT's convention at the same rank: 16 / (rank + hybrid)
    assert GraLoRA(nn.Linear(12, 20), rank=rank, alpha=16, k=2, hybrid_rank=hybrid).scale == 16 / (rank + hybrid)
    count = sum(p.numel() for _, p in official.own_parameters())
    assert count == GraLoRA.num_params(12, 20, rank=rank, hybrid_rank=hybrid, convention="official") == rank * 32
    # the same layer as PEFT's convention at rank - hybrid, and as PEFT's own layer
    twin = GraLoRA(nn.Linear(12, 20), rank=rank - hybrid, alpha=16, k=2, hybrid_rank=hybrid)
    perturb_B(official)
    twin.load_state_dict(official.state_dict())
    x = torch.randn(3, 12)
    torch.testing.assert_close(official(x), twin(x), rtol=0, atol=0)
    torch.testing.assert_close(official(x), peft_twin(official)(x), **TOL)
    torch.testing.assert_close(official.delta_weight(), peft_twin(official).get_delta_weight("default"), **TOL)


@pytest.mark.parametrize(
    "n_in, n_out, options, message",
    [
        (16, 24, {"rank": 6, "k": 3}, "k=3 must divide in_features=16"),
        (12, 20, {"rank": 6, "k": 3}, "k=3 must divide out_features=20"),
        (12, 24, {"rank": 8, "k": 3}, "k=3 must divide rank=8"),
        (
            12,
            24,
            {"rank": 8, "k": 3, "hybrid_rank": 1, "convention": "official"},
            "k=3 must divide rank - hybrid_rank=7",
        ),
        (12, 24, {"rank": 2, "hybrid_rank": 2, "convention": "official"}, "rank=2 must exceed hybrid_rank=2"),
        (12, 24, {"convention": "squeezebits"}, "convention='squeezebits' must be one of 'peft', 'official'"),
        (12, 24, {"k": 0}, "k=0 must be an integer >= 1"),
        (12, 24, {"hybrid_rank": -1}, "hybrid_rank=-1 must be an integer >= 0"),
        (12, 24, {"alpha": float("nan")}, "alpha=nan must be a finite number"),
        (12, 24, {"dropout": 1.0}, r"dropout=1.0 must be a number in \[0, 1\)"),
    ],
)
def test_clear_errors(n_in, n_out, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        GraLoRA(nn.Linear(n_in, n_out), **({"rank": 4} | options))


@pytest.mark.parametrize("hybrid", [0, 3])
def test_identity_at_init_parameter_count_and_switch_off(hybrid: int) -> None:
    layer = GraLoRA(nn.Linear(20, 18), rank=4, k=2, hybrid_rank=hybrid)
    x = torch.randn(5, 20)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
    count = sum(p.numel() for _, p in layer.own_parameters())
    assert count == GraLoRA.num_params(20, 18, rank=4, k=2, hybrid_rank=hybrid) == (4 + hybrid) * 38
    perturb(layer)
    layer.active = False
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "autocast"])
def test_low_precision_base_and_autocast(dtype) -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 40)
    layer = GraLoRA(base if dtype == "autocast" else base.to(dtype), rank=4, k=2, hybrid_rank=2)
    perturb(layer)
    assert layer.blocks_A.dtype == layer.hybrid_B.dtype == torch.float32  # type: ignore[union-attr]
    x = torch.randn(3, 16, dtype=layer.weight.dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "autocast"):
        y = layer(x)
    y.float().sum().backward()
    want = layer.base(x).float() + x.float() @ layer.delta_weight().T
    assert y.dtype == (torch.bfloat16 if dtype == "autocast" else dtype)
    assert x.grad is not None and all(p.grad is not None for _, p in layer.own_parameters())
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)


def test_stacked_effect_depends_on_x_only() -> None:
    torch.manual_seed(0)
    inner = LoRA(nn.Linear(12, 20), rank=3)
    outer = GraLoRA(inner, rank=4, k=2, hybrid_rank=1)
    perturb(outer)  # and the LoRA under it
    x = torch.randn(4, 12)
    torch.testing.assert_close(outer(x), inner(x) + x @ outer.delta_weight().T, **TOL)


dims = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(1, 3), st.integers(0, 3))


@settings(max_examples=40, deadline=None)
@given(dims=dims, lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), bias=st.booleans(),
       stacked=st.booleans(), x_grad=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_forward_and_gradients_match_the_dense_reference(dims, lead, bias, stacked, x_grad, seed) -> None:
    """Fused node (plain base) and adapter-only node (stacked) against autograd through W + ΔW, in float64."""
    k, a, c, rb, hybrid = dims
    torch.manual_seed(seed)
    base = nn.Linear(k * a, k * c, bias=bias)
    if stacked:
        base = LoRA(base, rank=2)
        perturb(base, seed=seed + 1)
    layer = GraLoRA(base, rank=k * rb, alpha=3.0, k=k, hybrid_rank=hybrid).double()
    perturb(layer, seed=seed)
    x = torch.randn(*lead, k * a, dtype=torch.float64, requires_grad=x_grad)
    got = layer(x)
    want = layer.base(x) + x @ layer.delta_weight().T
    torch.testing.assert_close(got, want)
    leaves = [p for _, p in layer.own_parameters()] + ([x] if x_grad else [])
    gy = torch.randn_like(got)
    for u, v in zip(torch.autograd.grad(got, leaves, gy), torch.autograd.grad(want, leaves, gy), strict=True):
        torch.testing.assert_close(u, v)


@settings(max_examples=40, deadline=None)
@given(dims=dims, n=st.integers(1, 6), base=st.sampled_from(["bias", "no bias", "none"]), seed=st.integers(0, 2**16))
def test_fused_node_matches_plain_autograd(dims, n, base, seed) -> None:
    """``gralora_linear`` (custom backward) against the formula written with plain autograd ops."""
    k, a, c, rb, h = dims
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    x, A, B, Ah, Bh = rand(n, k * a), rand(k, a, k * rb), rand(k, k * rb, c), rand(h, k * a), rand(k * c, h)
    W = None if base == "none" else rand(k * c, k * a, grad=False)
    b = rand(k * c, grad=False) if base == "bias" else None
    hyb = (Ah, Bh) if h else (None, None)
    got = gralora_linear(x, W, b, A, B, 0.7, *hyb)
    want = 0.7 * F.linear(F.linear(x, Ah), Bh) + 0.7 * x @ block_delta(A, B).T
    want = want if W is None else want + F.linear(x, W, b)
    torch.testing.assert_close(got, want)
    leaves = [x, A, B] + ([Ah, Bh] if h else [])
    gy = rand(n, k * c, grad=False)
    for u, v in zip(torch.autograd.grad(got, leaves, gy), torch.autograd.grad(want, leaves, gy), strict=True):
        torch.testing.assert_close(u, v)
