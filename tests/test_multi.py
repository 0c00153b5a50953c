"""Mixed-adapter batches and hot-swap (issue 11).

Rows of a mixed batch equal the single-adapter outputs; swaps equal fresh loads and do not recompile.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from matrix import CASES, MODELS, Case
from torch import nn

import loraplex
from loraplex.named import enable_adapter_names, hotswap, mixed_batch, prepare_hotswap

MODEL = {m.name: m for m in MODELS}
# One case per method (the first in the matrix): the routing is generic, and the file stays fast.
PER_METHOD = list({c.method: c for c in reversed(CASES)}.values())[::-1]
ATOL = 1e-5


@contextlib.contextmanager
def only(model: nn.Module, name: str | None) -> Iterator[None]:
    """The reference: only adapter ``name`` active on every layer (``None``: ``loraplex.disabled``)."""
    if name is None:
        with loraplex.disabled(model):
            yield
        return
    found = [a for _, a in loraplex.adapters(model)]
    before = [a.active for a in found]
    for a in found:
        a.active = a.name == name
    try:
        yield
    finally:
        for a, was in zip(found, before, strict=True):
            a.active = was


@torch.no_grad()
def perturb(model: nn.Module, name: str, seed: int, scale: float = 0.2) -> None:
    """Move adapter ``name``'s parameters away from their init (as matrix.perturb, for one name)."""
    g = torch.Generator().manual_seed(seed)
    for _, a in loraplex.adapters(model):
        if a.name == name:
            for _, p in a.own_parameters():
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def fingerprint(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor]]:
    types = [(n, type(m).__name__) for n, m in model.named_modules()]
    return types, {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model: nn.Module, before: tuple[list[tuple[str, str]], dict[str, torch.Tensor]]) -> None:
    types, state = fingerprint(model)
    assert types == before[0]
    assert state.keys() == before[1].keys()
    for k, v in state.items():
        assert torch.equal(v, before[1][k]), k


def batch_input(spec_name: str, rows: int, seed: int = 1) -> torch.Tensor:
    shape = MODEL[spec_name].input_shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn((rows, *shape[1:]), generator=g)


def two_adapters(case: Case) -> tuple[nn.Module, str]:
    """``case`` as adapter "a" and a LoRA "b" stacked on the same layers, both moved off their init."""
    spec = MODEL["block"] if "block" in case.models else case.specs[0]
    model = loraplex.adapt(spec.make(), case.method, targets=case.targets, name="a", **case.options)
    loraplex.adapt(model, "lora", targets=case.targets, name="b", rank=2, alpha=4)
    perturb(model, "a", seed=3)
    perturb(model, "b", seed=4)
    if case.method == "singlora":  # its ramp u(step) starts at 0: move it off the base
        loraplex.advance(model, 2)
    return model.eval(), spec.name


# ---------------------------------------------------------------------------------------------------------------
# Mixed batches


PISSA = [c for c in CASES if c.options.get("init") == "pissa"]  # its base output adds s B0 A0 back


@pytest.mark.parametrize("mcase", PER_METHOD + PISSA, ids=str)
def test_each_row_equals_its_single_adapter_output(mcase: Case) -> None:
    model, spec = two_adapters(mcase)
    names = ["a", None, "b", "a", "b"]
    x = batch_input(spec, len(names))
    before = fingerprint(model)
    with torch.no_grad():
        plain = model(x)
        with mixed_batch(model, names):
            mixed = model(x)
        refs = {}
        for n in ("a", "b", None):
            with only(model, n):
                refs[n] = model(x)
    assert not torch.allclose(refs["a"], refs["b"]) and not torch.allclose(refs["a"], refs[None])  # the test can fail
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], refs[n][i], rtol=1e-5, atol=ATOL)
    assert_same(model, before)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain, rtol=0, atol=0)


