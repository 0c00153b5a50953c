"""AdaLoRA: the SVD adapter against PEFT's SVDLinear, checkpoints both ways (incl. PEFT's rank_pattern
pruning), and the allocator trained side by side with PEFT's RankAllocator (masks, outputs, parameters),
its schedule, its fixed final mask, exact resume and errors."""

from __future__ import annotations

import copy
import json
import types
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matrix import MODELS, export_to_peft, perturb
from slices import write_slice
from torch import nn

import loraplex
from loraplex.adapters.adalora import AdaLoRA
from loraplex.checkpoint import join_state, split_state
from loraplex.io import read_tensors, write_tensors
from loraplex.rank.adalora import AdaLoRAAllocator, budget_at, mask_below, orth_penalty, triplet_scores

peft = pytest.importorskip("peft")
from peft.tuners.adalora.layer import RankAllocator  # noqa: E402

BLOCK = MODELS[1]  # q / k / v / out 16 -> 16, up 16 -> 40, down 40 -> 16
TARGETS = ["query", "key", "value", "out", "up", "down"]
PARTS = ("A", "E", "B")


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny ops: one thread is ~10x faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def peft_adalora(base: nn.Module, targets: list[str], **config) -> nn.Module:
    cfg = peft.AdaLoraConfig(target_modules=targets, **{"total_step": 10, **config})
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def their_tensors(theirs: nn.Module, layer: str) -> dict[str, torch.Tensor]:
    m = theirs.base_model.model.get_submodule(layer)
    return {p: getattr(m, f"lora_{p}")["default"] for p in PARTS}


@torch.no_grad()
def copy_into_peft(ours: nn.Module, theirs: nn.Module) -> None:
    for n, a in loraplex.adapters(ours):
        for p, t in their_tensors(theirs, n).items():
            t.copy_(getattr(a, p))


# The adapter --------------------------------------------------------------------------------------


def test_init_is_peft_s_and_the_base() -> None:
    torch.manual_seed(0)
    a = AdaLoRA(nn.Linear(384, 1536))
    assert (a.rank, a.scaling, float(a.ranknum)) == (12, 8.0, 12.0)  # PEFT's init_r and lora_alpha defaults
    assert torch.equal(a.E, torch.zeros(12, 1))
    for p in (a.A, a.B):
        assert abs(p.mean().item()) < 2e-3 and abs(p.std().item() - 0.02) < 1e-3
    x = torch.randn(4, 384)
    torch.testing.assert_close(a(x), a.base(x), rtol=0, atol=0)
    assert a.factor_pairs() == [] and a.product_pairs() == []  # ΔW is not scale · B A (B diag(E) A)
    assert "ranknum" not in a.own_state_dict()


@pytest.mark.parametrize(("d_in", "d_out", "rank", "alpha"), [(13, 29, 3, 5.0), (16, 16, 12, 8.0), (40, 16, 6, 32.0)])
def test_same_parameters_same_outputs_delta_and_gradients_as_peft(d_in: int, d_out: int, rank: int, alpha) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out)
    theirs = peft_adalora(nn.Sequential(layer), ["0"], init_r=rank, lora_alpha=alpha).eval()
    ours = nn.Sequential(AdaLoRA(copy.deepcopy(layer), rank=rank, alpha=alpha)).eval()
    perturb(ours)
    copy_into_peft(ours, theirs)
    mine = [getattr(ours[0], p) for p in PARTS]
    peft_params = list(their_tensors(theirs, "0").values())
    assert sum(p.numel() for p in mine) == AdaLoRA.num_params(d_in, d_out, rank=rank)
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == AdaLoRA.num_params(d_in, d_out, rank=rank)
    x = torch.randn(2, 5, d_in)
    y, want = ours(x), theirs(x)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    delta = theirs.base_model.model[0].get_delta_weight("default")
    torch.testing.assert_close(ours[0].delta_weight(), delta, rtol=1e-6, atol=1e-7)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, mine, g)
    wanted = torch.autograd.grad(want, peft_params, g)
    for u, v in zip(got, wanted, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-7)


