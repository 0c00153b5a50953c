"""Named adapters (activate, remove, merge / disabled / save / load by name) and loraplex.combine (issue 11)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from matrix import CASES, MODELS, Case, perturb, tol
from torch import nn

import loraplex
from loraplex.adapter import Adapter, weight_of
from loraplex.combine import combine
from loraplex.inject import layers
from loraplex.named import activate, adapter_names, remove

MLP = MODELS[0]
A_OPTS = {"rank": 2, "alpha": 4}  # the companion adapter "a": a plain LoRA stacks on and under every method


@torch.no_grad()
def jiggle(model: nn.Module, name: str, seed: int = 5, scale: float = 0.2) -> None:
    """Move the parameters of the adapters called ``name`` off their init (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    for _, a in loraplex.adapters(model):
        if a.name == name:
            for _, p in a.own_parameters():
                if p.is_floating_point():
                    p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def hooks(model: nn.Module) -> dict[str, tuple[int, ...]]:
    kinds = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    )
    return {n: tuple(len(getattr(m, k, {})) for k in kinds) for n, m in model.named_modules()}


def snapshot(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Everything the leak check compares (PEFT's test_delete_adapter checks keys, modules and outputs)."""
    with torch.no_grad():
        out = model(x)
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [(n, p.requires_grad, tuple(p.shape)) for n, p in model.named_parameters()],
        "count": sum(p.numel() for p in model.parameters()),
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "hooks": hooks(model),
        "adapters": [(n, a.name, a.method, a.active) for n, a in loraplex.adapters(model)],
        "out": out,
    }


def assert_same(got: dict[str, Any], want: dict[str, Any], **close: float) -> None:
    for key in ("params", "count", "modules", "hooks", "adapters"):
        assert got[key] == want[key], key
    for key in ("state", "buffers"):
        assert list(got[key]) == list(want[key]), key
        for k in want[key]:
            torch.testing.assert_close(got[key][k], want[key][k], **close, msg=f"{key} {k}")
    torch.testing.assert_close(got["out"], want["out"], **close)


def exact(case: Case) -> dict[str, float]:
    return {"rtol": 0.0, "atol": 0.0}


def test_cases_cover_every_method() -> None:
    assert set(loraplex.METHODS) <= {c.method for c in CASES}


# ---------------------------------------------------------------------------------------------------------------
# Leak check: adapt(name="b") then remove("b") leaves no trace, for every method, on top of and beneath "a".


def test_remove_on_top_leaves_no_trace(case: Case) -> None:
    spec = case.specs[0]
    model = loraplex.adapt(spec.make(), "lora", targets=case.targets, name="a", **A_OPTS)
    jiggle(model, "a")
    x = spec.input()
    before = snapshot(model, x)
    if not case.stackable:
        with pytest.raises(ValueError, match="stack"):
            loraplex.adapt(model, case.method, targets=case.targets, name="b", **case.options)
        assert_same(snapshot(model, x), before, **exact(case))
        return
    loraplex.adapt(model, case.method, targets=case.targets, name="b", **case.options)
    jiggle(model, "b")
    assert adapter_names(model) == ["a", "b"]
    remove(model, "b")
    assert_same(snapshot(model, x), before, **exact(case))


def test_remove_beneath_leaves_no_trace(case: Case) -> None:
    """ "b" adapted first, "a" on top of it; removing "b" gives the model that only ever had "a"."""
    spec = case.specs[0]
    model = loraplex.adapt(spec.make(), case.method, targets=case.targets, name="b", **case.options)
    loraplex.adapt(model, "lora", targets=case.targets, name="a", **A_OPTS)
    perturb(model)
    x = spec.input()
    remove(model, "b")
    assert adapter_names(model) == ["a"]
    for _, top in layers(model).items():
        if isinstance(top, Adapter):
            assert [s.name for s in Adapter.stack(top)] == ["a"] and not isinstance(top.base, Adapter)
    reference = loraplex.adapt(spec.make(), "lora", targets=case.targets, name="a", **A_OPTS)
    mine = dict(loraplex.adapters(model))
    with torch.no_grad():
        for where, a in loraplex.adapters(reference):
            a.load_state_dict(mine[where].own_state_dict(), strict=False)
    assert_same(snapshot(model, x), snapshot(reference, x), **tol(case))


def test_remove_keeps_the_other_adapters_outputs() -> None:
    model = loraplex.adapt(MLP.make(), "loha", name="a", rank=2)
    loraplex.adapt(model, "lora", name="b", rank=2)
    loraplex.adapt(model, "dora", name="c", rank=2)  # reads the base: fine, "b" does not rewrite it
    perturb(model)
    x = MLP.input()
    with torch.no_grad(), loraplex.disabled(model, name="b"):
        want = model(x)
    remove(model, "b")  # from the middle of every stack
    torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)
    assert adapter_names(model) == ["a", "c"]