def three_methods() -> nn.Module:
    """A serial bottleneck adapter, DoRA and Bone stacked on the same layers of the tiny transformer block."""
    model = MODEL["block"].make()
    targets = ["query", "value", "up"]
    loraplex.adapt(model, "adapter", targets=targets, name="a", bottleneck=4)
    loraplex.adapt(model, "dora", targets=targets, name="b", rank=2, alpha=4)
    loraplex.adapt(model, "bone", targets=targets, name="c", rank=4)
    for seed, n in enumerate("abc"):
        perturb(model, n, seed=seed + 10)
    return model.eval()


def test_three_non_additive_methods_and_the_base_in_one_batch() -> None:
    model = three_methods()
    names = ["c", None, "a", "b", "c", "a"]
    x = batch_input("block", len(names))
    with torch.no_grad():
        with mixed_batch(model, names):
            mixed = model(x)
        for i, n in enumerate(names):
            with only(model, n):
                ref = model(x)
            torch.testing.assert_close(mixed[i], ref[i], rtol=1e-5, atol=ATOL)
        with mixed_batch(model, ["b"] * len(names)):  # one group: the plain single-adapter path
            with only(model, "b"):
                torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_gradients_of_a_mixed_batch_are_the_sum_over_groups() -> None:
    model = three_methods()
    names = ["a", "b", None, "c", "b"]
    x = batch_input("block", len(names))
    params = {f"{layer}.{a.name}.{k}": p for layer, a in loraplex.adapters(model) for k, p in a.own_parameters()}
    with mixed_batch(model, names):
        model(x).pow(2).sum().backward()
    mixed = {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for k, p in params.items()}
    model.zero_grad(set_to_none=True)
    for n in ("a", "b", "c"):  # the base rows (None) have no trainable parameter
        rows = [i for i, m in enumerate(names) if m == n]
        with only(model, n):
            model(x[rows]).pow(2).sum().backward()  # accumulates
    assert any(v.abs().sum() > 0 for v in mixed.values())
    for k, p in params.items():
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(mixed[k], ref, rtol=1e-4, atol=1e-5, msg=k)


def tiny_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_tiny_bert_rows_are_sequences() -> None:
    model = tiny_bert()
    loraplex.adapt(model, "lora", targets=["query", "value"], name="a", rank=2)
    loraplex.adapt(model, "dora", targets=["query", "value", "dense"], name="b", rank=2)
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # padding stays per row
    names = ["a", "b", None, "a"]
    before = fingerprint(model)
    with torch.no_grad():
        with mixed_batch(model, names):
            mixed = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for i, n in enumerate(names):
            with only(model, n):
                ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(mixed[i], ref[i], rtol=1e-5, atol=ATOL)
    assert_same(model, before)


def test_bad_names_and_rows_are_clear_errors_and_leave_no_trace() -> None:
    model = three_methods()
    before = fingerprint(model)
    with pytest.raises(
        ValueError, match=r"'z', which is not an adapter of the model; its adapters are \['a', 'b', 'c'\]"
    ):
        with mixed_batch(model, ["a", "z"]):
            pass
    with pytest.raises(ValueError, match=r"names='a' must be a non-empty list"):
        with mixed_batch(model, "a"):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match=r"names=\[\] must be a non-empty list"):
        with mixed_batch(model, []):
            pass
    with pytest.raises(
        ValueError, match=r"layer '.*' got an input of shape \(3, 7, 16\), whose dim 0 is not .* len\(names\)=2"
    ):
        with mixed_batch(model, ["a", "b"]):
            model(batch_input("block", 3))
    with pytest.raises(ValueError, match="cannot be nested"):
        with mixed_batch(model, ["a"]), mixed_batch(model, ["b"]):
            pass
    with pytest.raises(RuntimeError, match="boom"):  # any exception in the block: the stacks are put back
        with mixed_batch(model, ["a", "b"]):
            raise RuntimeError("boom")
    assert_same(model, before)
    assert all(a.active for _, a in loraplex.adapters(model))