def test_a_and_b_start_without_gradient_and_move_once_e_does() -> None:
    torch.manual_seed(0)
    a = AdaLoRA(nn.Linear(12, 20), rank=4)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.0)
    x = torch.randn(8, 12)
    a(x).square().mean().backward()
    assert not a.A.grad.any() and not a.B.grad.any() and a.E.grad.abs().min() > 0
    opt.step()
    opt.zero_grad()
    a(x).square().mean().backward()
    assert a.A.grad.abs().sum() > 0 and a.B.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rank": 0}, "rank=0 must be an integer >= 1"),
        ({"alpha": 0}, "alpha=0 must be a finite number > 0"),
        ({"alpha": float("nan")}, "alpha=nan"),
        ({"dropout": 1.0}, "dropout=1.0"),
    ],
)
def test_option_errors(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdaLoRA(nn.Linear(4, 4), **options)


def test_half_precision_keeps_fp32_parameters_and_the_output_dtype() -> None:
    a = AdaLoRA(nn.Linear(16, 8).to(torch.bfloat16), rank=4)
    perturb(nn.Sequential(a))
    y = a(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for _, p in a.own_parameters())


# Checkpoints both ways ----------------------------------------------------------------------------


def test_export_loads_in_peft_and_imports_back(tmp_path) -> None:
    base = BLOCK.make()
    ours = loraplex.adapt(copy.deepcopy(base), "adalora", targets=TARGETS, rank=5, alpha=12, train=["classifier"])
    perturb(ours)
    with torch.no_grad():
        ours.up.E[1:3] = 0  # masked ranks travel as zeros of E
        ours.classifier.weight.add_(0.5)
    theirs = export_to_peft(ours, base, tmp_path).eval()
    x = BLOCK.input()
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
    config = theirs.peft_config["default"]
    assert (config.peft_type, config.init_r, config.lora_alpha, config.rank_pattern) == ("ADALORA", 5, 12.0, None)
    back = loraplex.import_peft(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(back(x), ours(x), rtol=1e-5, atol=1e-5)
    assert (back.up.rank, back.up.scaling) == (5, 12.0)
    for n, a in loraplex.adapters(ours):
        for p in PARTS:
            assert torch.equal(getattr(back.get_submodule(n), p), getattr(a, p))


# PEFT's AdaLoRA checkpoints import (with modules_to_save): test_peft_parity.py, cases adalora, adalora-wide.


def test_import_maps_peft_s_non_positive_alpha_to_the_rank() -> None:
    assert AdaLoRA.peft_options({"init_r": 6, "lora_alpha": 0}, {})["alpha"] == 6.0


def test_conv1d_layers_export_with_fan_in_fan_out(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    base = transformers.GPT2Model(config).eval()
    ours = loraplex.adapt(copy.deepcopy(base), "adalora", targets=["c_attn", "c_proj"], rank=3)
    perturb(ours)
    ids = torch.randint(0, 50, (2, 7))
    theirs = export_to_peft(ours, base, tmp_path).eval()
    assert theirs.peft_config["default"].fan_in_fan_out
    torch.testing.assert_close(theirs(ids).last_hidden_state, ours(ids).last_hidden_state, rtol=1e-5, atol=1e-5)


# The allocator, side by side with PEFT -----------------------------------------------------------------


@dataclass
class Out:
    loss: torch.Tensor
    logits: torch.Tensor


class WithLoss(nn.Module):
    """Gives the model an output with ``.loss``, so that PEFT's AdaLoraModel.forward adds its orth loss."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> Out:
        y = self.inner(x)
        return Out(y.square().mean(), y)


SCHEDULE = {"total_step": 30, "tinit": 4, "tfinal": 8, "deltaT": 3, "target_r": 3}


def side_by_side(check=None):
    """(ours, theirs, allocator) after SCHEDULE's steps, trained identically; ``check(step, ...)`` after each."""
    base = WithLoss(BLOCK.make())
    ours = loraplex.adapt(copy.deepcopy(base), "adalora", targets=TARGETS, rank=6, alpha=16)
    theirs = peft_adalora(base, TARGETS, init_r=6, lora_alpha=16, **SCHEDULE)
    copy_into_peft(ours, theirs)
    total = SCHEDULE["total_step"]
    alloc = AdaLoRAAllocator(ours, total, **{k: v for k, v in SCHEDULE.items() if k != "total_step"})
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    opt_t = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    for step in range(total):
        x = BLOCK.input(seed=100 + step)
        mine = ours(x)
        with torch.no_grad():  # the term PEFT adds to its loss; ours acts through before_step
            mine.reg = alloc.orth_reg_weight * orth_penalty([(a.A, a.B) for a in alloc.layers.values()])
        mine.loss.backward()
        alloc.before_step()
        opt_o.step()
        alloc.step(opt_o)
        opt_o.zero_grad()
        want = theirs.base_model(x)  # AdaLoraModel.forward: adds orth_reg_weight * regu_loss to .loss
        want.loss.backward()
        opt_t.step()
        theirs.base_model.update_and_allocate(step)
        opt_t.zero_grad()
        if check is not None:
            check(step, mine, want, ours, theirs, alloc)
    return ours, theirs, alloc


def assert_same_adapters(ours: nn.Module, theirs: nn.Module, step: int) -> None:
    for n, a in loraplex.adapters(ours):
        t = their_tensors(theirs, n)
        assert torch.equal(a.E == 0, t["E"] == 0), f"step {step}: {n} masks differ"
        for p in PARTS:
            torch.testing.assert_close(getattr(a, p), t[p], rtol=1e-5, atol=1e-5, msg=f"step {step}: {n}.{p}")


# The run prunes "up" to rank 0, which PEFT's save reports as a possibly unsharded (0, in) tensor.
@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")
def test_training_side_by_side_with_peft_keeps_masks_outputs_and_parameters_equal(tmp_path) -> None:
    masked_at = []

    def check(step, mine, want, ours, theirs, alloc) -> None:
        torch.testing.assert_close(mine.logits, want.logits, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        torch.testing.assert_close(mine.loss + mine.reg, want.loss, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        assert_same_adapters(ours, theirs, step)
        if sum(alloc.ranks().values()) < 36:
            masked_at.append(step)

    ours, theirs, alloc = side_by_side(check)
    # masking began after tinit, several times, and the final pattern is PEFT's rank_pattern
    assert masked_at[0] == 6 and sum(alloc.ranks().values()) == 3 * len(TARGETS)
    pattern = theirs.peft_config["default"].rank_pattern
    assert {n: alloc.keep[n].tolist() for n in alloc.keep} == {
        k.removesuffix(".lora_E.default"): v for k, v in pattern.items()
    }
    # PEFT's checkpoint of this run drops the masked ranks from the tensors (ranknum stays init_r): it imports
    theirs.save_pretrained(tmp_path)
    saved = read_tensors(tmp_path / "adapter_model.safetensors")
    kept = alloc.ranks()
    assert {k: v.shape[0] for k, v in saved.items() if k.endswith("lora_E")} == {
        f"base_model.model.{n}.lora_E": kept[n] for n in kept
    }
    back = loraplex.import_peft(WithLoss(BLOCK.make()), tmp_path)
    x = BLOCK.input(seed=7)
    torch.testing.assert_close(back(x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)
    assert {n: a.rank for n, a in loraplex.adapters(back)} == {n: 6 for n in kept}


# The allocator alone ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    init=st.integers(2, 200),
    frac=st.floats(0.0, 0.99),
    tinit=st.integers(0, 30),
    tfinal=st.integers(0, 30),
    span=st.integers(1, 60),
    deltaT=st.integers(1, 7),
)
def test_budget_schedule_is_peft_s_monotonic_and_ends_at_the_target(init, frac, tinit, tfinal, span, deltaT) -> None:
    target = int(init * frac) if int(init * frac) < init else init - 1
    total = tinit + tfinal + span
    cfg = types.SimpleNamespace(tinit=tinit, tfinal=tfinal, total_step=total, deltaT=deltaT)
    theirs = types.SimpleNamespace(init_bgt=init, target_bgt=target, peft_config=cfg)
    kw = {"init_budget": init, "target_budget": target, "tinit": tinit, "tfinal": tfinal, "total": total}
    budgets = []
    for step in range(total + 3):
        got = budget_at(step, deltaT=deltaT, **kw)
        assert got == RankAllocator.budget_schedule(theirs, step)
        budgets.append(got[0])
    assert budgets[0] == init and budgets[total - tfinal] == target and budgets[-1] == target
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False))
    assert all(target <= b <= init for b in budgets)


def test_triplet_scores_and_threshold() -> None:
    A, E, B = torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.tensor([[1.0], [0.5]]), torch.tensor([[2.0, 0.0]])
    torch.testing.assert_close(triplet_scores(A, E, B), torch.tensor([5.0, 0.5]))
    keep = mask_below([torch.tensor([5.0, 0.5]), torch.tensor([0.5, 9.0, 1.0])], drop=2)
    assert [k.tolist() for k in keep] == [[True, False], [False, True, True]]  # ties at the threshold go


def train(model: nn.Module, alloc: AdaLoRAAllocator, opt: torch.optim.Optimizer, steps: range, record=None) -> None:
    for step in steps:
        model(BLOCK.input(seed=200 + step)).square().mean().backward()
        alloc.before_step()
        opt.step()
        alloc.step(opt)
        opt.zero_grad()
        if record is not None:
            record.append({n: (a.E.detach() == 0).view(-1).tolist() for n, a in loraplex.adapters(model)})


def adalora_block(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return loraplex.adapt(BLOCK.make(), "adalora", targets=TARGETS, rank=6, alpha=16)


def test_after_tfinal_the_mask_is_fixed_at_the_target_budget() -> None:
    model = adalora_block()
    alloc = AdaLoRAAllocator(model, 20, target_r=2, tinit=2, tfinal=6, deltaT=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    zeros: list = []
    train(model, alloc, opt, range(20), zeros)
    final = zeros[14]  # step 14 == total - tfinal: the final masking
    assert all(z == final for z in zeros[14:]) and sum(alloc.ranks().values()) == 2 * len(TARGETS)
    assert all(sum(final[n]) == 6 - alloc.ranks()[n] for n in final)
    assert alloc.avg == {} and alloc.unc == {}


def test_state_dict_round_trip_resumes_identically(tmp_path) -> None:
    model = adalora_block()
    options = {"target_r": 3, "tinit": 2, "tfinal": 4, "deltaT": 2}
    alloc = AdaLoRAAllocator(model, 16, **options)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    train(model, alloc, opt, range(7))  # past tinit, between two maskings
    text, tensors = split_state({"alloc": alloc.state_dict(), "opt": opt.state_dict()})
    write_tensors(tmp_path / "s.safetensors", tensors)
    (tmp_path / "s.json").write_text(json.dumps(text))
    resumed = copy.deepcopy(model)
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=2e-2)
    alloc2 = AdaLoRAAllocator(resumed, 16, **options)
    state = join_state(json.loads((tmp_path / "s.json").read_text()), read_tensors(tmp_path / "s.safetensors"))
    opt2.load_state_dict(state["opt"])
    alloc2.load_state_dict(state["alloc"])
    assert alloc2.t == 7 and alloc2.ranks() == alloc.ranks()
    train(model, alloc, opt, range(7, 16))
    train(resumed, alloc2, opt2, range(7, 16))
    for (n, a), (_, b) in zip(loraplex.adapters(model), loraplex.adapters(resumed), strict=True):
        for p in PARTS:
            assert torch.equal(getattr(a, p), getattr(b, p)), f"{n}.{p}"
    assert alloc2.ranks() == alloc.ranks()


def test_allocator_errors() -> None:
    with pytest.raises(ValueError, match="needs a model with adalora adapters.*lora"):
        AdaLoRAAllocator(loraplex.adapt(BLOCK.make(), "lora", rank=2), 10)
    with pytest.raises(ValueError, match="has: none"):
        AdaLoRAAllocator(BLOCK.make(), 10)
    model = adalora_block()
    with pytest.raises(ValueError, match="target budget of 36"):
        AdaLoRAAllocator(model, 10, target_r=6)
    with pytest.raises(ValueError, match="tinit=5 must be < total_steps - tfinal"):
        AdaLoRAAllocator(model, 10, tinit=5, tfinal=5, target_r=2)
    with pytest.raises(ValueError, match="beta1=1.0"):
        AdaLoRAAllocator(model, 10, target_r=2, beta1=1.0)
    with pytest.raises(ValueError, match="orth_reg_weight=-0.1"):
        AdaLoRAAllocator(model, 10, target_r=2, orth_reg_weight=-0.1)
    with pytest.raises(ValueError, match="total_steps=0"):
        AdaLoRAAllocator(model, 0, target_r=2)
    loraplex.adapt(model, "adalora", targets=["up"], name="second", rank=4)
    with pytest.raises(ValueError, match="several adalora adapters"):
        AdaLoRAAllocator(model, 10, target_r=2)
    assert list(AdaLoRAAllocator(model, 10, target_r=2, name="second").ranks()) == ["up"]


def test_registered_for_the_command_line() -> None:
    from loraplex.cli import parser
    from loraplex.rank import ALLOCATORS

    assert ALLOCATORS["adalora"] is AdaLoRAAllocator
    args = parser().parse_args(["finetune", "--method", "adalora", "--allocator", "adalora"])
    assert (args.method, args.allocator) == ("adalora", "adalora")


@pytest.mark.slow
def test_finetune_with_the_allocator(tmp_path) -> None:
    from loraplex.cli import main

    small = write_slice(tmp_path, 48, 16)
    out = tmp_path / "run"
    argv = ["finetune", "--data", str(small), "--method", "adalora", "--allocator", "adalora", "--epochs", "1"]
    code = main([*argv, "--batch-size", "16", "--max-length", "24", "--out", str(out), "--no-progress"])
    assert code == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


def test_batched_orth_gradients_equal_autograd_over_mixed_shapes() -> None:
    from types import SimpleNamespace

    from loraplex.rank.adalora import add_orth_gradients

    torch.manual_seed(0)
    shapes = [(3, 8, 5), (3, 8, 5), (2, 6, 9), (4, 4, 4)]  # (r, in, out): two layers share a shape
    layers = [
        SimpleNamespace(A=torch.randn(r, i, dtype=torch.float64, requires_grad=True),
                        B=torch.randn(o, r, dtype=torch.float64, requires_grad=True))
        for r, i, o in shapes
    ]  # fmt: skip
    with torch.no_grad():  # an exactly orthonormal A: its term has zero (sub)gradient
        layers[3].A.copy_(torch.eye(4, dtype=torch.float64))
    params = [p for a in layers for p in (a.A, a.B)]
    want = torch.autograd.grad(0.3 * orth_penalty([(a.A, a.B) for a in layers]), params)
    for p in params[:2]:
        p.grad = torch.ones_like(p)  # existing gradients are added to
    add_orth_gradients(layers, 0.3)
    for i, (p, w) in enumerate(zip(params, want, strict=True)):
        torch.testing.assert_close(p.grad, w + (1 if i < 2 else 0), rtol=1e-12, atol=1e-12)
