"""ARD-LoRA: the hard rank mask (the reported rank is the rank of ΔW, issue 18) and its straight-through
gradient, ΔW against a per-head dense re-derivation, the ℓ1 + TV regulariser's gradients, rank shrinkage,
clamping, option errors and exact resume."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matrix import MODELS, perturb
from slices import write_slice
from torch import nn
from torch.func import functional_call

import loraplex
from loraplex.adapters.ardlora import ARDLoRA, effective_ranks, rank_mask, soft_rank_mask
from loraplex.checkpoint import join_state, split_state
from loraplex.io import read_tensors, write_tensors
from loraplex.rank.ardlora import ARDLoRAAllocator, ard_penalty

BLOCK = MODELS[1]  # q / k / v / out 16 -> 16, up 16 -> 40, down 40 -> 16


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny ops: one thread is faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ard_block(**options) -> nn.Module:
    return loraplex.adapt(BLOCK.make(), "ardlora", train=["classifier"], **{"rank": 4, "heads": 2, **options})


def scales(model: nn.Module) -> list[torch.Tensor]:
    return [a.rank_scale for _, a in loraplex.adapters(model)]


# The mask -------------------------------------------------------------------------------------------


def test_soft_mask_values() -> None:
    m = soft_rank_mask(torch.tensor([0.5, 1.0], dtype=torch.float64), 4, 0.5)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    want = [[sig(3.0), sig(1.0), sig(-1.0), sig(-3.0)], [sig(7.0), sig(5.0), sig(3.0), sig(1.0)]]
    torch.testing.assert_close(m, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    assert m[1, -1] == pytest.approx(sig(0.5 / 0.5))  # the top component at α = 1: sigmoid(½ / τ)


@settings(max_examples=60, deadline=None)
@given(rank=st.integers(1, 16), data=st.data())
def test_the_reported_rank_is_the_number_of_mask_entries_above_one_half(rank: int, data) -> None:
    alpha = data.draw(st.floats(1.0 / rank, 1.0))
    x = rank * alpha
    if abs(x - math.floor(x) - 0.5) < 1e-6:  # exact halves: the sigmoid sits at ½
        return
    a = torch.tensor([alpha], dtype=torch.float64)
    above = int(soft_rank_mask(a, rank, 0.5).gt(0.5).sum())
    assert above == int(effective_ranks(a, rank)[0]) == max(1, round(x))


def test_effective_rank_floor_cap_and_halves() -> None:
    assert effective_ranks(torch.tensor([0.0, -1.0, 1.0, 3.0, 0.25, 0.3125]), 8).tolist() == [1, 1, 8, 8, 2, 2]


# ΔW and gradients -----------------------------------------------------------------------------------


def dense_per_head(a: ARDLoRA) -> torch.Tensor:
    """ΔW built head by head from the paper's formula: the factors truncated to r = max(1, round(r0 α))."""
    r0, H, s = a.rank, a.heads, a.scale
    rows = a.out_features // H
    blocks = []
    for h in range(H):
        r = max(1, min(r0, math.ceil(r0 * float(a.rank_scale[h].detach()) - 0.5)))  # round, halves down
        B_h = a.B[h * rows : (h + 1) * rows, :r]  # (out / H, r)
        A_h = a.A[h * r0 : h * r0 + r]  # (r, in)
        blocks.append(s * B_h @ A_h)
    return torch.cat(blocks)


def head_numerical_ranks(a: ARDLoRA) -> list[int]:
    dw = a.delta_weight().detach().double().view(a.heads, a.out_features // a.heads, a.in_features)
    return [int(torch.linalg.matrix_rank(d)) for d in dw]


def test_hard_mask_values_and_straight_through_gradient() -> None:
    alpha = torch.tensor([0.5, 0.1, 1.0], dtype=torch.float64, requires_grad=True)
    m = rank_mask(alpha, 4, 0.5)
    assert m.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]  # exact zeros and ones
    w = torch.randn(3, 4, dtype=torch.float64)
    (g,) = torch.autograd.grad((m * w).sum(), alpha)
    soft = soft_rank_mask(alpha.detach(), 4, 0.5)
    torch.testing.assert_close(g, (w * soft * (1 - soft) * 4 / 0.5).sum(1), rtol=1e-12, atol=0)  # ∂s/∂α


