"""ElaLoRA: the resizable SVD adapter (prune / grow, scale fixed at r0, save / load of resized shapes), the
allocator's pure pieces against a transcription of the reference's selection, the optimizer state carried
through resizes (AdamW's next step checked by hand), budget conservation, schedule, exact resume and errors."""

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

import loraplex
from loraplex.adapters.adalora import RANKNUM_EPS
from loraplex.adapters.elalora import ElaLoRA, grow_rank, new_direction, new_singular_value, select_ranks
from loraplex.checkpoint import join_state, split_state
from loraplex.io import read_tensors, write_tensors
from loraplex.rank.adalora import orth_penalty
from loraplex.rank.elalora import ElaLoRAAllocator, b_at, carry_optimizer, plan_changes, remap

BLOCK = MODELS[1]  # q / k / v / out 16 -> 16, up 16 -> 40, down 40 -> 16
TARGETS = ["query", "key", "value", "out", "up", "down"]
PARTS = ("A", "E", "B")


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny ops: one thread is faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def elalora_block(seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return loraplex.adapt(BLOCK.make(), "elalora", targets=TARGETS, **{"rank": 4, "alpha": 16, **options})


def adamw(model: nn.Module, **kw) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, **kw)


def train(model, alloc, opt, steps, seed: int = 5) -> list[float]:
    losses = []
    for s in steps:
        x = BLOCK.input(seed=seed + s)
        loss = model(x).square().mean()
        loss.backward()
        alloc.before_step()
        opt.step()
        alloc.step(opt)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# The adapter --------------------------------------------------------------------------------------


def test_forward_is_the_reference_formula_with_the_initial_rank_forever() -> None:
    torch.manual_seed(0)
    layer = ElaLoRA(nn.Linear(13, 29), rank=6, alpha=16)
    x = torch.randn(4, 13)
    assert torch.equal(layer(x), layer.base(x))  # E = 0 at init
    assert layer.A.std().item() == pytest.approx(0.02, rel=0.2) and layer.B.std().item() == pytest.approx(0.02, rel=0.2)
    perturb(nn.Sequential(layer))
    layer.prune(torch.tensor([0, 2, 5]))
    A, E, B = layer.A, layer.E, layer.B
    expected = layer.base(x) + (x @ (A * E).T @ B.T) * 16 / (6 + RANKNUM_EPS)  # reference: scaling/(ranknum+1e-5)
    assert layer.current_rank == 3 and layer.ranknum.item() == 6
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.base(x) + x @ layer.delta_weight().T, expected, rtol=1e-6, atol=1e-6)


def test_prune_keeps_exactly_the_chosen_ranks() -> None:
    torch.manual_seed(1)
    layer = ElaLoRA(nn.Linear(12, 20), rank=5)
    perturb(nn.Sequential(layer))
    A, E, B = (getattr(layer, p).detach().clone() for p in PARTS)
    old = {p: getattr(layer, p) for p in PARTS}
    layer.prune(torch.tensor([1, 3, 4]))
    assert all(getattr(layer, p) is not old[p] and isinstance(getattr(layer, p), nn.Parameter) for p in PARTS)
    assert torch.equal(layer.A, A[[1, 3, 4]]) and torch.equal(layer.E, E[[1, 3, 4]])
    assert torch.equal(layer.B, B[:, [1, 3, 4]])
    dense = sum(B[:, i : i + 1] * E[i] @ A[i : i + 1] for i in (1, 3, 4)) * layer.scaling / (5 + RANKNUM_EPS)
    torch.testing.assert_close(layer.delta_weight(), dense)
    with pytest.raises(ValueError, match="at least one rank"):
        layer.prune(torch.tensor([], dtype=torch.long))