def test_remove_refuses_a_base_rewrite_under_a_base_reader() -> None:
    model = loraplex.adapt(MLP.make(), "lora", name="p", rank=2, init="pissa")
    loraplex.adapt(model, "dora", name="d", rank=2)
    perturb(model)
    x = MLP.input()
    before = snapshot(model, x)
    with pytest.raises(ValueError, match="'p'.*'dora' adapter 'd'"):
        remove(model, "p")
    assert_same(snapshot(model, x), before, rtol=0.0, atol=0.0)
    remove(model, "d")
    remove(model, "p")  # now the base weight is W0 again
    torch.testing.assert_close(model(x), MLP.make()(x), rtol=1e-5, atol=1e-5)


def test_unknown_names_are_refused() -> None:
    model = loraplex.adapt(MLP.make(), "lora", name="a", rank=2)
    loraplex.adapt(model, "lora", name="b", rank=2)
    for call in (
        lambda: remove(model, "zz"),
        lambda: loraplex.merge(model, name="zz"),
        lambda: activate(model, ["a", "zz"]),
        lambda: activate(model, [3]),
        lambda: loraplex.disabled(model, name="zz").__enter__(),
    ):
        with pytest.raises(ValueError, match=r"adapters are \['a', 'b'\]"):
            call()
    assert all(a.active for _, a in loraplex.adapters(model))


# ---------------------------------------------------------------------------------------------------------------
# activate / disabled(name) / several active adapters add up


def test_activate_selects_exactly_the_named_adapters() -> None:
    model = loraplex.adapt(MLP.make(), "lora", name="a", rank=2)
    loraplex.adapt(model, "loha", name="b", rank=2)
    loraplex.adapt(model, "dora", name="c", rank=2)
    perturb(model)
    x = torch.randn(4, 20)
    top = model.fc2
    root = top.root(x)
    deltas = {a.name: a.delta_weight() for a in Adapter.stack(top)}
    for chosen in ([], ["a"], ["b"], ["c"], ["a", "c"], ["a", "b", "c"], "b"):
        assert activate(model, chosen) is model
        names = [chosen] if isinstance(chosen, str) else chosen
        assert {a.name for _, a in loraplex.adapters(model) if a.active} == set(names)
        want = root + x @ sum((deltas[n] for n in names), torch.zeros(18, 20)).T
        torch.testing.assert_close(top(x), want, rtol=1e-5, atol=1e-5)


def test_disabled_by_name_switches_off_only_that_adapter() -> None:
    model = loraplex.adapt(MLP.make(), "lora", name="a", rank=2)
    loraplex.adapt(model, "lokr", name="b", rank=2)
    perturb(model)
    model.fc1.base.active = False  # "a" on fc1 was off already: it stays off after the block
    x = torch.randn(3, 12)
    top = model.fc1
    want = top.root(x) + x @ top.delta_weight().T  # only "b"
    with loraplex.disabled(model, name="a"):
        torch.testing.assert_close(top(x), want, rtol=1e-5, atol=1e-5)
        assert model.fc2.active and not model.fc2.base.active
    assert not model.fc1.base.active and model.fc2.base.active and model.fc1.active


# ---------------------------------------------------------------------------------------------------------------
# merge(name=...)


FIRST_CASES = list({c.method: c for c in reversed(CASES)}.values())  # the first case of every method