def test_adapter_names_keyword_through_hooks() -> None:
    model = three_methods()
    names = ["b", None, "c"]
    x = batch_input("block", 3)
    before = fingerprint(model)
    handle = enable_adapter_names(model)
    assert enable_adapter_names(model) is handle
    with torch.no_grad():
        with mixed_batch(model, names):
            want = model(x)
        torch.testing.assert_close(model(x, adapter_names=names), want, rtol=0, atol=0)
        with pytest.raises(ValueError, match="dim 0 is not"):
            model(batch_input("block", 2), adapter_names=names)
        assert_same(model, before)  # left by the always_call hook after the error
        plain = model(x)  # no keyword: untouched
    handle.remove()
    with pytest.raises(TypeError):
        model(x, adapter_names=names)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Hot-swap


def save_adapter(
    tmp: Path, tag: str, method: str, seed: int, targets: object = "all-linear", **options: object
) -> Path:
    model = loraplex.adapt(MODEL["mlp"].make(), method, targets=targets, **options)
    perturb(model, "default", seed=seed)
    if method == "singlora":  # its ramp u(step) starts at 0; a different step is swapped in too
        loraplex.advance(model, 2)
    return loraplex.save(model, tmp / tag)


def fresh(directory: Path) -> nn.Module:
    return loraplex.load(MODEL["mlp"].make(), directory).eval()


SWAPPABLE = [c for c in PER_METHOD if "mlp" in c.models]


@pytest.mark.parametrize("scase", SWAPPABLE, ids=str)
def test_same_shapes_swap_equals_a_fresh_load(scase: Case, tmp_path: Path) -> None:
    case = scase
    model = loraplex.adapt(MODEL["mlp"].make(), case.method, targets=case.targets, **case.options).eval()
    perturb(model, "default", seed=1)
    other = save_adapter(tmp_path, "b", case.method, 2, case.targets, **case.options)
    x = batch_input("mlp", 5)
    with torch.no_grad():
        old = model(x)
        params = {k: v.data_ptr() for k, v in model.state_dict().items()}
        hotswap(model, other)
        want = fresh(other)(x)
        assert not torch.allclose(old, want)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=ATOL)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == params  # written in place


@pytest.mark.parametrize("method", ["lora", "dora", "bora"])
def test_padded_rank_and_folded_scale_equal_fresh_loads(method: str, tmp_path: Path) -> None:
    model = loraplex.adapt(MODEL["mlp"].make(), method, rank=4, alpha=8).eval()
    perturb(model, "default", seed=1)
    x = batch_input("mlp", 5)
    with torch.no_grad():
        before = model(x)
        prepare_hotswap(model, 8)
        torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)  # padding changes nothing
        assert all(a.A.shape[0] == 8 and a.B.shape[1] == 8 for _, a in loraplex.adapters(model))  # type: ignore[union-attr]
        torch.testing.assert_close(fresh(loraplex.save(model, tmp_path / "padded"))(x), before, rtol=1e-6, atol=1e-6)
        for tag, options in {
            "same": {"rank": 8, "alpha": 16},
            "smaller": {"rank": 2, "alpha": 3},
            "rslora": {"rank": 3, "alpha": 5, "rslora": True, "init": "gaussian"},
        }.items():
            d = save_adapter(tmp_path, tag, method, len(tag), **options)
            hotswap(model, d)
            torch.testing.assert_close(model(x), fresh(d)(x), rtol=1e-5, atol=ATOL)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    return [a for _, a in loraplex.adapters(model)]