def test_grow_leaves_the_output_unchanged_and_follows_the_reference() -> None:
    torch.manual_seed(2)
    layer = ElaLoRA(nn.Linear(13, 29), rank=4, alpha=16).double()
    perturb(nn.Sequential(layer), scale=0.5)
    x = torch.randn(6, 13, dtype=torch.float64)
    before = layer(x).detach()
    A, E, B = (getattr(layer, p).detach().clone() for p in PARTS)
    g = torch.Generator().manual_seed(7)
    layer.grow(g)
    assert layer.current_rank == 5 and layer.A.dtype == torch.float64
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-11)  # new E <= 1e-13
    g = torch.Generator().manual_seed(7)
    v, u = torch.randn(13, generator=g).double(), torch.randn(29, generator=g).double()
    a = v - A.T @ (A @ v)  # the reference's projection, normalised with + 1e-6
    b = u - B @ (B.T @ u)
    assert torch.equal(layer.A[:4], A) and torch.equal(layer.B[:, :4], B) and torch.equal(layer.E[:4], E)
    torch.testing.assert_close(layer.A[4], a / (a.norm() + 1e-6))
    torch.testing.assert_close(layer.B[:, 4], b / (b.norm() + 1e-6))
    assert layer.E[4].item() == min(E.abs().min().item(), 1e-13)


def test_pure_pieces() -> None:
    E = torch.tensor([[0.5], [-2.0]])
    assert new_singular_value(E).item() == pytest.approx(1e-13)
    assert new_singular_value(torch.tensor([[3e-15], [-1.0]])).item() == pytest.approx(3e-15)
    assert new_singular_value(torch.zeros(3, 1)).item() == 0.0  # E = 0 at init: the new rank is exactly 0
    A, E, B = torch.randn(4, 7), torch.randn(4, 1), torch.randn(9, 4)
    shapes = [t.shape for t in grow_rank(*select_ranks(A, E, B, torch.tensor([0, 3])), torch.randn(7), torch.randn(9))]
    assert shapes == [(3, 7), (3, 1), (9, 3)]
    t = torch.arange(12.0).view(3, 4)
    assert remap(t, torch.tensor([0, 2]), 2, 1).tolist() == [[0, 2, 0, 0], [4, 6, 0, 0], [8, 10, 0, 0]]
    assert b_at(0, b0=4, init_warmup=0, final_warmup=0, total=10) == 4
    assert b_at(10, b0=4, init_warmup=0, final_warmup=0, total=10) == 0


@settings(max_examples=30, deadline=None)
@given(r=st.integers(1, 6), n=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_new_direction_is_orthogonal_to_orthonormal_rows(r: int, n: int, seed: int) -> None:
    r = min(r, n - 1)
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0].T  # (r, n) orthonormal rows
    d = new_direction(Q, torch.randn(n, generator=g, dtype=torch.float64))
    assert d.norm().item() == pytest.approx(1.0, abs=1e-3)  # ||w|| / (||w|| + 1e-6)
    assert (Q @ d).abs().max().item() < 1e-9


def reference_plan(scores: list[torch.Tensor], k: int, b: int) -> tuple[list[list[int]], list[int]]:
    """The reference's ``mask_to_target_rank`` selection, transcribed (distinct scores, offers >= b)."""
    offers, sizes = [], []
    for s in scores:
        kk = int(min(k, s.numel() - 1))
        offers.append(torch.topk(s, kk, largest=False).values)
        sizes.append(kk)
    flat = torch.cat(offers)
    tau = torch.topk(flat, b, largest=False).values.max().item()
    owner = [i for i, size in enumerate(sizes) for _ in range(size)]
    dec = {owner[j] for j in torch.topk(flat, b, largest=False).indices.tolist()}
    grow = [0] * len(scores)
    for j in torch.topk(flat, b, largest=True).indices.tolist():
        grow[owner[j]] += 1
    prune = []
    for i, s in enumerate(scores):
        below = (s <= tau).nonzero().view(-1)
        m = min(sizes[i], below.numel()) if i in dec else 0
        prune.append(sorted(below[torch.topk(s[below], m, largest=False).indices].tolist()) if m else [])
    return prune, grow