@pytest.mark.parametrize("first", FIRST_CASES, ids=str)
def test_merge_by_name_folds_only_that_adapter(first: Case) -> None:
    """ "b" (every method) merged, "a" (LoRA, which does not read the base) stays with the same effect."""
    case = first
    spec = case.specs[0]
    model = loraplex.adapt(spec.make(), case.method, targets=case.targets, name="b", **case.options)
    loraplex.adapt(model, "lora", targets=case.targets, name="a", **A_OPTS)
    perturb(model)
    x = spec.input()
    if not case.weight_update:
        before = snapshot(model, x)
        with pytest.raises(ValueError, match="not a weight update"):
            loraplex.merge(model, name="b")
        assert_same(snapshot(model, x), before, rtol=0.0, atol=0.0)
        return
    stacks = {n: Adapter.stack(top) for n, top in layers(model).items() if isinstance(top, Adapter)}
    want_w = {n: (weight_of(s[0].root) + s[1].delta_weight()).detach().clone() for n, s in stacks.items()}  # W + ΔW_b
    want_a = {n: s[0].delta_weight().detach().clone() for n, s in stacks.items()}
    with torch.no_grad():
        y = model(x)
    loraplex.merge(model, name="b")
    assert adapter_names(model) == ["a"]
    for n, top in layers(model).items():
        if n in stacks:
            assert Adapter.stack(top) == [stacks[n][0]]
            torch.testing.assert_close(weight_of(top.root), want_w[n], **tol(case))
            torch.testing.assert_close(top.delta_weight(), want_a[n], rtol=0.0, atol=0.0)
    torch.testing.assert_close(model(x), y, **tol(case))


def test_merge_by_name_refuses_when_a_remaining_adapter_reads_the_base() -> None:
    model = loraplex.adapt(MLP.make(), "lora", name="a", rank=2)
    loraplex.adapt(model, "dora", name="d", rank=2)
    perturb(model)
    x = MLP.input()
    before = snapshot(model, x)
    with pytest.raises(ValueError, match="'dora' adapter 'd'"):
        loraplex.merge(model, name="a")
    assert_same(snapshot(model, x), before, rtol=0.0, atol=0.0)
    loraplex.merge(model, name="d")  # the DoRA itself may go: the LoRA does not read the base
    torch.testing.assert_close(model(x), before["out"], rtol=1e-5, atol=1e-5)
    assert adapter_names(model) == ["a"]
    serial = loraplex.adapt(MLP.make(), "adapter", name="n", targets=["fc1"])  # acts on the layer's output
    loraplex.adapt(serial, "lora", name="a", rank=2, targets=["fc1"])
    with pytest.raises(ValueError, match="'adapter' adapter 'n'"):
        loraplex.merge(serial, name="a")


def test_merge_by_name_keeps_a_pissa_residual_consistent() -> None:
    base = MLP.make()
    model = loraplex.adapt(copy.deepcopy(base), "lora", name="p", rank=2, init="pissa")
    loraplex.adapt(model, "lora", name="a", rank=2)
    perturb(model)
    delta_a = {n: a.delta_weight().detach().clone() for n, a in loraplex.adapters(model) if a.name == "a"}
    loraplex.merge(model, name="a")
    remove(model, "p")  # gives s B0 A0 back: W0 + ΔW_a
    for n, layer in layers(model).items():
        if n in delta_a:
            torch.testing.assert_close(layer.weight, base.get_submodule(n).weight + delta_a[n], rtol=1e-5, atol=1e-5)


def test_the_methods_that_declare_reading_w0() -> None:
    # DoRA / BoRA: a norm of W0 + s B A; Bone: W0's blocks times T; the bottleneck adapter acts on the output
    # (tests/test_properties.py probes each declaration numerically)
    assert {m for m, cls in loraplex.METHODS.items() if cls.reads_base_weight} == {"dora", "bora", "bone", "adapter"}


# ---------------------------------------------------------------------------------------------------------------
# save / load by name, and the spec with several names


