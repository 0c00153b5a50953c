"""GoRA: the initial update is one projected gradient step, allocation, the gradient pre-pass,
save / load, option errors, and identical results on two DDP processes."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from matrix import MODELS
from safetensors.torch import load_file
from torch import nn

import loraplex
from loraplex.adapters.lora import LoRA
from loraplex.rank import gora_init
from loraplex.rank.gora import allocate, average_gradients, compress

SPECS = {m.name: m for m in MODELS}
CLASSES = {"mlp": 3, "block": 3, "odd": 2}
TARGETS = {"mlp": ["fc1", "fc2"], "block": ["query", "key", "value", "out", "up", "down"], "odd": ["proj"]}


def data(model: str, n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = SPECS[model].input_shape
    return [
        {"x": torch.randn(shape, generator=g), "y": torch.randint(0, CLASSES[model], (shape[0],), generator=g)}
        for _ in range(n)
    ]


def ce(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(m(b["x"]), b["y"])


def reference_grads(model: nn.Module, names: list[str], batches: list, loss_fn=ce) -> dict[str, torch.Tensor]:
    """The averaged gradient of each named weight, by plain autograd on a copy."""
    m = copy.deepcopy(model).requires_grad_(True)
    ws = [m.get_submodule(n).weight for n in names]
    total = [torch.zeros_like(w) for w in ws]
    for b in batches:
        for t, g in zip(total, torch.autograd.grad(loss_fn(m, b), ws, allow_unused=True), strict=True):
            t += 0 if g is None else g
    return {n: t / len(batches) for n, t in zip(names, total, strict=True)}


def projected_step(G: torch.Tensor, A: torch.Tensor, c: float) -> torch.Tensor:
    """-c · G A⁺A in float64."""
    A = A.double()
    return -c * G.double() @ torch.linalg.pinv(A) @ A


# 1. The initial update ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "options"),
    [
        ("mlp", {}),
        ("block", {"dynamic_scaling": False, "rslora": True, "importance": "union_mean", "rank": 4}),
        ("odd", {"scale_by_lr": False, "stable_gamma": 0.5, "rslora": True}),
        ("block", {"scale_by_lr": False, "dynamic_scaling": False, "rank": 2, "importance": "grad_nuc_norm"}),
    ],
)
def test_initial_update_is_minus_lr_times_the_gradient_projected_on_a(model: str, options: dict) -> None:
    base = SPECS[model].make()
    batches = data(model)
    G = reference_grads(base, TARGETS[model], batches)
    W0 = {n: base.get_submodule(n).weight.detach().clone() for n in TARGETS[model]}
    adapted = gora_init(copy.deepcopy(base), batches, loss_fn=ce, seed=0, **options)
    rank, alpha = options.get("rank", 8), 16.0
    rslora, dynamic = options.get("rslora", False), options.get("dynamic_scaling", True)
    found = dict(loraplex.adapters(adapted))
    assert set(found) == set(TARGETS[model])
    for n, a in found.items():
        assert isinstance(a, LoRA) and a.options["init"] == "kaiming"
        r_s = a.rank if dynamic else rank
        assert a.scale == pytest.approx(alpha / (math.sqrt(r_s) if rslora else r_s), rel=1e-12)
        if options.get("scale_by_lr", True):
            c = 5e-2 * math.sqrt(a.in_features / a.rank)
        else:
            c = options["stable_gamma"] if "stable_gamma" in options else 0.02
            c /= math.sqrt(r_s) if rslora else r_s
        want = projected_step(G[n], a.A.detach(), c)
        torch.testing.assert_close(a.delta_weight().double(), want, rtol=1e-5, atol=1e-8)
        assert (a.delta_weight() * G[n]).sum() < 0  # a descent direction (the sign gotcha)
        assert torch.equal(a.weight, W0[n])  # W0 untouched: not the base model at init, by design
        bound = 1 / math.sqrt(a.in_features)  # kaiming uniform with a = sqrt(5), as LoRA
        assert a.A.abs().max() <= bound and a.A.dtype == torch.float32 and a.B.dtype == torch.float32


def test_a_small_step_lowers_the_loss_and_the_model_is_not_the_base_at_init() -> None:
    base, batches = SPECS["mlp"].make(), data("mlp")
    model = gora_init(copy.deepcopy(base), batches, loss_fn=ce, lr_g=1e-3, seed=0)
    with torch.no_grad():
        before = sum(ce(base, b) for b in batches)
        after = sum(ce(model, b) for b in batches)
        with loraplex.disabled(model):
            assert sum(ce(model, b) for b in batches) == before
    assert after < before


def test_conv1d_layers_use_the_out_in_gradient() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Sequential(Conv1D(6, 6), nn.Tanh(), Conv1D(9, 6), nn.Tanh(), nn.Linear(9, 3))  # Conv1D(nf=out, nx=in)
    batches = [{"x": torch.randn(4, 6), "y": torch.randint(0, 3, (4,))}]
    G = {n: g.T for n, g in reference_grads(base, ["0", "2"], batches).items()}  # Conv1D keeps (in, out)
    model = gora_init(copy.deepcopy(base), batches, loss_fn=ce, targets=["0", "2"], rank=2, seed=0)
    for n, a in loraplex.adapters(model):  # the square layer too, where a transpose would go unnoticed by shape
        want = projected_step(G[n], a.A.detach(), 5e-2 * math.sqrt(6 / a.rank))
        torch.testing.assert_close(a.delta_weight().double(), want, rtol=1e-5, atol=1e-8)


def test_compress_is_least_squares_and_exact_for_full_rank_a() -> None:
    g = torch.Generator().manual_seed(0)
    G, A = torch.randn(7, 5, generator=g), torch.randn(5, 5, generator=g)
    torch.testing.assert_close(compress(G, A, 2.0) @ A, -2.0 * G, rtol=1e-4, atol=1e-5)  # A⁺A = I


# 2. Allocation -----------------------------------------------------------------------------------


def test_ranks_are_proportional_to_importance() -> None:
    # T = 8 * 4 * 64 = 2048; shares 4/8, 2/8, 1/8, 1/8 -> 1024 // 64, 512 // 64, 256 // 64
    assert allocate([4.0, 2.0, 1.0, 1.0], [(32, 32)] * 4, rank=8) == [16, 8, 4, 4]
    assert allocate([1.0, 1.0], [(16, 16), (16, 16)], rank=8) == [8, 8]  # uniform importance = LoRA


def test_ranks_are_clamped() -> None:
    assert allocate([4.0, 2.0, 1.0, 1.0], [(32, 32)] * 4, rank=8, r_min=5, r_max=10) == [10, 8, 5, 5]
    assert allocate([100.0, 1.0], [(4, 100), (100, 100)], rank=8) == [4, 1]  # min(in, out) = 4
    assert allocate([1.0, 0.0], [(16, 16), (16, 16)], rank=8, r_min=3) == [16, 3]  # zero importance: r_min
    assert allocate([1.0, 0.0], [(16, 16), (16, 16)], rank=8, r_min=0) == [16, 0]  # no adapter


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64)), min_size=1, max_size=8),
    draw=st.data(),
    rank=st.integers(1, 16),
    r_min=st.integers(0, 4),
)
def test_the_budget_holds_up_to_rounding_and_clamping(sizes, draw, rank: int, r_min: int) -> None:
    imps = draw.draw(st.lists(st.floats(0, 10), min_size=len(sizes), max_size=len(sizes)))
    if sum(imps) <= 0:
        imps[0] = 1.0
    ranks = allocate(imps, sizes, rank=rank, r_min=r_min, r_max=12)
    F_ = [i + o for i, o in sizes]
    T = rank * sum(F_)
    raw = [round(T * s / sum(imps)) // f for s, f in zip(imps, F_, strict=True)]
    assert ranks == [min(max(r, r_min), 12, i, o) for r, (i, o) in zip(raw, sizes, strict=True)]
    assert sum(r * f for r, f in zip(raw, F_, strict=True)) <= T + len(sizes) / 2
    raised = sum(r_min * f for r, f in zip(raw, F_, strict=True) if r < r_min)
    assert sum(r * f for r, f in zip(ranks, F_, strict=True)) <= T + len(sizes) / 2 + raised


def test_a_layer_without_gradient_gets_r_min_or_no_adapter(tmp_path: Path) -> None:
    base, batches = SPECS["mlp"].make(), data("mlp")

    def fc1_only(m: nn.Module, b: dict) -> torch.Tensor:
        return m.fc1(b["x"]).pow(2).mean()  # fc2 gets no gradient

    model = gora_init(copy.deepcopy(base), batches, loss_fn=fc1_only, r_min=3, seed=0)
    assert (model.fc1.rank, model.fc2.rank) == (12, 3)  # fc1 capped at min(12, 20)
    assert torch.count_nonzero(model.fc2.delta_weight()) == 0  # G = 0 -> B = 0
    model = gora_init(copy.deepcopy(base), batches, loss_fn=fc1_only, r_min=0, seed=0)
    assert isinstance(model.fc2, nn.Linear) and model.fc1.rank == 12
    fresh = loraplex.load(SPECS["mlp"].make(), loraplex.save(model, tmp_path))
    x = SPECS["mlp"].input()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


# 3. The gradient pre-pass ------------------------------------------------------------------------


def test_prepass_averages_gradients_and_restores_flags_and_grads() -> None:
    model, batches = SPECS["mlp"].make(), data("mlp", n=4)
    model.fc1.bias.requires_grad_(False)
    model.fc2.weight.requires_grad_(False)
    model.fc1.weight.grad = torch.full_like(model.fc1.weight, 7.0)
    head_grad = torch.ones_like(model.classifier.weight)
    model.classifier.weight.grad = head_grad
    before = [(p.requires_grad, p.grad) for p in model.parameters()]
    rest = iter(batches)
    G = average_gradients(model, ["fc1", "fc2"], rest, ce, n_steps=3)
    assert next(rest) is batches[3]  # exactly n_steps batches consumed
    want = reference_grads(model, ["fc1", "fc2"], batches[:3])
    for n in want:
        torch.testing.assert_close(G[n], want[n], rtol=1e-6, atol=1e-8)
    after = [(p.requires_grad, p.grad) for p in model.parameters()]
    assert [f for f, _ in after] == [f for f, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before, strict=True))
    assert torch.equal(model.fc1.weight.grad, torch.full_like(model.fc1.weight, 7.0))

    def boom(m: nn.Module, b: dict) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        average_gradients(model, ["fc1"], batches, boom)
    assert [(p.requires_grad, p.grad) for p in model.parameters()] == before


def test_default_loss_is_model_output_loss() -> None:
    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = SPECS["mlp"].make()

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> types.SimpleNamespace:
            logits = self.net(x)
            return types.SimpleNamespace(loss=None if labels is None else F.cross_entropy(logits, labels))

    batches = [{"x": b["x"], "labels": b["y"]} for b in data("mlp")]
    model = gora_init(WithLoss(), batches, rank=4, train=["net.classifier"], seed=0)
    assert sorted(n for n, _ in loraplex.adapters(model)) == ["net.fc1", "net.fc2"]  # head excluded
    adapters_ = [a for _, a in loraplex.adapters(model)]
    want = sum(a.rank * (a.in_features + a.out_features) for a in adapters_) + 18 * 3 + 3
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == want  # frozen as adapt does
    with pytest.raises(ValueError, match="loss must be a scalar tensor"):
        gora_init(WithLoss(), [{"x": b["x"]} for b in batches])


def test_seed_fixes_a_and_none_follows_the_global_rng() -> None:
    base, batches = SPECS["odd"].make(), data("odd")
    a1 = gora_init(copy.deepcopy(base), batches, loss_fn=ce, seed=3).proj.A
    a2 = gora_init(copy.deepcopy(base), batches, loss_fn=ce, seed=3).proj.A
    assert torch.equal(a1, a2)
    torch.manual_seed(5)
    a3 = gora_init(copy.deepcopy(base), batches, loss_fn=ce).proj.A
    torch.manual_seed(5)
    assert torch.equal(a3, gora_init(copy.deepcopy(base), batches, loss_fn=ce).proj.A)
    assert not torch.equal(a1, a3)


# 4. Save / load ----------------------------------------------------------------------------------


def test_save_load_round_trip_reproduces_the_outputs(tmp_path: Path) -> None:
    batches = data("block")
    model = gora_init(SPECS["block"].make(), batches, loss_fn=ce, dynamic_scaling=False, train=["classifier"], seed=1)
    ranks = {n: a.rank for n, a in loraplex.adapters(model)}
    assert len(set(ranks.values())) > 1  # the point of GoRA: per-layer ranks
    path = loraplex.save(model, tmp_path / "gora")
    spec = loraplex.io.read_spec(path)
    assert len(spec.adapters) == len(set(ranks.values()))  # one entry per distinct (rank, alpha)
    fresh = loraplex.load(SPECS["block"].make(), path)
    assert {n: a.rank for n, a in loraplex.adapters(fresh)} == ranks
    x = SPECS["block"].input()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


# 5. Option errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 0}, "rank=0 must be an integer >= 1"),
        ({"alpha": 0}, "alpha=0 must be a finite number > 0"),
        ({"importance": "nope"}, "importance='nope' must be one of"),
        ({"r_min": -1}, "r_min=-1 must be an integer >= 0"),
        ({"r_min": 5, "r_max": 4}, "r_max=4 must be an integer >= 5"),
        ({"lr_g": -1.0}, "lr_g=-1.0 must be a finite number > 0"),
        ({"stable_gamma": math.nan}, "stable_gamma=nan must be a finite number > 0"),
        ({"n_steps": 0}, "n_steps=0 must be an integer >= 1"),
        ({"scale_by_lr": 1}, "scale_by_lr=1 must be True or False"),
        ({"seed": 1.5}, "seed=1.5 must be an integer"),
        ({"targets": "nothing"}, "matched no linear layer"),
        ({"dropout": 1.0}, "dropout=1.0 must be a number in"),
    ],
)
def test_bad_options_are_clear_value_errors(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        gora_init(SPECS["mlp"].make(), data("mlp", n=1), loss_fn=ce, **options)


def test_no_batch_or_no_gradient_are_clear_value_errors() -> None:
    with pytest.raises(ValueError, match="gave no batch"):
        gora_init(SPECS["mlp"].make(), [], loss_fn=ce)
    with pytest.raises(ValueError, match="importances sum to 0"):
        gora_init(SPECS["mlp"].make(), data("mlp", n=1), loss_fn=lambda m, b: m.fc1.weight.sum() * 0)
    model = gora_init(SPECS["mlp"].make(), data("mlp", n=1), loss_fn=ce, seed=0)

    def never(m: nn.Module, b: dict) -> torch.Tensor:
        raise AssertionError("the pre-pass must not run")

    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        gora_init(model, data("mlp", n=1), loss_fn=never)
    gora_init(model, data("mlp", n=1), loss_fn=ce, name="second", seed=0)  # stacks on the first
    assert [a.name for _, a in loraplex.adapters(model)] == ["default", "second", "default", "second"]


# 6. DDP: two processes allocate and initialise identically ---------------------------------------

SCRIPT = """
import sys
import torch, torch.distributed as dist, torch.nn.functional as F
sys.path.insert(0, {tests!r})
from matrix import MODELS
from safetensors.torch import save_file
import loraplex
from loraplex.rank import gora_init

