"""LoHa: Hadamard kernels against the dense product, parity with HuggingFace PEFT (outputs, ΔW, gradients,
seeded dropouts), checkpoints both ways, Conv1D, half precision and option errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matrix import MODELS, export_to_peft, import_from_peft, perturb
from torch import nn

import loraplex
from loraplex.adapters.loha import (
    LoHa,
    hadamard_linear,
    hadamard_weight,
    khatri_rao_factors,
    lycoris_dropout,
    use_khatri_rao,
)

peft = pytest.importorskip("peft")
# loraplex.export_peft writes "bias": "none" for every method, a field LyCORIS configs (LoHa, LoKr) lack:
# PEFT ignores it with this warning (peft_io.py, reported).

TOL = {torch.float64: {"rtol": 1e-9, "atol": 1e-10}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}


# 1. Kernels ----------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 9),
    r=st.integers(1, 4),
    rows=st.integers(0, 6),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    per_row=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_both_products_equal_the_dense_hadamard_product(
    d_in: int, d_out: int, r: int, rows: int, dtype: torch.dtype, per_row: bool, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(s, generator=g, dtype=dtype, requires_grad=True) for s in [(d_out, r), (r, d_in)] * 2]
    x = torch.randn(rows, d_in, generator=g, dtype=dtype, requires_grad=True)
    scale = torch.rand(d_out, generator=g, dtype=dtype) if per_row else 0.7
    dense = (w[0] @ w[1]) * (w[2] @ w[3])  # the definition
    P, Q = khatri_rao_factors(*w)
    assert P.shape == (d_out, r * r) and Q.shape == (r * r, d_in)
    torch.testing.assert_close(P @ Q, dense, **TOL[dtype])
    torch.testing.assert_close(hadamard_weight(*w), dense, rtol=0, atol=0)
    want = x @ (dense * (scale[:, None] if per_row else scale)).T
    got = hadamard_linear(x, *w, scale)
    torch.testing.assert_close(got, want, **TOL[dtype])
    if rows:
        gy = torch.randn_like(want)
        for u, v in zip(torch.autograd.grad(got, [x, *w], gy), torch.autograd.grad(want, [x, *w], gy), strict=True):
            torch.testing.assert_close(u, v, **TOL[dtype])


def test_the_path_follows_the_multiply_add_count() -> None:
    # MiniLM, 512 rows: factored up to r = 14 (384x384) and r = 18 (384x1536, 1536x384).
    for d_in, d_out, top in [(384, 384, 14), (384, 1536, 18), (1536, 384, 18)]:
        assert use_khatri_rao(512, d_in, d_out, top, top) and not use_khatri_rao(512, d_in, d_out, top + 1, top + 1)
    assert use_khatri_rao(1, 12, 20, 2, 2) and not use_khatri_rao(5, 12, 20, 8, 8)  # r² = 64 > in·out / (in + out)


@pytest.mark.parametrize(("d_in", "d_out", "r", "khatri_rao"), [(40, 40, 2, True), (40, 40, 8, False)])
def test_both_paths_run_in_the_adapter(d_in: int, d_out: int, r: int, khatri_rao: bool) -> None:
    a = LoHa(nn.Linear(d_in, d_out), rank=r, init="kaiming").double()
    x = torch.randn(16, d_in, dtype=torch.float64)
    assert use_khatri_rao(16, d_in, d_out, r, r) == khatri_rao
    torch.testing.assert_close(a(x), a.base(x) + x @ a.delta_weight().T, **TOL[torch.float64])


# 2. Parity with PEFT ---------------------------------------------------------------------------------


def peft_loha(layer: nn.Module, ours: LoHa, **config) -> nn.Module:
    """PEFT's LoHa on a copy of ``layer``, with our parameter values."""
    cfg = peft.LoHaConfig(r=ours.rank, alpha=ours.alpha, target_modules=["0"], **config)
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(layer)), cfg)
    with torch.no_grad():
        for key, p in ours.to_peft()[1].items():
            getattr(theirs.base_model.model[0], key)["default"].copy_(p)
    return theirs