# Dynamo itself instantiates the autograd.Function it traces (torch 2.13) and warns about it.
@pytest.mark.filterwarnings("ignore:.*should not be instantiated.*:DeprecationWarning")
def test_compiled_model_does_not_recompile_across_three_swaps(tmp_path: Path) -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = loraplex.adapt(MODEL["mlp"].make(), "lora", rank=4, alpha=8).eval()
    perturb(model, "default", seed=1)
    prepare_hotswap(model, 8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = batch_input("mlp", 5)
    swaps = [
        save_adapter(tmp_path, "same-rank", "lora", 2, rank=4, alpha=8),
        save_adapter(tmp_path, "rank2", "lora", 3, rank=2, alpha=3),
        save_adapter(tmp_path, "rank8", "lora", 4, rank=8, alpha=2, rslora=True),
    ]
    with torch.no_grad():
        compiled(x)
        for d in swaps:
            hotswap(model, d)
            torch.testing.assert_close(compiled(x), fresh(d)(x), rtol=1e-5, atol=ATOL)
        assert counter.frame_count == 1
        # The counter can fail: a Python-float scale change, or fresh modules from a plain load, recompile.
        a = lora_layers(model)[0]
        a.scale = a.scale * 2  # type: ignore[operator]
        compiled(x)
        assert counter.frame_count == 2
        loraplex.unload(model)
        loraplex.load(model, swaps[0])
        torch.testing.assert_close(compiled(x), fresh(swaps[0])(x), rtol=1e-5, atol=ATOL)
        assert counter.frame_count == 3
    torch._dynamo.reset()


def test_refusals_leave_the_model_unchanged(tmp_path: Path) -> None:
    model = loraplex.adapt(MODEL["mlp"].make(), "lora", rank=4, alpha=8).eval()
    perturb(model, "default", seed=1)
    prepare_hotswap(model, 6)
    before = fingerprint(model)
    cases = {
        r"'dora' adapter saved but 'lora'": save_adapter(tmp_path, "dora", "dora", 2, rank=4),
        r"other layers.*not saved \['fc2'\]": save_adapter(tmp_path, "fewer", "lora", 2, ["fc1"], rank=4),
        r"tensor 'A' has shape \(8, 12\).*\(6, 12\).*prepare_hotswap": save_adapter(tmp_path, "big", "lora", 2, rank=8),
    }
    for pattern, d in cases.items():
        with pytest.raises(ValueError, match=pattern):
            hotswap(model, d)
        assert_same(model, before)
    with pytest.raises(ValueError, match=r"name='x' is not an adapter of the model; its adapters are \['default'\]"):
        hotswap(model, cases[r"'dora' adapter saved but 'lora'"], name="x")
    loha = loraplex.adapt(MODEL["mlp"].make(), "loha", rank=4)
    loha_before = fingerprint(loha)
    with pytest.raises(ValueError, match=r"option rank=2 differs from the model's 4"):  # not a paddable method
        hotswap(loha, save_adapter(tmp_path, "loha2", "loha", 2, rank=2))
    with pytest.raises(ValueError, match="only lora, dora and bora"):
        prepare_hotswap(loha, 8)
    assert_same(loha, loha_before)
    with pytest.raises(ValueError, match=r"max_rank=2 must be an integer >= the rank 6"):
        prepare_hotswap(model, 2)
    pissa = loraplex.adapt(MODEL["mlp"].make(), "lora", rank=2, init="pissa")
    with pytest.raises(ValueError, match="keeps its residual"):
        hotswap(pissa, save_adapter(tmp_path, "pissa", "lora", 2, rank=2, init="pissa"))
    assert_same(model, before)


def test_swap_picks_a_named_source(tmp_path: Path) -> None:
    model = loraplex.adapt(MODEL["mlp"].make(), "lora", rank=2, name="a").eval()
    loraplex.adapt(model, "lora", rank=2, name="b")
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    both = loraplex.save(model, tmp_path / "both")
    x = batch_input("mlp", 3)
    target = copy.deepcopy(model)
    perturb(target, "a", seed=7)
    other = loraplex.adapt(MODEL["mlp"].make(), "lora", rank=2, name="c")
    with pytest.raises(ValueError, match=r"holds adapters \['a', 'b'\] and none is called name='c': pass source="):
        hotswap(other, both, name="c")
    with torch.no_grad():
        hotswap(target, both, name="a")  # the saved "a" by default
        torch.testing.assert_close(target(x), model(x), rtol=0, atol=0)
        hotswap(target, both, name="a", source="b")  # now "a" holds b's weights
        with only(target, "a"):
            got = target(x)
        with only(model, "b"):
            want = model(x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
