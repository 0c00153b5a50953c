"""The shared property matrix (../shared/docs/properties.md, A-E), over every registered method."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from matrix import CASES, MODELS, Case, Model, clone, layer_input, perturb, tol, with_weight
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import loraplex
from loraplex import METHODS, Adapter
from loraplex.adapter import KINDS, linear_sizes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")


def adapted(spec: Model, case: Case, seed: int = 0, **kw) -> tuple[nn.Module, nn.Module]:
    """(base, adapted copy) with every linear but the head adapted."""
    base = spec.make(seed)
    model = loraplex.adapt(clone(base), case.method, targets=case.targets, train=["classifier"], **case.options, **kw)
    return base, model


def train_steps(model: nn.Module, spec: Model, n: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(n):
        model(spec.input(seed=10 + i)).square().mean().backward()
        opt.step()
        loraplex.advance(model)
        opt.zero_grad(set_to_none=True)


def test_every_method_has_a_case() -> None:
    assert {c.method for c in CASES} == set(METHODS)


# A. Construction -------------------------------------------------------------------------------


def test_adapt_replaces_exactly_the_targets(case: Case, model_spec: Model) -> None:
    base = model_spec.make()
    targets = loraplex.inject.resolve(base, case.targets)[:1]
    model = loraplex.adapt(clone(base), case.method, targets=targets, **case.options)
    got = {n for n, m in model.named_modules() if isinstance(m, Adapter)}
    assert got == set(targets)
    for n in targets:
        a = model.get_submodule(n)
        assert (a.in_features, a.out_features) == linear_sizes(base.get_submodule(n))
    assert torch.isfinite(model(model_spec.input())).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_dtypes(case: Case, dtype: torch.dtype) -> None:
    spec = case.specs[0]
    model = loraplex.adapt(spec.make().to(dtype), case.method, targets=case.targets, **case.options)
    perturb(model)
    y = model(spec.input(dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    for _, a in loraplex.adapters(model):
        assert all(p.dtype == torch.float32 for _, p in a.own_parameters())


def test_trainable_count_is_the_formula(case: Case, model_spec: Model) -> None:
    base, model = adapted(model_spec, case)
    expected = sum(
        METHODS[case.method].num_params(*linear_sizes(a), **case.options, **kernel_of(a))
        for _, a in loraplex.adapters(model)
    )
    expected += sum(p.numel() for p in base.classifier.parameters())
    assert loraplex.inject.count_trainable(model) == expected


def kernel_of(a: Adapter) -> dict[str, int]:
    """``kernel=prod(kernel_size)`` for an adapter on a convolution (LoKr's count needs it), else nothing."""
    w = a.root.weight
    return {"kernel": int(torch.tensor(w.shape[2:]).prod())} if a.kind == "conv" else {}


# B. Trainability -------------------------------------------------------------------------------


def test_gradients_reach_exactly_the_trainable(case: Case, model_spec: Model) -> None:
    _, model = adapted(model_spec, case)
    perturb(model)
    model(model_spec.input()).square().mean().backward()
    trainable = {id(p) for _, a in loraplex.adapters(model) for _, p in a.own_parameters()}
    trainable |= {id(p) for p in model.classifier.parameters()}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_training_moves_adapters_and_never_the_base(case: Case, model_spec: Model) -> None:
    _, model = adapted(model_spec, case)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, model_spec)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def needs_weight_update(case: Case) -> None:
    if not case.weight_update:
        pytest.skip(f"{case} is not a weight update: no delta_weight (its own test file has a dense reference)")


def test_gradients_match_the_dense_reference(case: Case) -> None:
    needs_weight_update(case)
    torch.manual_seed(0)
    a = METHODS[case.method](nn.Linear(*case.layer), **case.options).double().eval()
    perturb(nn.Sequential(a))
    x = torch.randn(6, case.layer[0], dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, case.layer[1], dtype=torch.float64)
    own = [p for _, p in a.own_parameters()]
    got = torch.autograd.grad((a(x) * g).sum(), [x, *own])
    W = a.weight
    dense = F.linear(x, W + a.delta_weight(), a.root.bias)
    want = torch.autograd.grad((dense * g).sum(), [x, *own])
    for u, v in zip(got, want, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-10)