@settings(max_examples=60, deadline=None)
@given(heads=st.integers(1, 3), rank=st.integers(1, 8), data=st.data())
def test_numerical_rank_of_each_head_never_exceeds_the_reported_rank(heads: int, rank: int, data) -> None:
    """Issue 18: with the soft mask, a head reported at rank 1 had a ΔW of numerical rank r0."""
    alphas = data.draw(st.lists(st.floats(0.0, 1.0), min_size=heads, max_size=heads))
    torch.manual_seed(rank)
    a = ARDLoRA(nn.Linear(12, 10 * heads), rank=rank, heads=heads).double()
    with torch.no_grad():
        a.B.normal_()
        a.rank_scale.copy_(torch.tensor(alphas))
    reported = a.effective_ranks().tolist()
    assert head_numerical_ranks(a) == reported  # random factors: exactly the reported rank, never more
    assert all(r == max(1, min(rank, math.ceil(rank * x - 0.5))) for r, x in zip(reported, alphas, strict=True))


def test_components_past_the_effective_rank_contribute_exactly_zero() -> None:
    torch.manual_seed(0)
    a = ARDLoRA(nn.Linear(6, 8), rank=4, heads=2).double()
    perturb(nn.Sequential(a), scale=0.5)
    with torch.no_grad():
        a.rank_scale.copy_(torch.tensor([0.5, 0.25]))  # ranks 2 and 1
    assert a.effective_ranks().tolist() == [2, 1]
    x = torch.randn(5, 6, dtype=torch.float64)
    y, dw = a(x), a.delta_weight()
    off_A = torch.zeros_like(a.A, dtype=torch.bool)
    off_A[2:4], off_A[5:8] = True, True  # head 0's components 3, 4; head 1's 2..4
    off_B = torch.zeros_like(a.B, dtype=torch.bool)
    off_B[:4, 2:], off_B[4:, 1:] = True, True
    with torch.no_grad():
        a.A[off_A] += 100.0
        a.B[off_B] -= 100.0
    assert torch.equal(a(x), y) and torch.equal(a.delta_weight(), dw)  # bit for bit
    a(x).square().sum().backward()
    assert not a.A.grad[off_A].any() and not a.B.grad[off_B].any()  # frozen while switched off
    assert a.A.grad[~off_A].abs().min() > 0 and a.B.grad[~off_B].abs().min() > 0
    assert torch.isfinite(a.rank_scale.grad).all() and a.rank_scale.grad.abs().min() > 0  # straight-through


def test_ranks_stay_real_while_training_and_fall_below_r0() -> None:
    """A full-rank target: B and A would re-grow any scaled-down component; ℓ1 still lowers the rank."""
    torch.manual_seed(0)
    model = nn.Sequential(ARDLoRA(nn.Linear(12, 12), rank=6, heads=3).double())
    a = model[0]
    alloc = ARDLoRAAllocator(model, 300, l1=0.05, tv=0.005)
    opt = torch.optim.Adam([p for _, p in a.own_parameters()], lr=1e-2)
    target = torch.randn(12, 12, dtype=torch.float64)
    seen = set()
    for _ in range(300):
        (a.delta_weight() - target).square().mean().backward()
        alloc.before_step()
        opt.step()
        alloc.step(opt)
        opt.zero_grad()
        reported = alloc.head_ranks()["0"]
        assert all(n <= r for n, r in zip(head_numerical_ranks(a), reported, strict=True)), reported
        seen.update(reported)
    assert max(alloc.head_ranks()["0"]) < 6 and len(seen) > 2  # the ranks moved, and ended below r0
    assert sum(alloc.head_ranks()["0"]) == alloc.ranks()["0"]


def test_merge_and_save_load_keep_the_truncated_update(tmp_path) -> None:
    torch.manual_seed(0)
    model = ard_block()
    perturb(model, scale=0.5)
    with torch.no_grad():
        model.query.rank_scale.copy_(torch.tensor([0.25, 0.5]))  # ranks 1, 2
    x = BLOCK.input()
    y = model(x)
    dw = model.query.delta_weight().detach()
    loraplex.save(model, tmp_path / "ad")
    loaded = loraplex.load(BLOCK.make(), tmp_path / "ad")
    assert loaded.query.effective_ranks().tolist() == [1, 2]
    assert torch.equal(loaded.query.delta_weight(), dw) and torch.equal(loaded(x), y)
    base = BLOCK.make().query.weight.detach()
    merged = loraplex.merge(loaded)
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
    per_head = (merged.query.weight.detach() - base).double().view(2, 8, 16)
    assert [int(torch.linalg.matrix_rank(d, rtol=1e-5)) for d in per_head] == [1, 2]


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 12),
    rows=st.integers(1, 6),
    heads=st.integers(1, 4),
    rank=st.integers(1, 6),
    temperature=st.sampled_from([0.1, 0.5, 2.0]),
)
def test_delta_weight_and_forward_are_the_per_head_formula(d_in, rows, heads, rank, temperature) -> None:
    torch.manual_seed(0)
    a = ARDLoRA(nn.Linear(d_in, rows * heads), rank=rank, heads=heads, alpha=3.0, temperature=temperature).double()
    perturb(nn.Sequential(a), scale=0.5)
    assert a.scale == 3.0 / rank
    want = dense_per_head(a)
    torch.testing.assert_close(a.delta_weight(), want, rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 3, d_in, dtype=torch.float64)
    torch.testing.assert_close(a(x), a.base(x) + x @ want.T, rtol=1e-12, atol=1e-12)
    assert sum(p.numel() for _, p in a.own_parameters()) == ARDLoRA.num_params(
        d_in, rows * heads, rank=rank, heads=heads
    )