@settings(max_examples=60, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 8), min_size=1, max_size=6),
    k=st.integers(1, 3),
    b=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_plan_matches_the_reference_and_conserves_the_total_rank(ranks, k, b, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(r, generator=g, dtype=torch.float64) for r in ranks]  # distinct almost surely
    prune, grow = plan_changes(scores, k, b)
    offers = sum(min(k, r - 1) for r in ranks)
    n = min(b, offers)
    assert sum(p.numel() for p in prune) == sum(grow) == n  # n pruned, n grown: the total is conserved
    assert all(p.numel() <= min(k, r - 1) for p, r in zip(prune, ranks, strict=True))  # never the last rank
    assert all(gr == 0 for gr, r in zip(grow, ranks, strict=True) if r == 1)  # rank 1 offers nothing
    if offers >= b:
        theirs_prune, theirs_grow = reference_plan(scores, k, b)
        assert [p.tolist() for p in prune] == theirs_prune and grow == theirs_grow


def test_ties_prune_exactly_b() -> None:
    prune, grow = plan_changes([torch.zeros(4), torch.zeros(4)], k=2, b=3)  # the reference would prune 4
    assert [p.tolist() for p in prune] == [[0, 1], [0]] and grow == [2, 1]


def test_options_follow_the_rank_and_a_resized_model_saves_and_loads(tmp_path) -> None:
    model = elalora_block()
    perturb(model)
    adapters = dict(loraplex.adapters(model))
    shared = adapters["query"].options
    adapters["query"].prune(torch.tensor([0, 1]))
    adapters["up"].grow()
    adapters["up"].grow()
    assert shared["current_rank"] is None and adapters["key"].options["current_rank"] is None  # others unchanged
    assert adapters["query"].options == {"rank": 4, "alpha": 16, "dropout": 0.0, "current_rank": 2}
    assert adapters["up"].options["current_rank"] == 6
    for a in adapters.values():
        assert sum(p.numel() for _, p in a.own_parameters()) == ElaLoRA.num_params(
            a.in_features, a.out_features, **a.options
        )
    x = BLOCK.input()
    expected = model(x)
    loraplex.save(model, tmp_path / "ckpt")
    fresh = loraplex.load(BLOCK.make(), tmp_path / "ckpt")
    ranks = {n: a.current_rank for n, a in loraplex.adapters(fresh)}
    assert ranks == {"query": 2, "key": 4, "value": 4, "out": 4, "up": 6, "down": 4}
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    assert all(a.ranknum.item() == 4 for _, a in loraplex.adapters(fresh))


def test_adapter_errors() -> None:
    with pytest.raises(ValueError, match="rank=0 must be an integer >= 1"):
        ElaLoRA(nn.Linear(4, 4), rank=0)
    with pytest.raises(ValueError, match="current_rank=0 must be an integer >= 1"):
        ElaLoRA(nn.Linear(4, 4), current_rank=0)
    with pytest.raises(ValueError, match="alpha=0 must be a finite number > 0"):
        ElaLoRA(nn.Linear(4, 4), alpha=0)
    assert ElaLoRA(nn.Linear(4, 6), rank=3, current_rank=5).A.shape == (5, 4)
    assert ElaLoRA.num_params(4, 6, rank=3, current_rank=5) == 5 * 11