def fresh_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_save_and_load_several_names_round_trip(tmp_path: Path) -> None:
    model = loraplex.adapt(MLP.make(), "lora", name="a", rank=2, targets=["fc1", "fc2"])
    loraplex.adapt(model, "loha", name="b", rank=2, targets=["fc2"])
    loraplex.adapt(model, "dora", name="c", rank=2, targets=["fc1", "fc2"])
    perturb(model)
    model.fc1.active = False
    x = MLP.input()
    loraplex.save(model, tmp_path / "all")
    spec = json.loads((tmp_path / "all" / "adapter.json").read_text())
    assert [(e["name"], e["method"], e["layers"]) for e in spec["adapters"]] == [
        ("a", "lora", ["fc1", "fc2"]),
        ("b", "loha", ["fc2"]),
        ("c", "dora", ["fc1", "fc2"]),
    ]
    loaded = loraplex.load(MLP.make(), tmp_path / "all")
    assert [(n, a.name) for n, a in loraplex.adapters(loaded)] == [(n, a.name) for n, a in loraplex.adapters(model)]
    activate(model, ["a", "b", "c"])
    torch.testing.assert_close(fresh_outputs(loaded, x), fresh_outputs(model, x), rtol=1e-6, atol=1e-6)


def test_save_one_name_and_load_it_beside_others(tmp_path: Path) -> None:
    model = loraplex.adapt(MLP.make(), "lora", name="a", rank=2, train=["classifier"])
    loraplex.adapt(model, "lokr", name="b", rank=2)
    perturb(model)
    x = MLP.input()
    loraplex.save(model, tmp_path / "b", name="b")
    spec = json.loads((tmp_path / "b" / "adapter.json").read_text())
    assert [e["name"] for e in spec["adapters"]] == ["b"] and spec["train"] == []
    with pytest.raises(ValueError, match=r"adapters are \['a', 'b'\]"):
        loraplex.save(model, tmp_path / "zz", name="zz")
    # a model with only "a" (same tensors), then "b" loaded beside it: the original model
    only_a = copy.deepcopy(model)
    remove(only_a, "b")
    loraplex.load(only_a, tmp_path / "b")
    assert adapter_names(only_a) == ["a", "b"]
    torch.testing.assert_close(fresh_outputs(only_a, x), fresh_outputs(model, x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        loraplex.load(only_a, tmp_path / "b")
    # the same checkpoint again under another name: "c" has b's effect
    loraplex.load(only_a, tmp_path / "b", name="c")
    activate(only_a, ["c"])
    activate(model, ["b"])
    torch.testing.assert_close(fresh_outputs(only_a, x), fresh_outputs(model, x), rtol=1e-6, atol=1e-6)


def test_load_by_name_selects_from_a_checkpoint_of_several(tmp_path: Path) -> None:
    model = loraplex.adapt(MLP.make(), "lora", name="a", rank=2)
    loraplex.adapt(model, "loha", name="b", rank=2)
    perturb(model)
    x = MLP.input()
    loraplex.save(model, tmp_path)
    fresh = loraplex.load(MLP.make(), tmp_path, name="b")
    assert adapter_names(fresh) == ["b"]
    activate(model, "b")
    torch.testing.assert_close(fresh_outputs(fresh, x), fresh_outputs(model, x), rtol=1e-6, atol=1e-6)
    untouched = MLP.make()
    state = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(ValueError, match=r"holds adapters \['a', 'b'\] and none is called name='c'"):
        loraplex.load(untouched, tmp_path, name="c")
    with pytest.raises(ValueError, match="name='a.b' must be"):
        loraplex.load(untouched, tmp_path, name="a.b")
    assert untouched.state_dict().keys() == state.keys()
    assert all(torch.equal(untouched.state_dict()[k], v) for k, v in state.items())


# ---------------------------------------------------------------------------------------------------------------
# combine


def three_loras(ranks: tuple[int, int, int] = (2, 3, 4)) -> nn.Module:
    model = MLP.make()
    for name, r, alpha in zip("abc", ranks, (4.0, 5.0, 2.0), strict=True):
        loraplex.adapt(model, "lora", name=name, rank=r, alpha=alpha, targets=["fc1", "fc2"], rslora=name == "c")
    perturb(model)
    return model


def deltas(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {n: a.delta_weight().detach().double() for n, a in loraplex.adapters(model) if a.name == name}


def dense_target(model: nn.Module, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        for n, d in deltas(model, name).items():
            out[n] = out.get(n, torch.zeros_like(d)) + w * d
    return out


def test_combine_cat_is_exact_and_inactive() -> None:
    model = three_loras()
    weights = {"a": 0.7, "b": 0.3, "c": 1.5}
    x = MLP.input()
    y = fresh_outputs(model, x)
    report = combine(model, weights, "abc", method="cat")
    torch.testing.assert_close(fresh_outputs(model, x), y, rtol=0.0, atol=0.0)  # the new adapter starts inactive
    assert [(c.layer, c.rank) for c in report.layers] == [("fc1", 9), ("fc2", 9)]
    assert report.max_error < 1e-6
    target = dense_target(model, weights)
    got = deltas(model, "abc")
    for n in target:
        torch.testing.assert_close(got[n], target[n], rtol=1e-5, atol=1e-6)
    activate(model, "abc")
    with loraplex.disabled(model):
        y0 = model.fc1(x)
    torch.testing.assert_close(model.fc1(x), y0 + x @ target["fc1"].float().T, rtol=1e-5, atol=1e-5)


def test_combine_linear_is_peft_s_sqrt_rule_and_not_the_weighted_sum() -> None:
    model = three_loras(ranks=(3, 3, 3))
    weights = {"a": 0.6, "c": 0.4}
    report = combine(model, weights, "ac", method="linear")
    target = dense_target(model, weights)
    for (n, a), (_, c), new in zip(
        [(n, x) for n, x in loraplex.adapters(model) if x.name == "a"],
        [(n, x) for n, x in loraplex.adapters(model) if x.name == "c"],
        [x for _, x in loraplex.adapters(model) if x.name == "ac"],
        strict=True,
    ):
        ka, kc = math.sqrt(0.6 * a.scale), math.sqrt(0.4 * c.scale)
        A = ka * a.A.detach().double() + kc * c.A.detach().double()
        B = ka * a.B.detach().double() + kc * c.B.detach().double()
        torch.testing.assert_close(new.delta_weight().double(), B @ A, rtol=1e-5, atol=1e-6)
        err = float((B @ A - target[n]).norm() / target[n].norm())
        entry = next(e for e in report.layers if e.layer == n)
        assert entry.rank == 3 and entry.error == pytest.approx(err, rel=1e-4) and err > 1e-2  # cross terms
    one = combine(model, {"b": 2.0}, "b2", method="linear")  # one source: exactly w ΔW
    assert one.max_error < 1e-6


def test_combine_svd_truncates_mixed_methods_with_the_eckart_young_error() -> None:
    model = loraplex.adapt(MLP.make(), "lora", name="a", rank=2, targets=["fc1", "fc2"])
    loraplex.adapt(model, "loha", name="b", rank=2, targets=["fc2"])  # fc1 lacks "b": it contributes 0 there
    loraplex.adapt(model, "dora", name="c", rank=2, targets=["fc1", "fc2"])
    loraplex.adapt(model, "bone", name="d", rank=2, targets=["fc1", "fc2"])
    perturb(model)
    weights = {"a": 0.5, "b": 1.0, "c": 0.25, "d": 0.0}
    target = dense_target(model, weights)
    for rank in (3, 7, 12):
        name = f"svd{rank}"
        report = combine(model, weights, name, rank=rank)
        got = deltas(model, name)
        for entry in report.layers:
            s = torch.linalg.svdvals(target[entry.layer])
            k = min(rank, *target[entry.layer].shape)
            want_err = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
            assert entry.rank == k
            assert entry.error == pytest.approx(want_err, rel=1e-4, abs=1e-6)
            assert float((got[entry.layer] - target[entry.layer]).norm() / s.norm()) == pytest.approx(
                want_err, rel=1e-4, abs=1e-6
            )
    assert combine(model, weights, "full", rank=20).max_error < 1e-6  # rank >= min(in, out): exact
    default = combine(model, {"a": 1.0, "b": 1.0}, "dflt")  # largest source rank: LoRA's 2, LoHa's rank(ΔW) = 4
    assert {e.rank for e in default.layers} == {4}


def test_combine_errors_leave_the_model_unchanged() -> None:
    model = loraplex.adapt(MLP.make(), "lora", name="a", rank=2, targets=["fc1", "fc2"])
    loraplex.adapt(model, "lora", name="b", rank=3, targets=["fc1", "fc2"])
    loraplex.adapt(model, "dora", name="d", rank=2, targets=["fc1", "fc2"])
    loraplex.adapt(model, "adapter", name="n", targets=["classifier"])
    perturb(model)
    x = MLP.input()
    before = snapshot(model, x)
    cases = [
        ({"zz": 1.0}, "new", "svd", None, r"'zz'.*adapters are \['a', 'b', 'd', 'n'\]"),
        ({"a": -0.5}, "new", "svd", None, "weight -0.5 of adapter 'a' must be a finite number >= 0"),
        ({"a": float("nan")}, "new", "svd", None, "weight nan"),
        ({"a": True}, "new", "svd", None, "weight True"),
        ({}, "new", "svd", None, "non-empty"),
        ({"n": 1.0}, "new", "svd", None, "not a weight update"),
        ({"a": 1.0, "d": 1.0}, "new", "cat", None, "'dora' adapter whose ΔW is not s B A"),
        ({"a": 1.0, "b": 1.0}, "new", "linear", None, r"one rank, not ranks \[2, 3\]"),
        ({"a": 1.0}, "b", "svd", None, "name='b' is already an adapter"),
        ({"a": 1.0}, "a.b", "svd", None, "name='a.b' must be"),
        ({"a": 1.0}, "new", "ties", None, "method='ties' must be one of"),
        ({"a": 1.0}, "new", "cat", 2, "rank=2 applies to method='svd' only"),
        ({"a": 1.0}, "new", "svd", 0, "rank=0 must be an integer >= 1"),
    ]
    for weights, name, method, rank, message in cases:
        with pytest.raises(ValueError, match=message):
            combine(model, weights, name, method=method, rank=rank)
        assert_same(snapshot(model, x), before, rtol=0.0, atol=0.0)


# ---------------------------------------------------------------------------------------------------------------
# PEFT's add_weighted_adapter as the oracle for "cat", "linear" and "svd" on LoRA


def peft_pair(ranks: tuple[int, int]) -> tuple[nn.Module, nn.Module]:
    peft = pytest.importorskip("peft")
    base = MLP.make()
    targets = ["fc1", "fc2"]
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=ranks[0], lora_alpha=8, target_modules=targets), adapter_name="one"
    )
    theirs.add_adapter("two", peft.LoraConfig(r=ranks[1], lora_alpha=3, target_modules=targets))
    ours = loraplex.adapt(copy.deepcopy(base), "lora", name="one", rank=ranks[0], alpha=8, targets=targets)
    loraplex.adapt(ours, "lora", name="two", rank=ranks[1], alpha=3, targets=targets)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for where, a in loraplex.adapters(ours):
            layer = theirs.base_model.model.get_submodule(where)
            for mine, peft_p in ((a.A, layer.lora_A[a.name].weight), (a.B, layer.lora_B[a.name].weight)):
                mine.copy_(torch.randn(mine.shape, generator=g))
                peft_p.copy_(mine)
    return ours, theirs


@pytest.mark.parametrize(("method", "ranks"), [("cat", (4, 2)), ("linear", (3, 3)), ("svd", (4, 2))])
def test_combine_matches_peft_add_weighted_adapter(method: str, ranks: tuple[int, int]) -> None:
    ours, theirs = peft_pair(ranks)
    weights = {"one": 0.7, "two": 0.3}
    theirs.add_weighted_adapter(["one", "two"], [0.7, 0.3], "mix", combination_type=method)
    combine(ours, weights, "mix", method=method)
    for where, a in loraplex.adapters(ours):
        if a.name != "mix":
            continue
        layer = theirs.base_model.model.get_submodule(where)
        assert layer.scaling["mix"] == a.scale == 1.0
        want = layer.get_delta_weight("mix").detach()
        torch.testing.assert_close(a.delta_weight().detach(), want, rtol=1e-5, atol=1e-5)
        if method != "svd":  # same factors, not only the same product (svd: signs of singular vectors are free)
            torch.testing.assert_close(a.A.detach(), layer.lora_A["mix"].weight.detach(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(a.B.detach(), layer.lora_B["mix"].weight.detach(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# combine on convolutions and embeddings: the same code, in the (out, in) matrix layout

CONV, EMBED = (next(m for m in MODELS if m.name == n) for n in ("conv", "embed"))


def spatial_loras(ranks: tuple[int, int] = (2, 3)) -> nn.Module:
    """ConvNet (padded Conv2d, strided and dilated Conv2d, bias-free Conv1d) and the Embed model side by side."""
    model = nn.ModuleDict({"conv": CONV.make(), "embed": EMBED.make()})
    targets = ["conv.c1", "conv.c2", "conv.c3", "embed.emb", "embed.proj"]
    for name, r, alpha in zip("ab", ranks, (4.0, 1.5), strict=True):
        loraplex.adapt(model, "lora", name=name, rank=r, alpha=alpha, targets=targets, rslora=name == "b")
    perturb(model)
    return model


def spatial_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    from matrix import layer_input

    return {n: layer_input(model.get_submodule(n)) for n in ("conv.c1", "conv.c2", "conv.c3", "embed.emb")}


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_combine_on_conv_and_embedding_equals_the_dense_rederivation(method: str) -> None:
    """cat: exactly Σ w ΔW; linear: PEFT's √(w s) rule built by hand; svd: the Eckart–Young error of the flattened
    Σ w ΔW. The new adapter, switched on alone, runs the root layer with ``W + ΔW_new`` (its kind kept)."""
    from matrix import with_weight

    model = spatial_loras((3, 3) if method == "linear" else (2, 3))
    weights = {"a": 0.7, "b": 0.4}
    target = dense_target(model, weights)
    report = combine(model, weights, "ab", method=method, rank=4 if method == "svd" else None)
    got = deltas(model, "ab")
    assert set(got) == set(target) == {e.layer for e in report.layers}
    new = {n: a for n, a in loraplex.adapters(model) if a.name == "ab"}
    for entry in report.layers:
        n, want = entry.layer, target[entry.layer]
        matrix = want.reshape(want.shape[0], -1) if want.dim() > 2 else want  # embedding: (num, dim), same σ
        if method == "cat":
            assert entry.rank == 5 and entry.error < 1e-6
            torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-6)
        elif method == "linear":
            a, b = (next(x for m, x in loraplex.adapters(model) if m == n and x.name == k) for k in "ab")
            ka, kb = math.sqrt(0.7 * a.scale), math.sqrt(0.4 * b.scale)
            A = ka * a.A.detach().double() + kb * b.A.detach().double()
            B = ka * a.B.detach().double() + kb * b.B.detach().double()
            torch.testing.assert_close(got[n], new[n].layout(B @ A), rtol=1e-5, atol=1e-6)
            assert entry.rank == 3 and entry.error == pytest.approx(float((got[n] - want).norm() / want.norm()), 1e-4)
        else:
            s = torch.linalg.svdvals(matrix)
            k = min(4, *matrix.shape)
            err = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
            assert entry.rank == k and entry.error == pytest.approx(err, rel=1e-4, abs=1e-6)
            assert float((got[n] - want).norm() / want.norm()) == pytest.approx(err, rel=1e-4, abs=1e-6)
    activate(model, "ab")
    for n, x in spatial_inputs(model).items():
        assert new[n].kind == ("embedding" if n == "embed.emb" else "conv")
        torch.testing.assert_close(model.get_submodule(n)(x), with_weight(new[n], x, got[n].float()), **TIGHT)


TIGHT = {"rtol": 1e-5, "atol": 1e-5}


def test_combine_svd_mixes_conv_methods() -> None:
    """svd takes any weight-update sources on a conv (LoRA, DoRA, LoHa, LoKr); full rank is exact."""
    model = CONV.make()
    for name, method in zip("abcd", ("lora", "dora", "loha", "lokr"), strict=True):
        loraplex.adapt(model, method, name=name, rank=2, targets=["c1", "c2", "c3"])
    perturb(model)
    weights = {"a": 0.5, "b": 0.25, "c": 1.0, "d": 0.3}
    target = dense_target(model, weights)
    report = combine(model, weights, "mix", rank=100)
    assert {e.layer: e.rank for e in report.layers} == {"c1": 6, "c2": 8, "c3": 10}  # min(out, in_ch · kernel)
    assert report.max_error < 1e-6
    for n, d in deltas(model, "mix").items():
        torch.testing.assert_close(d, target[n], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'dora' adapter whose ΔW is not s B A"):
        combine(model, {"a": 1.0, "b": 1.0}, "x", method="cat")


class ConvEmbed(nn.Module):
    """PEFT's add_weighted_adapter oracle: an embedding and a padded, strided Conv2d (PEFT's conv LoRA has no
    dilation; its svd flattens Conv2d updates only, so no Conv1d here)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 9, padding_idx=0)
        self.conv = nn.Conv2d(9, 7, 3, padding=1, stride=2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).transpose(1, 2).reshape(ids.shape[0], 9, 4, 4)
        return self.conv(h)


@pytest.mark.parametrize(("method", "ranks"), [("cat", (4, 2)), ("linear", (3, 3)), ("svd", (4, 2))])
def test_combine_on_conv_and_embedding_matches_peft(method: str, ranks: tuple[int, int]) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = ConvEmbed().eval()
    targets = ["emb", "conv"]
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=ranks[0], lora_alpha=8, target_modules=targets), adapter_name="one"
    )
    theirs.add_adapter("two", peft.LoraConfig(r=ranks[1], lora_alpha=3, target_modules=targets))
    ours = loraplex.adapt(copy.deepcopy(base), "lora", name="one", rank=ranks[0], alpha=8, targets=targets)
    loraplex.adapt(ours, "lora", name="two", rank=ranks[1], alpha=3, targets=targets)
    g = torch.Generator().manual_seed(7)

    def peft_tensors(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name in layer.lora_embedding_A:
            return layer.lora_embedding_A[name], layer.lora_embedding_B[name]  # (r, num), (dim, r)
        return layer.lora_A[name].weight, layer.lora_B[name].weight  # (r, in_ch, kh, kw), (out, r, 1, 1)

    with torch.no_grad():
        for where, a in loraplex.adapters(ours):
            pa, pb = peft_tensors(theirs.base_model.model.get_submodule(where), a.name)
            for mine, peft_p in ((a.A, pa), (a.B, pb)):
                mine.copy_(torch.randn(mine.shape, generator=g))
                peft_p.copy_(mine.view(peft_p.shape))
    ids = torch.randint(0, 12, (2, 16), generator=g)
    activate(ours, "one")  # PEFT's active adapter
    torch.testing.assert_close(theirs(ids), ours(ids), **TIGHT)  # the same sources
    theirs.add_weighted_adapter(["one", "two"], [0.7, 0.3], "mix", combination_type=method)
    combine(ours, {"one": 0.7, "two": 0.3}, "mix", method=method)
    seen = 0
    for where, a in loraplex.adapters(ours):
        if a.name != "mix":
            continue
        seen += 1
        layer = theirs.base_model.model.get_submodule(where)
        assert layer.scaling["mix"] == a.scale == 1.0
        torch.testing.assert_close(a.delta_weight().detach(), layer.get_delta_weight("mix").detach(), **TIGHT)
        if method != "svd":  # the same factors (cat: lora_A kernels along out channels, lora_B along in channels)
            pa, pb = peft_tensors(layer, "mix")
            torch.testing.assert_close(a.A.detach(), pa.detach().reshape(a.A.shape), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(a.B.detach(), pb.detach().reshape(a.B.shape), rtol=1e-6, atol=1e-6)
    assert seen == 2
    theirs.set_adapter("mix")
    activate(ours, "mix")
    torch.testing.assert_close(theirs(ids), ours(ids), **TIGHT)