def test_gradients_reach_alpha_through_the_mask() -> None:
    torch.manual_seed(0)
    a = ARDLoRA(nn.Linear(6, 8), rank=3, heads=2).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    a(x).sum().backward()
    assert torch.equal(a.rank_scale.grad, torch.zeros(2, dtype=torch.float64))  # B = 0 at init
    perturb(nn.Sequential(a))
    with torch.no_grad():
        a.rank_scale.copy_(torch.tensor([0.6, 0.9]))  # ranks 2 and 3 (of 3)
    params = {k: p.detach().clone().requires_grad_() for k, p in a.own_parameters()}

    def f(scale, A, B):
        return functional_call(a, {"rank_scale": scale, "A": A, "B": B}, (x,))

    scale = params["rank_scale"].detach()
    assert torch.autograd.gradcheck(lambda A, B: f(scale, A, B), (params["A"], params["B"]))
    # α: the straight-through gradient, ∂L/∂m at the hard mask times the soft mask's ∂s/∂α
    (g,) = torch.autograd.grad(f(params["rank_scale"], params["A"], params["B"]).sum(), params["rank_scale"])
    m = rank_mask(scale, 3, a.temperature).requires_grad_()
    B, A = params["B"].detach().view(2, 4, 3), params["A"].detach().view(2, 3, 6)
    dw = torch.bmm(B * (a.scale * m)[:, None, :], A).reshape(8, 6)
    (gm,) = torch.autograd.grad((x @ dw.T).sum(), m)
    soft = soft_rank_mask(scale, 3, a.temperature)
    torch.testing.assert_close(g, (gm * soft * (1 - soft) * 3 / a.temperature).sum(1), rtol=1e-10, atol=1e-12)
    assert torch.isfinite(g).all() and g.abs().min() > 0