# The optimizer state -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["foreach", "for-loop", "fused", "amsgrad"])
def test_adamw_state_is_carried_and_the_next_step_is_adamw(kind: str) -> None:
    kw = {"foreach": {"foreach": True}, "for-loop": {"foreach": False}, "fused": {"fused": True}}.get(kind, {})
    if kind == "amsgrad":
        kw = {"amsgrad": True}
    model = elalora_block(alpha=64)
    alloc = ElaLoRAAllocator(model, 100, init_warmup=50, final_warmup=10, reg_orth_coef=0.1)
    opt = adamw(model, weight_decay=0.01, **kw)
    train(model, alloc, opt, range(4))
    layers = dict(loraplex.adapters(model))
    old = {(n, p): getattr(a, p) for n, a in layers.items() for p in PARTS}
    states = {key: {k: v.clone() for k, v in opt.state[t].items()} for key, t in old.items()}
    prune, grow = plan_changes(alloc.scores(), alloc.k, 4)
    alloc.reallocate(opt, 4)
    assert sum(alloc.ranks().values()) == 4 * len(TARGETS)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    changed = 0
    for (n, a), drop, more in zip(layers.items(), prune, grow, strict=True):
        mask = torch.ones(4, dtype=torch.bool)
        mask[drop] = False
        keep = mask.nonzero().view(-1)
        changed += bool(drop.numel() or more)
        for p in PARTS:
            new, dim = getattr(a, p), {"A": 0, "E": 0, "B": 1}[p]
            state, before = opt.state[new], states[(n, p)]
            assert set(state) == set(before) and torch.equal(state["step"], before["step"])
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in before:
                    assert torch.equal(
                        state[key].index_select(dim, torch.arange(keep.numel())),
                        before[key][(slice(None),) * dim + (keep,)],
                    )
                    assert not state[key].narrow(dim, keep.numel(), more).any()  # zeros for the new ranks
            assert alloc.avg[n][p].shape == new.shape and alloc.unc[n][p].shape == new.shape
    assert changed > 0
    # one more step: AdamW by hand from the carried state
    x = BLOCK.input(seed=99)
    model(x).square().mean().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    expected = []
    lr, (b1, b2), eps, wd = 2e-2, (0.9, 0.999), 1e-8, 0.01
    for p in params:
        s = opt.state[p]
        step = s["step"].item() + 1
        m = b1 * s["exp_avg"] + (1 - b1) * p.grad
        v = b2 * s["exp_avg_sq"] + (1 - b2) * p.grad.square()
        if kind == "amsgrad":
            v = torch.maximum(s["max_exp_avg_sq"], v)
        denom = (v.sqrt() / math.sqrt(1 - b2**step)) + eps
        expected.append(p.detach() * (1 - lr * wd) - lr / (1 - b1**step) * m / denom)
    opt.step()
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["adamw", "adam-amsgrad"])
def test_grown_ranks_take_adams_first_steps_not_5x_lr(kind: str) -> None:
    # issue 18: the grown slices start with zero moments but kept the parameter's step count t, so AdamW's bias
    # correction (1 - β^t ≈ 1 instead of 1 - β^τ for their τ-th step) made their updates up to 5-6x lr for ~30
    # steps. Adam's own first bias-corrected steps are about lr (|m̂ / sqrt(v̂)| <= 1 for a steady gradient).
    model = elalora_block(alpha=64)
    alloc = ElaLoRAAllocator(model, 200, init_warmup=50, final_warmup=10, mask_interval=1000, reg_orth_coef=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = 2e-2
    opt = (
        torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        if kind == "adamw"
        else torch.optim.Adam(params, lr=lr, amsgrad=True)
    )
    train(model, alloc, opt, range(60))
    for state in opt.state.values():  # as deep into a long run (the bias corrections of the old slices are 1)
        state["step"].fill_(5000)
    layers = dict(loraplex.adapters(model))
    _, grow = plan_changes(alloc.scores(), alloc.k, 4)
    alloc.reallocate(opt, 4)
    assert sum(grow) > 0
    worst, fresh = 0.0, []
    for s in range(40):  # the same batch each step: a steady gradient, so Adam's fresh steps are ≈ lr
        snap = {n: {p: getattr(a, p).detach().clone() for p in PARTS} for n, a in layers.items()}
        loss = model(BLOCK.input(seed=7)).square().mean()
        loss.backward()
        opt.step()
        alloc.step(opt)
        opt.zero_grad()
        for (n, a), more in zip(layers.items(), grow, strict=True):
            if not more:
                continue
            r = a.current_rank
            for p in PARTS:
                dim = {"A": 0, "E": 0, "B": 1}[p]
                step = (getattr(a, p).detach() - snap[n][p]).narrow(dim, r - more, more).abs().max().item()
                worst = max(worst, step)
                if s == 0:
                    fresh.append(step)
    assert max(fresh) <= 1.001 * lr  # the first step of a grown slice: lr · |g| / sqrt(g² + ...) <= lr
    assert worst <= 1.05 * lr, f"grown slices stepped {worst / lr:.2f} x lr"
    state = alloc.state_dict()  # the birth steps travel with the allocator's state, shape-checked on load
    assert any(bool((v > 0).any()) for d in state["born"].values() for v in d.values())
    alloc.load_state_dict(state)
    n = next(iter(state["born"]))
    state["born"][n]["A"] = torch.zeros(99, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"allocator state 'born' of {n}.A has shape"):
        alloc.load_state_dict(state)


def test_sgd_momentum_is_carried_and_unsupported_state_is_refused() -> None:
    model = elalora_block()
    a = dict(loraplex.adapters(model))["up"]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model(BLOCK.input()).sum().backward()
    opt.step()
    old, buf = a.A, opt.state[a.A]["momentum_buffer"].clone()
    a.prune(torch.tensor([1, 2, 3]))
    carry_optimizer(opt, old, a.A, torch.tensor([1, 2, 3]), 0, 0)
    assert torch.equal(opt.state[a.A]["momentum_buffer"], buf[1:])
    with pytest.raises(ValueError, match="is not in the optimizer"):
        carry_optimizer(opt, old, a.A, torch.tensor([0]), 0, 0)
    ada = torch.optim.Adafactor([a.B], lr=0.1)
    a.B.grad = torch.randn_like(a.B)
    ada.step()
    old = a.B
    a.prune(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="cannot carry the Adafactor state"):
        carry_optimizer(ada, old, a.B, torch.tensor([0, 1]), 0, 1)


# The allocator -------------------------------------------------------------------------------------


def test_training_loop_resizes_conserves_the_budget_and_keeps_the_optimizer_in_sync() -> None:
    model = elalora_block(alpha=64)
    options = {"init_warmup": 3, "final_warmup": 5, "mask_interval": 3}
    alloc = ElaLoRAAllocator(model, 40, **options)
    opt = adamw(model)
    updates: list[int] = []
    real = alloc.reallocate

    def spy(optimizer, b):
        updates.append((alloc.t - 1, b))
        before = sum(alloc.ranks().values())
        real(optimizer, b)
        assert sum(alloc.ranks().values()) == before  # every update conserves the total rank

    alloc.reallocate = spy
    history = []
    for s in range(40):
        losses = train(model, alloc, opt, [s])
        history.append(alloc.ranks())
        assert math.isfinite(losses[0])
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == {id(p) for g in opt.param_groups for p in g["params"]}
    expected = [(s, b_at(s, b0=4, init_warmup=3, final_warmup=5, total=40)) for s in range(6, 35, 3)]
    assert updates == [u for u in expected if u[1] > 0]
    assert len(updates) >= 5 and history[-1] != history[0] and len(set(history[-1].values())) > 1
    assert history[-1] == history[35]  # nothing changes in the final warm-up
    assert all(a.E.shape[0] == a.options["current_rank"] for _, a in loraplex.adapters(model))


def test_fixed_b_and_the_orthogonality_gradient() -> None:
    model = elalora_block()
    alloc = ElaLoRAAllocator(model, 30, enable_scheduler=False, b=2, init_warmup=1, final_warmup=1, mask_interval=2)
    assert [alloc.b_now(s) for s in (0, 15, 28)] == [2, 2, 2]
    layers = [a for _, a in loraplex.adapters(model)]
    alloc.before_step()
    params = [p for a in layers for p in (a.A, a.B)]
    want = torch.autograd.grad(0.1 * orth_penalty([(a.A, a.B) for a in layers]), params)
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.grad, w)