dist.init_process_group("gloo")
rank = dist.get_rank()
model = MODELS[1].make(0)  # block: the same weights on both processes
g = torch.Generator().manual_seed(rank)  # each process its own shard of data
batches = [{{"x": torch.randn(3, 7, 16, generator=g), "y": torch.randint(0, 3, (3,), generator=g)}} for _ in range(2)]
torch.manual_seed(100 + rank)  # a different global RNG: the seed of A is rank 0's
gora_init(model, batches, loss_fn=lambda m, b: F.cross_entropy(m(b["x"]), b["y"]), rank=4, importance="union_mean")
out = {{f"{{n}}.{{k}}": v for n, a in loraplex.adapters(model) for k, v in a.own_state_dict().items()}}
save_file(out, {out!r} + f"/rank{{rank}}.safetensors")
dist.destroy_process_group()
"""


def test_two_ddp_processes_build_identical_adapters(tmp_path: Path) -> None:
    tests = str(Path(__file__).resolve().parent)
    script = tmp_path / "ddp_gora.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=tests, out=str(tmp_path))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(tests).parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    # one process on both shards with rank 0's global seed gives the same ranks and factors
    batches = []
    for rank in range(2):
        g = torch.Generator().manual_seed(rank)
        batches += [
            {"x": torch.randn(3, 7, 16, generator=g), "y": torch.randint(0, 3, (3,), generator=g)} for _ in range(2)
        ]
    single = SPECS["block"].make(0)  # (make seeds the global RNG: seed after it, as the script does)
    torch.manual_seed(100)
    gora_init(single, batches, loss_fn=ce, rank=4, importance="union_mean")
    want = {f"{n}.{k}": v for n, a in loraplex.adapters(single) for k, v in a.own_state_dict().items()}
    assert want.keys() == r0.keys()
    for k in want:
        torch.testing.assert_close(r0[k], want[k], rtol=1e-4, atol=1e-6)


def test_gora_is_a_registered_initialiser_that_train_consults_generically(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19: ``finetune`` asks ``loraplex.rank.INITIALISERS`` (its declared methods, options and pre-pass
    steps), never the string "gora"; another registered initialiser is offered and checked the same way."""
    from loraplex import train
    from loraplex.rank import ALLOCATORS, INITIALISERS, Initialiser

    gora = INITIALISERS["gora"]
    assert gora.init is gora_init and gora.methods == ("lora",) and gora.steps_option == "n_steps"
    assert not set(INITIALISERS) & set(ALLOCATORS)
    assert train.allocator_names() == ["none", *sorted(ALLOCATORS), "gora"]
    with pytest.raises(
        ValueError, match="allocator='gora' initialises LoRA adapters: method must be 'lora', not 'loha'"
    ):
        train.check_config(train.FinetuneConfig(data="x", method="loha", allocator="gora"))
    fake = Initialiser(init=gora_init, methods=("dora", "bora"), options=("rank",), description="test")
    monkeypatch.setitem(INITIALISERS, "fake", fake)
    assert "fake" in train.allocator_names()
    with pytest.raises(ValueError, match="initialises DoRA / BoRA adapters: method must be 'dora' or 'bora'"):
        train.check_config(train.FinetuneConfig(data="x", method="lora", allocator="fake"))
    seen = {}
    monkeypatch.setitem(INITIALISERS, "fake", Initialiser(lambda *a, **k: seen.update(k), ("dora",), ("rank",), "t"))
    cfg = train.FinetuneConfig(data="x", method="dora", allocator="fake", options={"rank": 2}, allocator_options={})
    train._initialise(nn.Linear(2, 2), cfg, [])
    assert seen["rank"] == 2 and seen["seed"] == cfg.seed
    with pytest.raises(ValueError, match=r"allocator='fake' takes the DoRA options \('rank',\), not \['alpha'\]"):
        train._initialise(
            nn.Linear(2, 2),
            train.FinetuneConfig(data="x", method="dora", allocator="fake", options={"rank": 2, "alpha": 1.0}),
            [],
        )