def peft_params(theirs: nn.Module) -> list[torch.Tensor]:
    layer = theirs.base_model.model[0]
    return [getattr(layer, k)["default"] for k in LoHa.peft_keys]


@pytest.mark.parametrize(
    ("d_in", "d_out", "r", "alpha", "rows"),
    [(384, 384, 8, 8.0, 512), (384, 1536, 16, 4.0, 64), (13, 29, 2, 3.0, 1)],
)  # (12, 20, 4, 8.0): fc1 of test_peft_parity.py's loha case
def test_same_parameters_same_outputs_delta_and_gradients_as_peft(
    d_in: int, d_out: int, r: int, alpha: float, rows: int
) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out)
    ours = LoHa(copy.deepcopy(layer), rank=r, alpha=alpha).eval()
    perturb(nn.Sequential(ours))
    theirs = peft_loha(layer, ours).eval()
    x = torch.randn(rows, d_in)
    y, want = ours(x), theirs(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.delta_weight(), theirs.base_model.model[0].get_delta_weight("default"))
    gy = torch.randn_like(y)
    got_grads = torch.autograd.grad(y, [ours.w1_a, ours.w1_b, ours.w2_a, ours.w2_b], gy)
    want_grads = torch.autograd.grad(want, peft_params(theirs), gy)
    for u, v in zip(got_grads, want_grads, strict=True):  # fp32 sums over up to 512 rows, in other orders
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5 * v.abs().max().item())


def test_seeded_dropouts_in_training_match_peft() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 20)
    ours = LoHa(copy.deepcopy(layer), rank=3, rank_dropout=0.4, module_dropout=0.3, init="kaiming").train()
    theirs = peft_loha(layer, ours, rank_dropout=0.4, module_dropout=0.3).train()
    x = torch.randn(5, 12)
    skipped = masked = 0
    for seed in range(12):
        torch.manual_seed(seed)
        y = ours(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)
        skipped += torch.equal(y, layer(x))
        masked += (y - layer(x)).abs().sum(0).eq(0).any().item()
    assert skipped and masked  # both dropouts happened, and matched
    ours.eval()
    torch.testing.assert_close(ours(x), layer(x) + x @ ours.delta_weight().T)  # no dropout in eval


def test_dropout_draws() -> None:
    assert lycoris_dropout(0.0, 0.0, 5, rescale=True) == (True, None)
    torch.manual_seed(0)
    keep, mask = lycoris_dropout(0.0, 0.999, 4, rescale=True)
    assert keep and mask is not None and torch.isfinite(mask).all()  # all rows dropped: zeros, not NaN
    keep, mask = lycoris_dropout(0.0, 0.5, 1000, rescale=True)
    assert mask is not None and mask.mean().item() == pytest.approx(1.0)


# 3. Checkpoints both ways ----------------------------------------------------------------------------