def test_state_dict_round_trip_resumes_identically(tmp_path) -> None:
    model = elalora_block(alpha=64)
    options = {"init_warmup": 2, "final_warmup": 4, "mask_interval": 2, "seed": 3}
    alloc = ElaLoRAAllocator(model, 24, **options)
    opt = adamw(model)
    train(model, alloc, opt, range(9))  # several resizes done
    assert alloc.ranks() != {n: 4 for n in TARGETS}
    loraplex.save(model, tmp_path / "model")
    text, tensors = split_state({"alloc": alloc.state_dict(), "opt": opt.state_dict()})
    write_tensors(tmp_path / "s.safetensors", tensors)
    (tmp_path / "s.json").write_text(json.dumps(text))
    resumed = loraplex.load(BLOCK.make(), tmp_path / "model")
    opt2 = adamw(resumed)
    alloc2 = ElaLoRAAllocator(resumed, 24, **options)
    state = join_state(json.loads((tmp_path / "s.json").read_text()), read_tensors(tmp_path / "s.safetensors"))
    opt2.load_state_dict(state["opt"])
    alloc2.load_state_dict(state["alloc"])
    assert alloc2.t == 9 and alloc2.ranks() == alloc.ranks()
    train(model, alloc, opt, range(9, 24))
    train(resumed, alloc2, opt2, range(9, 24))
    for (n, a), (_, b) in zip(loraplex.adapters(model), loraplex.adapters(resumed), strict=True):
        for p in PARTS:
            assert torch.equal(getattr(a, p), getattr(b, p)), f"{n}.{p}"
    assert alloc2.ranks() == alloc.ranks()
    fresh = ElaLoRAAllocator(elalora_block(alpha=64), 24, **options)
    with pytest.raises(ValueError, match="load the model saved with this state first"):
        fresh.load_state_dict(state["alloc"])