def test_identity_at_init_and_half_precision() -> None:
    torch.manual_seed(0)
    a = ARDLoRA(nn.Linear(16, 8), heads=4)
    x = torch.randn(3, 16)
    assert torch.equal(a(x), a.base(x))
    assert torch.equal(a.rank_scale, torch.ones(4)) and a.effective_ranks().tolist() == [8] * 4
    h = ARDLoRA(nn.Linear(16, 8).to(torch.bfloat16), heads=2)
    perturb(nn.Sequential(h))
    y = h(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for _, p in h.own_parameters())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"heads": 3}, r"heads=3 must divide out_features=16; valid head counts: 1, 2, 4, 8, 16"),
        ({"heads": 0}, "heads=0 must be an integer >= 1"),
        ({"rank": 0}, "rank=0 must be an integer >= 1"),
        ({"temperature": 0}, "temperature=0 must be a finite number > 0"),
        ({"temperature": float("inf")}, "temperature=inf"),
        ({"alpha": float("nan")}, "alpha=nan"),
        ({"dropout": 1.0}, "dropout=1.0"),
    ],
)
def test_option_errors(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ARDLoRA(nn.Linear(4, 16), **options)


# The allocator ---------------------------------------------------------------------------------------


def test_regulariser_gradients_are_autograd_of_the_penalty() -> None:
    model = ard_block()
    alloc = ARDLoRAAllocator(model, 10, l1=0.03, tv=0.7)
    prev = [torch.rand(2) for _ in scales(model)]
    alloc.prev = dict(zip(alloc.layers, prev, strict=True))
    perturb(model)
    model(BLOCK.input()).square().mean().backward()
    task = [s.grad.clone() for s in scales(model)]
    alloc.before_step()
    want = torch.autograd.grad(
        0.03 * sum(s.abs().sum() for s in scales(model))
        + 0.7 * sum((s - p).abs().sum() for s, p in zip(scales(model), prev, strict=True)),
        scales(model),
    )
    for s, t, w, p in zip(scales(model), task, want, prev, strict=True):
        torch.testing.assert_close(s.grad, t + w, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(w, 0.03 * s.detach().sign() + 0.7 * (s.detach() - p).sign(), rtol=1e-6, atol=1e-7)


def run(model, alloc, opt, steps, task: bool = True) -> None:
    for i in steps:
        if task:
            model(BLOCK.input(seed=100 + i)).square().mean().backward()
        alloc.before_step()
        opt.step()
        alloc.step(opt)
        opt.zero_grad()


def test_l1_drives_scales_and_ranks_down_without_a_task_loss() -> None:
    model = ard_block(rank=4)
    alloc = ARDLoRAAllocator(model, 40, l1=1e-3, tv=0.0, lr_scale=1.0)
    opt = torch.optim.Adam(scales(model), lr=0.05)
    assert set(alloc.ranks().values()) == {8}  # 2 heads x rank 4
    history = []
    for _ in range(25):
        run(model, alloc, opt, [0], task=False)
        history.append(sum(alloc.ranks().values()))
    assert history == sorted(history, reverse=True) and history[-1] < history[0] <= 8 * 6
    for s in scales(model):
        torch.testing.assert_close(s.detach(), torch.full((2,), 0.25))  # clamped at 1 / r0
    assert set(alloc.ranks().values()) == {2} and set(map(tuple, alloc.head_ranks().values())) == {(1, 1)}


def test_tv_penalises_change_against_the_previous_step() -> None:
    model = ard_block()
    alloc = ARDLoRAAllocator(model, 10, l1=0.0, tv=1.0, lr_scale=1.0)
    opt = torch.optim.SGD(scales(model), lr=0.1)
    alloc.before_step()  # α = α_prev: no change, no penalty
    assert all(s.grad is None or not s.grad.any() for s in scales(model))
    assert ard_penalty(scales(model), list(alloc.prev.values()), 0.0, 1.0).item() == 0
    opt.step()
    alloc.step(opt)
    with torch.no_grad():
        model.query.rank_scale.copy_(torch.tensor([0.5, 0.9]))  # a jump away from α_prev = 1
    before = model.query.rank_scale.detach().clone()
    alloc.before_step()
    torch.testing.assert_close(model.query.rank_scale.grad, (before - 1).sign())  # TV = |Δα|: tv · sign(Δα)
    opt.step()  # pulled back towards the previous value
    assert (model.query.rank_scale.detach() > before).all()
    alloc.step(opt)
    torch.testing.assert_close(alloc.prev["query"], before)  # α_prev: what this step's forward used
    assert alloc.t == 2


def test_lr_scale_multiplies_the_optimizer_step_of_alpha_only() -> None:
    model = ard_block(rank=8)
    alloc = ARDLoRAAllocator(model, 10, l1=0.0, tv=0.0, lr_scale=4.0)
    perturb(model, scale=0.05)
    with torch.no_grad():
        for s in scales(model):
            s.fill_(0.5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(BLOCK.input()).square().mean().backward()
    grads = [s.grad.clone() for s in scales(model)]
    B_before, B_grad = model.query.B.detach().clone(), model.query.B.grad.clone()
    alloc.before_step()
    opt.step()
    alloc.step(opt)
    for s, g in zip(scales(model), grads, strict=True):
        torch.testing.assert_close(s.detach(), 0.5 - 4.0 * 1e-3 * g)
    torch.testing.assert_close(model.query.B.detach(), B_before - 1e-3 * B_grad)  # factors: the optimizer's step
    frozen = ARDLoRAAllocator(model, 10, lr_scale=0.0)
    before = [s.detach().clone() for s in scales(model)]
    model(BLOCK.input()).square().mean().backward()
    frozen.before_step()
    opt.step()
    frozen.step(opt)
    assert all(torch.equal(s, b) for s, b in zip(scales(model), before, strict=True))
    with pytest.raises(ValueError, match="lr_scale=-1 must be a finite number >= 0"):
        ARDLoRAAllocator(model, 10, lr_scale=-1)


def test_step_clamps_to_one_over_r0_and_one() -> None:
    model = ard_block(rank=8)
    alloc = ARDLoRAAllocator(model, 10)
    opt = torch.optim.SGD(scales(model), lr=0.0)
    with torch.no_grad():
        model.up.rank_scale.copy_(torch.tensor([1.7, -0.3]))
        model.down.rank_scale.copy_(torch.tensor([0.5, 0.01]))
    alloc.step(opt)
    assert model.up.rank_scale.tolist() == [1.0, 0.125] and model.down.rank_scale.tolist() == [0.5, 0.125]
    assert alloc.head_ranks()["up"] == [8, 1] and alloc.ranks()["down"] == 5


def test_state_dict_round_trip_resumes_identically(tmp_path) -> None:
    model = ard_block()
    alloc = ARDLoRAAllocator(model, 16, l1=0.05, tv=0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    run(model, alloc, opt, range(5))
    text, tensors = split_state({"alloc": alloc.state_dict(), "opt": opt.state_dict()})
    write_tensors(tmp_path / "s.safetensors", tensors)
    (tmp_path / "s.json").write_text(json.dumps(text))
    resumed = copy.deepcopy(model)
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=2e-2)
    alloc2 = ARDLoRAAllocator(resumed, 16, l1=0.05, tv=0.5)
    state = join_state(json.loads((tmp_path / "s.json").read_text()), read_tensors(tmp_path / "s.safetensors"))
    opt2.load_state_dict(state["opt"])
    alloc2.load_state_dict(state["alloc"])
    assert alloc2.t == 5 and alloc2.ranks() == alloc.ranks()
    assert all(torch.equal(alloc.prev[n], alloc2.prev[n]) for n in alloc.prev)
    run(model, alloc, opt, range(5, 10))
    run(resumed, alloc2, opt2, range(5, 10))
    for (n, a), (_, b) in zip(loraplex.adapters(model), loraplex.adapters(resumed), strict=True):
        for k in ("A", "B", "rank_scale"):
            assert torch.equal(getattr(a, k), getattr(b, k)), f"{n}.{k}"
    assert alloc2.ranks() == alloc.ranks()
    fresh = ARDLoRAAllocator(copy.deepcopy(model), 16, l1=0.05, tv=0.5)
    with pytest.raises(ValueError, match="names layers"):
        fresh.load_state_dict({"t": 1, "prev": {"query": torch.ones(2)}})
    bad = {n: torch.ones(3) for n in alloc.prev}
    with pytest.raises(ValueError, match="has shape \\(3,\\), expected \\(2,\\)"):
        fresh.load_state_dict({"t": 1, "prev": bad})


def test_allocator_errors() -> None:
    with pytest.raises(ValueError, match="needs a model with ardlora adapters.*lora"):
        ARDLoRAAllocator(loraplex.adapt(BLOCK.make(), "lora", rank=2), 10)
    with pytest.raises(ValueError, match="has: none"):
        ARDLoRAAllocator(BLOCK.make(), 10)
    model = ard_block()
    with pytest.raises(ValueError, match="l1=-0.1 must be a finite number >= 0"):
        ARDLoRAAllocator(model, 10, l1=-0.1)
    with pytest.raises(ValueError, match="tv=nan"):
        ARDLoRAAllocator(model, 10, tv=float("nan"))
    with pytest.raises(ValueError, match="total_steps=0"):
        ARDLoRAAllocator(model, 0)
    loraplex.adapt(model, "ardlora", targets=["up"], name="second", rank=2)
    with pytest.raises(ValueError, match="several ardlora adapters"):
        ARDLoRAAllocator(model, 10)
    with pytest.raises(ValueError, match="name='third'"):
        ARDLoRAAllocator(model, 10, name="third")
    assert ARDLoRAAllocator(model, 10, name="second").ranks() == {"up": 2}


def test_registered() -> None:
    from loraplex.cli import parser
    from loraplex.rank import ALLOCATORS

    assert ALLOCATORS["ardlora"] is ARDLoRAAllocator and loraplex.METHODS["ardlora"] is ARDLoRA
    args = parser().parse_args(["finetune", "--method", "ardlora", "--allocator", "ardlora"])
    assert (args.method, args.allocator) == ("ardlora", "ardlora")


@pytest.mark.slow
def test_finetune_with_the_allocator(tmp_path) -> None:
    from loraplex.cli import main

    small = write_slice(tmp_path, 48, 16)
    out = tmp_path / "run"
    argv = ["finetune", "--data", str(small), "--method", "ardlora", "--allocator", "ardlora", "--epochs", "1"]
    argv += ["--option", "heads=4", "--allocator-option", "l1=0.5"]
    code = main([*argv, "--batch-size", "16", "--max-length", "24", "--out", str(out), "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["ranks"] and all(0 < r <= 32 for r in metrics["ranks"].values())