# C. Identity at init, switching off ------------------------------------------------------------


def test_identity_at_init(case: Case, model_spec: Model) -> None:
    if not case.identity:
        pytest.skip(f"{case} does not start at the base model (documented)")
    base, model = adapted(model_spec, case)
    x = model_spec.input()
    torch.testing.assert_close(model(x), base(x), **tol(case))


def test_disabled_is_the_base_and_switches_back(case: Case, model_spec: Model) -> None:
    base, model = adapted(model_spec, case)
    train_steps(model, model_spec)
    base.classifier.load_state_dict(model.classifier.state_dict())
    x = model_spec.input()
    trained = model(x)
    assert not torch.allclose(trained, base(x), rtol=1e-4, atol=1e-4)
    with loraplex.disabled(model):
        torch.testing.assert_close(model(x), base(x), **tol(case))
    torch.testing.assert_close(model(x), trained, rtol=0, atol=0)


# D. Merging ------------------------------------------------------------------------------------


def test_delta_weight_explains_the_output(case: Case) -> None:
    needs_weight_update(case)
    torch.manual_seed(0)
    a = METHODS[case.method](nn.Linear(*case.layer), **case.options).eval()
    perturb(nn.Sequential(a))
    x = torch.randn(6, case.layer[0])
    torch.testing.assert_close(a.base(x) + x @ a.delta_weight().T, a(x), **tol(case))


def test_delta_weight_explains_every_layer(case: Case, model_spec: Model) -> None:
    """Property 9 on the model's own layers: the adapter is its root layer run with ``W + delta_weight()``.

    For a linear layer this is ``base(x) + x ΔW^T``; it also covers convolutions and embeddings.
    """
    needs_weight_update(case)
    _, model = adapted(model_spec, case)
    perturb(model)
    for _, a in loraplex.adapters(model):
        x = layer_input(a)
        torch.testing.assert_close(a(x), with_weight(a, x, a.delta_weight()), **tol(case))


def test_merge_equals_unmerged(case: Case, model_spec: Model, tmp_path) -> None:
    _, model = adapted(model_spec, case)
    perturb(model)
    x = model_spec.input()
    y = model(x)
    if not case.weight_update:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="not a weight update"):
            loraplex.merge(model)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
        return
    loraplex.merge(model)
    assert not any(isinstance(m, Adapter) for m in model.modules())
    torch.testing.assert_close(model(x), y, **tol(case))
    save_file(model.state_dict(), tmp_path / "merged.safetensors")
    fresh = model_spec.make(seed=5)
    fresh.load_state_dict(load_file(tmp_path / "merged.safetensors"))
    torch.testing.assert_close(fresh(x), y, **tol(case))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_merge_refuses_non_finite(case: Case, bad: float) -> None:
    needs_weight_update(case)  # merge refuses those anyway (test_merge_equals_unmerged)
    spec = case.specs[0]
    _, model = adapted(spec, case)
    found = loraplex.adapters(model)
    _, a = found[-1]
    with torch.no_grad():
        next(p for _, p in a.own_parameters()).view(-1)[0] = bad
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or inf"):
        loraplex.merge(model)
    assert loraplex.adapters(model) == found
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state if torch.isfinite(state[k]).all())


def test_unload_gives_back_the_base(case: Case, model_spec: Model) -> None:
    base, model = adapted(model_spec, case)
    perturb(model)
    loraplex.unload(model)
    x = model_spec.input()
    torch.testing.assert_close(model(x), base(x), **tol(case))
    assert model.state_dict().keys() == base.state_dict().keys()


# E. Saving and loading -------------------------------------------------------------------------


def test_save_writes_only_safetensors_and_json(case: Case, tmp_path) -> None:
    spec = case.specs[0]
    _, model = adapted(spec, case)
    loraplex.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.safetensors"]
    written = json.loads((tmp_path / "adapter.json").read_text())
    assert written["adapters"][0]["method"] == case.method
    with safe_open(tmp_path / "adapter.safetensors", "pt") as f:
        keys = list(f.keys())
    base_keys = set(spec.make().state_dict())
    assert keys and all(k.startswith(("adapter.", "train.")) for k in keys)
    assert not any(k.split(".", 2)[-1] in base_keys for k in keys if k.startswith("adapter."))


