"""C3A: FFT kernels against dense block-circulant products, parity with HuggingFace PEFT, stacking,
half precision, and option errors."""

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
from loraplex.adapter import Adapter
from loraplex.adapters._circulant import block_circulant_matmul, circulant, circulant_linear
from loraplex.adapters.c3a import C3A

peft = pytest.importorskip("peft")
from peft.tuners.c3a.utils import BlockCircularConvolution, get_circulant_fast  # noqa: E402

TOL = {torch.float64: {"rtol": 1e-9, "atol": 1e-10}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}


def dense_circulant(w: torch.Tensor) -> torch.Tensor:
    """The definition, by an index tensor: block (i, j) row r, column c is w[i, j, (c - r) mod b]."""
    m, n, b = w.shape
    r = torch.arange(b)
    return w[:, :, (r[None, :] - r[:, None]) % b].permute(0, 2, 1, 3).reshape(m * b, n * b)


# 1. Kernels against the dense block-circulant matrix ---------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 3),
    m=st.integers(1, 3),
    b=st.sampled_from([1, 2, 3, 4, 5, 7, 8]),
    rows=st.integers(1, 5),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_fft_kernels_equal_the_dense_product(n: int, m: int, b: int, rows: int, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, b, generator=g, dtype=dtype, requires_grad=True)
    x = torch.randn(2, rows, n * b, generator=g, dtype=dtype, requires_grad=True)
    W, bias = torch.randn(m * b, n * b, generator=g, dtype=dtype), torch.randn(m * b, generator=g, dtype=dtype)
    gy = torch.randn(2, rows, m * b, generator=g, dtype=dtype)
    assert torch.equal(circulant(w), dense_circulant(w))
    s = 0.37
    for got, want in [
        (block_circulant_matmul(x, w, s), x @ (s * dense_circulant(w)).T),
        (circulant_linear(x, W, bias, w, s), x @ (W + s * dense_circulant(w)).T + bias),
    ]:
        torch.testing.assert_close(got, want, **TOL[dtype])
        for u, v in zip(torch.autograd.grad(got, [x, w], gy), torch.autograd.grad(want, [x, w], gy), strict=True):
            torch.testing.assert_close(u, v, **TOL[dtype])


def test_orientation_matches_peft() -> None:
    """PEFT's fft/ifft formulation is a circular cross-correlation; ours must be the same one."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    x = torch.randn(4, 10, generator=g, dtype=torch.float64)
    torch.testing.assert_close(circulant(w), get_circulant_fast(w), rtol=0, atol=1e-12)
    torch.testing.assert_close(block_circulant_matmul(x, w), BlockCircularConvolution.apply(x, w))


def test_half_precision_input_keeps_its_dtype_and_grad() -> None:
    w = torch.randn(2, 3, 4, requires_grad=True)
    x = torch.randn(5, 12, dtype=torch.bfloat16, requires_grad=True)
    y = block_circulant_matmul(x, w, 0.5)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert (
        x.grad is not None and x.grad.dtype == torch.bfloat16 and w.grad is not None and w.grad.dtype == torch.float32
    )
    torch.testing.assert_close(y.float(), x.float() @ (0.5 * dense_circulant(w)).T, rtol=2e-2, atol=2e-2)


# 2. Parity with PEFT on the same kernel ------------------------------------------------------------


def peft_c3a(layer: nn.Module, ours: C3A) -> nn.Module:
    """PEFT's C3A on a copy of ``layer`` with our kernel."""
    theirs = peft.get_peft_model(
        nn.Sequential(copy.deepcopy(layer)), peft.C3AConfig(block_size=ours.block_size, target_modules=["0"])
    )
    with torch.no_grad():
        theirs.base_model.model[0].c3a_kernel["default"].copy_(ours.kernel)
    return theirs


@pytest.mark.parametrize(
    ("d_in", "d_out", "b"), [(384, 384, 128), (384, 1536, 64), (12, 20, 4), (20, 18, 2), (15, 9, 3)]
)
def test_same_kernel_same_outputs_gradients_and_delta_as_peft(d_in: int, d_out: int, b: int) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out)
    ours = C3A(copy.deepcopy(layer), block_size=b, init="gaussian")
    theirs = peft_c3a(layer, ours)
    for rows in (3, 4 * b + 1):  # below and above the merged-weight threshold
        x = torch.randn(rows, d_in)
        y = ours(x)
        torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)
        gy = torch.randn_like(y)
        (got,) = torch.autograd.grad(y, ours.kernel, gy)
        (want,) = torch.autograd.grad(theirs(x), theirs.base_model.model[0].c3a_kernel["default"], gy)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    want = theirs.base_model.model[0].get_delta_weight("default")
    torch.testing.assert_close(ours.delta_weight(), want, rtol=1e-5, atol=1e-6)