def test_export_loads_in_peft(tmp_path) -> None:
    spec = MODELS[0]  # fc1 12 -> 20, fc2 20 -> 18
    base = spec.make()
    ours = loraplex.adapt(copy.deepcopy(base), "loha", targets=["fc1"], rank=4, alpha=8, train=["classifier"])
    loraplex.adapt(ours, "loha", targets=["fc2"], rank=2, alpha=3)  # PEFT patterns hold only r and alpha
    perturb(ours)
    with torch.no_grad():
        ours.classifier.weight.add_(0.5)
    theirs = export_to_peft(ours, base, tmp_path).eval()
    x = spec.input()
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
    config = theirs.peft_config["default"]
    patterns = (config.rank_pattern, config.alpha_pattern)
    assert patterns in (({"fc2": 2}, {"fc2": 3.0}), ({"fc1": 4}, {"fc1": 8.0}))
    back = loraplex.import_peft(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(back(x), ours(x), rtol=1e-5, atol=1e-5)
    assert (back.fc1.rank, back.fc1.scale, back.fc2.rank, back.fc2.scale) == (4, 2.0, 2, 1.5)


@pytest.mark.parametrize(("init", "ours_init"), [(True, "zeros"), (False, "kaiming")])
def test_import_reads_peft_checkpoints_with_patterns(tmp_path, init: bool, ours_init: str) -> None:
    spec = MODELS[1]  # query / value 16 -> 16, up 16 -> 40
    base = spec.make()
    config = peft.LoHaConfig(
        r=4,
        alpha=6,
        rank_pattern={"up": 2},
        alpha_pattern={"value": 1},
        module_dropout=0.2,
        init_weights=init,
        target_modules=["query", "value", "up"],
        modules_to_save=["classifier"],
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()  # eval: no module dropout
    ours = import_from_peft(theirs, base, tmp_path / "peft")
    x = spec.input()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert (ours.query.rank, ours.query.scale, ours.up.rank, ours.up.scale) == (4, 1.5, 2, 3.0)
    assert (ours.value.scale, ours.up.module_dropout, ours.up.init) == (0.25, 0.2, ours_init)
    assert all(p.requires_grad for p in ours.classifier.parameters())
    again = export_to_peft(ours, base, tmp_path / "back")
    torch.testing.assert_close(again(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_conv1d_layers_adapt_but_do_not_export() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = loraplex.adapt(transformers.GPT2LMHeadModel(config).eval(), "loha", rank=2)
    perturb(model)
    for _, a in loraplex.adapters(model):
        assert a.transposed
        x = torch.randn(3, a.in_features)
        torch.testing.assert_close(a(x), a.base(x) + x @ a.delta_weight().T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Conv1D"):
        loraplex.export_peft(model, "unused")


# 4. Half precision, init, options --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_models(dtype: torch.dtype) -> None:
    spec = MODELS[1]
    model = loraplex.adapt(spec.make().to(dtype), "loha", rank=2, init="kaiming")
    y = model(spec.input(dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().square().mean().backward()
    for _, a in loraplex.adapters(model):
        assert all(p.dtype == torch.float32 and p.grad is not None for _, p in a.own_parameters())


def test_inits_and_parameter_count() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 96)
    x = torch.randn(4, 64)
    zeros = LoHa(layer, rank=4)
    assert torch.equal(zeros(x), layer(x)) and not zeros.w2_b.any()
    for a in (zeros, LoHa(layer, rank=4, init="kaiming")):
        for p in (a.w1_a, a.w1_b, a.w2_a) + (() if a.init == "zeros" else (a.w2_b,)):
            bound = 1 / math.sqrt(p.shape[1])  # kaiming_uniform(a=sqrt(5)): nn.Linear's init
            assert 0.8 * bound < p.abs().max() <= bound
    assert LoHa.num_params(64, 96, rank=4) == sum(p.numel() for _, p in zeros.own_parameters()) == 1280
    assert (zeros.rank, zeros.alpha, zeros.scale) == (4, 8.0, 2.0) and LoHa(layer).scale == 1.0  # PEFT defaults


def test_bad_options_are_value_errors() -> None:
    layer = nn.Linear(8, 8)
    for kw, match in [
        ({"rank": 0}, "rank=0 must be an integer >= 1"),
        ({"alpha": float("nan")}, "alpha=nan"),
        ({"rank_dropout": 1.0}, r"rank_dropout=1.0 must be a number in \[0, 1\)"),
        ({"module_dropout": -0.1}, "module_dropout=-0.1"),
        ({"init": "gaussian"}, "init='gaussian' must be one of 'zeros', 'kaiming'"),
    ]:
        with pytest.raises(ValueError, match=match):
            LoHa(layer, **kw)