def test_round_trip_into_a_fresh_model(case: Case, model_spec: Model, tmp_path) -> None:
    base, model = adapted(model_spec, case)
    train_steps(model, model_spec)
    loraplex.save(model, tmp_path)
    fresh = model_spec.make(seed=99)  # other random init, then the same "pretrained" weights
    fresh.load_state_dict(base.state_dict())
    torch.manual_seed(1234)
    loraplex.load(fresh, tmp_path)
    x = model_spec.input()
    torch.testing.assert_close(fresh(x), model(x), **tol(case))
    saved = load_file(tmp_path / "adapter.safetensors")
    train_steps(fresh, model_spec)
    train_steps(model, model_spec)
    loraplex.save(fresh, tmp_path / "again")
    again = load_file(tmp_path / "again" / "adapter.safetensors")
    assert again.keys() == saved.keys()
    reloaded = model_spec.make(seed=7)
    reloaded.load_state_dict(base.state_dict())
    loraplex.load(reloaded, tmp_path / "again")
    for k, v in loraplex.io.tensors_of(reloaded).items():
        assert torch.equal(v, again[k]), k


def _assert_untouched(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    assert not loraplex.adapters(model)
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_load_rejects_mismatches_and_leaves_the_model(case: Case, tmp_path) -> None:
    spec = case.specs[0]
    _, model = adapted(spec, case)
    loraplex.save(model, tmp_path)
    first, a = loraplex.adapters(model)[0]
    other = next(m for m in MODELS if m.name != spec.name).make()  # other layer names
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=first):
        loraplex.load(other, tmp_path)
    _assert_untouched(other, state)

    wide = spec.make()  # same names, one layer twice as wide
    wide.set_submodule(first, nn.Linear(a.in_features, 2 * a.out_features))
    state = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{first}.*shape"):
        loraplex.load(wide, tmp_path)
    _assert_untouched(wide, state)

    spec_json = json.loads((tmp_path / "adapter.json").read_text())
    spec_json["adapters"][0]["method"] = "no-such-method"
    (tmp_path / "adapter.json").write_text(json.dumps(spec_json))
    fresh = spec.make()
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="no-such-method"):
        loraplex.load(fresh, tmp_path)
    _assert_untouched(fresh, state)


def test_two_adapters_on_one_layer_add_up(case: Case, model_spec: Model) -> None:
    first = Case("lora", {"rank": 2}) if case.method == "dora" or not case.stackable else case
    model = loraplex.adapt(model_spec.make(), first.method, targets=case.targets, name="a", **first.options)
    if not case.stackable:
        with pytest.raises(ValueError, match="stack"):
            loraplex.adapt(model, case.method, targets=case.targets, name="b", **case.options)
        return
    loraplex.adapt(model, case.method, targets=case.targets, name="b", **case.options)
    perturb(model)
    for top in loraplex.inject.layers(model).values():
        if not isinstance(top, Adapter):
            continue
        b, a = Adapter.stack(top)
        x = torch.randn(6, top.in_features) if top.kind == "linear" else layer_input(top)
        root = top.root(x)
        effects = []
        for on in ([a], [b], [a, b]):
            a.active, b.active = a in on, b in on
            effects.append(top(x) - root)
        torch.testing.assert_close(effects[2], effects[0] + effects[1], **tol(case))
        delta = a.delta_weight() + b.delta_weight()
        if top.kind == "linear":
            torch.testing.assert_close(top(x), root + x @ delta.T, **tol(case))
        else:  # convolution or embedding: the root layer run with W + ΔW (property 9)
            torch.testing.assert_close(top(x), with_weight(top, x, delta), **tol(case))


# F. Declared capabilities (loraplex/adapter.py): each declaration equals what a probe measures -------