# 2b. The input gradient: ours is dense autograd's; PEFT 0.21.2's is not (issue 18, item 6) ----------


def dense_reference_x_grad(ours: C3A, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """The x-gradient of ``x @ (W + delta_weight()).T + b`` by plain autograd (no FFT, no custom node)."""
    x = x.detach().requires_grad_(True)
    W = ours.base.weight.detach() + ours.delta_weight().detach()
    y = x @ W.T + ours.base.bias.detach()
    (g,) = torch.autograd.grad(y, x, gy)
    return g


@pytest.mark.parametrize(("d_in", "d_out", "b"), [(12, 20, 4), (20, 18, 2), (15, 9, 3), (64, 32, 16)])
def test_x_gradient_equals_dense_autograd_in_fp64(d_in: int, d_out: int, b: int) -> None:
    torch.manual_seed(0)
    ours = C3A(nn.Linear(d_in, d_out).double(), block_size=b, init="gaussian").double()
    for rows in (3, 4 * max(d_in, d_out) + 1):  # the FFT path and the merged-weight node
        x = torch.randn(rows, d_in, dtype=torch.float64, requires_grad=True)
        gy = torch.randn(rows, d_out, dtype=torch.float64)
        (got,) = torch.autograd.grad(ours(x), x, gy)
        torch.testing.assert_close(got, dense_reference_x_grad(ours, x, gy), rtol=1e-10, atol=1e-12)


def test_gradcheck_of_our_layer() -> None:
    torch.manual_seed(0)
    ours = C3A(nn.Linear(12, 8).double(), block_size=4, init="gaussian").double()
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    kernel = ours.kernel.detach().clone().requires_grad_(True)

    def f(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(ours, {"kernel": kernel}, (x,))

    assert torch.autograd.gradcheck(f, (x, kernel))
    x_many = torch.randn(4 * 12 + 1, 12, dtype=torch.float64, requires_grad=True)  # the merged-weight node too
    assert torch.autograd.gradcheck(f, (x_many, kernel))


def test_peft_c3a_x_gradient_is_wrong_upstream_bug() -> None:
    """DOCUMENTS AN UPSTREAM BUG, not a requirement: PEFT 0.21.2's ``BlockCircularConvolution.backward``
    returns a wrong input gradient (its outputs and kernel gradients are right, test above); ours is
    right (the two tests above), so training through a C3A layer does not match PEFT (C3A's docstring).
    If PEFT fixes it this test fails: then drop it and the docstring's statement."""
    try:
        from peft.tuners.c3a.utils import BlockCircularConvolution
    except ImportError:
        pytest.skip("PEFT's C3A does not import")
    torch.manual_seed(0)
    layer = nn.Linear(12, 20).double()
    ours = C3A(copy.deepcopy(layer), block_size=4, init="gaussian").double()
    theirs = peft_c3a(layer, ours).double()
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(5, 20, dtype=torch.float64)
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-6)  # the forward agrees (PEFT: fp32 inside)
    want = dense_reference_x_grad(ours, x, gy)
    (peft_gx,) = torch.autograd.grad(theirs(x), x, gy)
    rel = float((peft_gx - want).norm() / want.norm())
    assert rel > 0.1, f"PEFT's C3A x-gradient is now within {rel:.2e} of dense autograd: the upstream bug is fixed?"
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    xs = torch.randn(5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    assert not torch.autograd.gradcheck(
        lambda x, w: BlockCircularConvolution.apply(x, w), (xs, w), raise_exception=False
    )


def test_c3a_docs_say_training_does_not_match_peft() -> None:
    doc = " ".join((C3A.__doc__ or "").split())
    assert "Training does not match PEFT" in doc and "input gradient" in doc


# 3. Checkpoints both ways ------------------------------------------------------------------------


# Export of per-layer block sizes (fc1 4, fc2 2) with a trained head: test_peft_parity.py, case c3a-pattern.


@pytest.mark.parametrize(("init", "ours_init"), [("xavier_uniform", "xavier"), (False, "xavier"), (True, "zeros")])
def test_import_reads_peft_checkpoints_with_a_block_size_pattern(tmp_path, init, ours_init) -> None:
    spec = MODELS[1]  # query / value 16 -> 16, up 16 -> 40
    base = spec.make()
    config = peft.C3AConfig(
        block_size=8,
        block_size_pattern={"up": 4},
        init_weights=init,
        target_modules=["query", "value", "up"],
        modules_to_save=["classifier"],
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = import_from_peft(theirs, base, tmp_path / "peft")
    x = spec.input()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert (ours.query.block_size, ours.up.block_size, ours.up.init) == (8, 4, ours_init)
    assert all(p.requires_grad for p in ours.classifier.parameters())
    again = export_to_peft(ours, base, tmp_path / "back")
    torch.testing.assert_close(again(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_conv1d_layers_adapt_but_do_not_export() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = loraplex.adapt(transformers.GPT2LMHeadModel(config).eval(), "c3a", block_size=8)
    perturb(model)
    for _, a in loraplex.adapters(model):
        assert a.transposed
        for rows in (3, 40):
            x = torch.randn(rows, a.in_features)
            torch.testing.assert_close(a(x), a.base(x) + x @ a.delta_weight().T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Conv1D"):
        loraplex.export_peft(model, "unused")


# 4. Stacking, 5. half precision, init ---------------------------------------------------------------


def test_two_c3a_adapters_on_one_layer_add_up() -> None:
    model = loraplex.adapt(MODELS[1].make(), "c3a", targets=["up"], name="a", block_size=8, init="gaussian")
    loraplex.adapt(model, "c3a", targets=["up"], name="b", block_size=4, init="kaiming")
    top = model.up
    b, a = Adapter.stack(top)
    for rows in (5, 40):  # the inner adapter merges its weight from 32 rows on
        x = torch.randn(rows, 16)
        root = top.root(x)
        effects = []
        for on in ([a], [b], [a, b]):
            a.active, b.active = a in on, b in on
            effects.append(top(x) - root)
        torch.testing.assert_close(effects[2], effects[0] + effects[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(top(x), root + x @ (a.delta_weight() + b.delta_weight()).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_models(dtype: torch.dtype) -> None:
    spec = MODELS[1]
    model = loraplex.adapt(spec.make().to(dtype), "c3a", block_size=8)
    x = spec.input(dtype=dtype)
    y = model(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().square().mean().backward()
    for _, a in loraplex.adapters(model):
        assert a.kernel.dtype == torch.float32 and a.kernel.grad is not None and torch.isfinite(a.kernel.grad).all()


def test_inits_and_parameter_count() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 128)
    x = torch.randn(4, 64)
    assert torch.equal(C3A(layer, block_size=16, init="zeros")(x), layer(x))
    bounds = {"xavier": math.sqrt(6 / (64 + 128)), "kaiming": 1 / math.sqrt(64)}
    for init, bound in bounds.items():
        k = C3A(layer, block_size=16, init=init).kernel
        assert k.abs().max() <= bound and k.abs().max() > 0.9 * bound
    assert 0.8 < C3A(layer, block_size=16, init="gaussian").kernel.std() < 1.2
    a = C3A(layer, block_size=16)
    assert a.kernel.shape == (8, 4, 16) and a.kernel.numel() == C3A.num_params(64, 128, block_size=16) == 512


# 6. Errors -------------------------------------------------------------------------------------------


def test_bad_options_are_value_errors() -> None:
    with pytest.raises(ValueError) as e:
        C3A(nn.Linear(384, 384))
    assert str(e.value) == (
        "block_size=256 must divide in_features=384 and out_features=384; "
        "common divisors: 1, 2, 3, 4, 6, 8, ..., 128, 192, 384"
    )
    with pytest.raises(ValueError, match=r"block_size=4 must divide .* common divisors: 1, 2, 3, 6$"):
        C3A(nn.Linear(18, 12), block_size=4)
    for bad in (0, -2, 2.0, True, "8"):
        with pytest.raises(ValueError, match="block_size="):
            C3A(nn.Linear(16, 16), block_size=bad)
    with pytest.raises(ValueError, match="init='xavier_uniform' must be one of"):
        C3A(nn.Linear(16, 16), block_size=4, init="xavier_uniform")
    with pytest.raises(ValueError, match="layer 'fc1'.*block_size=8 must divide in_features=12"):
        loraplex.adapt(MODELS[0].make(), "c3a", block_size=8)