def test_allocator_errors_and_defaults() -> None:
    with pytest.raises(ValueError, match="needs a model with elalora adapters.*lora"):
        ElaLoRAAllocator(loraplex.adapt(BLOCK.make(), "lora", rank=2), 10)
    model = elalora_block()
    with pytest.raises(ValueError, match="no budgeting phase is left"):
        ElaLoRAAllocator(model, 10, init_warmup=5, final_warmup=5)
    with pytest.raises(ValueError, match="beta2=0"):
        ElaLoRAAllocator(model, 10, beta2=0)
    with pytest.raises(ValueError, match="reg_orth_coef=-1"):
        ElaLoRAAllocator(model, 10, reg_orth_coef=-1)
    with pytest.raises(ValueError, match="b=0 must be an integer >= 1"):
        ElaLoRAAllocator(model, 10, b=0)
    with pytest.raises(ValueError, match="enable_scheduler=1"):
        ElaLoRAAllocator(model, 10, enable_scheduler=1)
    big = ElaLoRAAllocator(model, 10_000)
    assert (big.b0, big.k, big.init_warmup, big.final_warmup, big.mask_interval) == (4, 2, 500, 500, 100)
    assert (big.beta1, big.beta2, big.reg_orth_coef, big.enable_scheduler) == (0.85, 0.85, 0.1, True)
    assert ElaLoRAAllocator.at_budget({"rank": 8}) == ({"rank": 8}, {})  # the total rank is conserved
    loraplex.adapt(model, "elalora", targets=["up"], name="second", rank=4)
    with pytest.raises(ValueError, match="several elalora adapters"):
        ElaLoRAAllocator(model, 10)
    assert list(ElaLoRAAllocator(model, 10, name="second").ranks()) == ["up"]


def test_several_processes_need_a_loop_that_rewraps(monkeypatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="ddp_rewrap=True"):
        ElaLoRAAllocator(elalora_block(), 10)
    assert ElaLoRAAllocator(elalora_block(), 10, ddp_rewrap=True).resizes  # finetune re-wraps (test_workbench)


def test_registered() -> None:
    from loraplex.cli import parser
    from loraplex.rank import ALLOCATORS

    assert ALLOCATORS["elalora"] is ElaLoRAAllocator and loraplex.METHODS["elalora"] is ElaLoRA
    args = parser().parse_args(["finetune", "--method", "elalora", "--allocator", "elalora"])
    assert (args.method, args.allocator) == ("elalora", "elalora")
    assert copy.deepcopy(elalora_block()) is not None


@pytest.mark.slow
def test_finetune_with_the_allocator(tmp_path) -> None:
    from loraplex.cli import main

    small = write_slice(tmp_path, 64, 16)
    out = tmp_path / "run"
    argv = ["finetune", "--data", str(small), "--method", "elalora", "--allocator", "elalora", "--epochs", "1"]
    code = main([*argv, "--batch-size", "16", "--max-length", "24", "--out", str(out), "--no-progress"])
    assert code == 0  # 4 steps: resizes at steps 1, 2, 3 (init_warmup = final_warmup = 0, interval 1)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