def _noise(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A deterministic random perturbation of ``t``'s size: ``0.5 (mean|t| + 1) N(0, 1)``."""
    return 0.5 * (t.abs().mean().item() + 1.0) * torch.randn(t.shape, generator=g, dtype=t.dtype)


@torch.no_grad()
def probe_reads_base(a: Adapter) -> bool:
    """Whether moving the root weight at random changes the adapter's effect ``a(x) - root(x)`` (on a copy).

    Its own parameters are moved first, which puts adapters that start at no effect (Bone's ``T = 0``) at a
    generic point; "changes": by more than ``1e-4`` relative.
    """
    probe = copy.deepcopy(a).double().eval()
    g = torch.Generator().manual_seed(0)
    for _, p in probe.own_parameters():
        if p.is_floating_point():
            p.add_(_noise(p, g))
    x = layer_input(probe)
    x = x if x.dtype == torch.long else x.double()
    before = probe(x) - probe.root(x)
    probe.weight.add_(_noise(probe.weight, g))
    change = (probe(x) - probe.root(x) - before).norm()
    return bool(change > 1e-4 * (before.norm() + 1e-12))


def test_reads_base_weight_is_declared(case: Case) -> None:
    """``reads_base_weight`` (hot-swap / merge_named / remove rely on it) equals the numeric probe."""
    model = loraplex.adapt(case.specs[0].make(), case.method, targets=case.targets, **case.options)
    for n, a in loraplex.adapters(model):
        assert probe_reads_base(a) == type(a).reads_base_weight, n


def kind_layer(kind: str, case: Case) -> nn.Module:
    """A small layer of each kind: the case's linear, a padded Conv2d, an embedding with a padding index."""
    torch.manual_seed(0)
    if kind == "conv":
        return nn.Conv2d(4, 8, 3, padding=1)
    return nn.Embedding(11, 8, padding_idx=0) if kind == "embedding" else nn.Linear(*case.layer)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_kinds_are_declared(case: Case, kind: str) -> None:
    """A declared kind is adapted (weight updates: the layer run with ``W + delta_weight()``); any other is refused."""
    layer = kind_layer(kind, case)
    cls = METHODS[case.method]
    if kind not in cls.supported_kinds():
        with pytest.raises(ValueError, match=rf"{case.method!r} cannot adapt {type(layer).__name__} layers"):
            loraplex.adapt(nn.Sequential(layer), case.method, targets=["0"], **case.options)
        return
    model = loraplex.adapt(nn.Sequential(layer).eval(), case.method, targets=["0"], **case.options)
    perturb(model)
    a = model[0]
    x = layer_input(a)
    if case.weight_update:
        torch.testing.assert_close(a(x), with_weight(a, x, a.delta_weight()), **tol(case))
    else:
        assert torch.isfinite(a(x)).all()


@torch.no_grad()
def delta_with(a: Adapter, keep: torch.Tensor) -> torch.Tensor:
    """``delta_weight()`` of a copy of ``a`` whose rank components not in ``keep`` (a bool mask) are zeroed."""
    b = copy.deepcopy(a)
    for name, axis in b.rank_axes().items():
        p = b.get_parameter(name)
        p.mul_(keep.to(p.dtype).view([-1 if d == axis else 1 for d in range(p.dim())]))
    return b.delta_weight()


def test_rank_axes_split_delta_weight(case: Case) -> None:
    """``rank_axes()`` (the allocators' axes): one length ``r``; ``ΔW = ΔW(k zeroed) + ΔW(only k)`` for each ``k``."""
    a = METHODS[case.method](nn.Linear(*case.layer), **case.options).double().eval()
    perturb(nn.Sequential(a))
    axes = a.rank_axes()
    lengths = {a.get_parameter(n).shape[axis] for n, axis in axes.items()}
    assert len(lengths) == (1 if axes else 0)
    if axes:
        r = lengths.pop()
        full = a.delta_weight().detach()
        parts = []
        for k in range(r):
            only = torch.arange(r) == k
            parts.append(delta_with(a, only))
            torch.testing.assert_close(delta_with(a, ~only) + parts[-1], full, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sum(parts), full, rtol=1e-10, atol=1e-12)
