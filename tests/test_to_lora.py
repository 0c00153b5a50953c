"""loraplex.to_lora: every weight-update method as a plain LoRA (issue 11), checked against numpy and PEFT."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from matrix import CASES, Case, clone, perturb, tol
from torch import nn

import loraplex
from loraplex.convert import to_lora

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")

LINEAR_MODELS = ("mlp", "block", "odd")
WEIGHT_CASES = [c for c in CASES if c.weight_update and c.specs]  # linear, conv and embedding models
LINEAR_CASES = [c for c in WEIGHT_CASES if c.specs[0].name in LINEAR_MODELS]
FIRST_CASES = [next(c for c in LINEAR_CASES if c.method == m) for m in dict.fromkeys(c.method for c in LINEAR_CASES)]
SPATIAL_CASES = [c for c in WEIGHT_CASES if c.specs[0].name in ("conv", "embed")]


def first(method: str):
    """The matrix's first case of ``method`` (by name: a new case anywhere keeps these tests' cases)."""
    return next(c for c in CASES if c.method == method)


def built(case: Case, seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(base, adapted and perturbed copy, input) on the case's first matrix model."""
    spec = case.specs[0]
    base = spec.make(seed)
    model = loraplex.adapt(clone(base), case.method, targets=case.targets, train=["classifier"], **case.options)
    perturb(model)
    return base, model, spec.input()


def true_deltas(base: nn.Module, model: nn.Module) -> dict[str, np.ndarray]:
    """ΔW of each adapted layer, independently: merged weight of a copy minus the original base weight, as a matrix
    (a convolution's (out, in_channels, *kernel) flattened to (out, in_channels · prod(kernel)); an embedding's
    (num, dim) kept: its singular values and norms are those of the transpose)."""
    merged = loraplex.merge(copy.deepcopy(model))
    names = {n for n, _ in loraplex.adapters(model)}
    out = {}
    for n in names:
        w = merged.get_submodule(n).weight.detach().double() - base.get_submodule(n).weight.detach().double()
        out[n] = w.reshape(w.shape[0], -1).numpy()
    return out


def tail(delta: np.ndarray, k: int) -> float:
    s = np.linalg.svd(delta, compute_uv=False)
    total = float(np.sum(s**2))
    return 0.0 if total == 0 else float(np.sqrt(np.sum(s[k:] ** 2) / total))


def lora_of(model: nn.Module, layer: str) -> loraplex.Adapter:
    (a,) = [a for n, a in loraplex.adapters(model) if n == layer]
    return a


@pytest.mark.parametrize("wcase", WEIGHT_CASES, ids=str)
def test_full_rank_truncation_and_energy_match_numpy(wcase: Case) -> None:
    case = wcase  # not "case": conftest parametrizes that name over every case, non-weight-updates included
    base, model, x = built(case)
    y = model(x)
    deltas = true_deltas(base, model)
    names = {n: a.name for n, a in loraplex.adapters(model)}

    full = clone(model)
    report = to_lora(full, rank=10_000)  # larger than every layer: clamped to min(in, out)
    assert all(a.method == "lora" for _, a in loraplex.adapters(full))
    assert {n: a.name for n, a in loraplex.adapters(full)} == names
    torch.testing.assert_close(full(x), y, **tol(case))
    for c in report.layers:
        assert c.method == case.method and c.rank == min(c.in_features, c.out_features)
        assert c.error < 1e-6
        torch.testing.assert_close(  # relative to the original base weight (PiSSA / OLoRA undone)
            loraplex.adapter.weight_of(lora_of(full, c.layer).root), base.get_submodule(c.layer).weight, **tol(case)
        )

    k = 2
    cut = clone(model)
    report = to_lora(cut, rank=k)
    for c in report.layers:
        want = tail(deltas[c.layer], k)
        assert c.rank == k
        assert c.error == pytest.approx(want, abs=1e-5)
        got = lora_of(cut, c.layer).delta_weight().detach().double()
        got = got.reshape(got.shape[0], -1).numpy()
        actual = np.linalg.norm(deltas[c.layer] - got) / max(np.linalg.norm(deltas[c.layer]), 1e-300)
        assert actual == pytest.approx(want, abs=1e-4)

    energy = 0.8
    chosen = clone(model)
    report = to_lora(chosen, energy=energy)
    for c in report.layers:
        s2 = np.linalg.svd(deltas[c.layer], compute_uv=False) ** 2
        if s2.sum() == 0:  # SingLoRA at step 0 (ramp u(0) = 0): ΔW = 0 keeps the least LoRA, rank 1
            assert c.rank == 1 and c.delta_rank == 0 and c.error == 0.0
            continue
        share = np.cumsum(s2) / s2.sum()
        assert share[c.rank - 1] >= energy - 1e-6  # enough energy at k
        assert c.rank == 1 or share[c.rank - 2] < energy + 1e-6  # and not at k - 1: the least such k
        assert lora_of(chosen, c.layer).rank == c.rank


@pytest.mark.parametrize("wcase", FIRST_CASES, ids=str)
def test_peft_loads_the_converted_model(wcase: Case, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    base, model, x = built(wcase)
    report = to_lora(model, energy=0.9)  # ranks differ between layers: PEFT's rank / alpha patterns
    loraplex.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["classifier"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(report.layers) == len(config["target_modules"])


def test_several_adapters_on_a_layer_become_one_lora_each() -> None:
    """Decision: one LoRA per adapter, same name, same order, same active flag; PiSSA's rewrite undone."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 12), nn.GELU(), nn.Linear(12, 7))
    model = loraplex.adapt(clone(base), "lora", rank=3, init="pissa", name="p")
    loraplex.adapt(model, "dora", rank=2, name="d")  # reads the rewritten W0 - s B0 A0
    loraplex.adapt(model, "loha", rank=2, name="h", targets=["0"])
    perturb(model)
    x = torch.randn(4, 10)
    y = model(x)
    before = {(n, a.name): a.delta_weight().detach().clone() for n, a in loraplex.adapters(model)}
    stacks_before = [(n, a.name) for n, a in loraplex.adapters(model)]
    shift = {n: a.scale * (a.B0 @ a.A0) for n, a in loraplex.adapters(model) if a.name == "p"}
    loraplex.adapters(model)[-1][1].active = False  # the outermost of layer 2 ("d") stays off
    y_off = model(x)
    report = to_lora(model, rank=100)
    assert [(n, a.name) for n, a in loraplex.adapters(model)] == stacks_before
    assert [(c.layer, c.name, c.method) for c in report.layers] == [
        ("0", "p", "lora"),
        ("0", "d", "dora"),
        ("0", "h", "loha"),
        ("2", "p", "lora"),
        ("2", "d", "dora"),
    ]
    assert loraplex.adapters(model)[-1][1].active is False
    torch.testing.assert_close(model(x), y_off, rtol=1e-4, atol=1e-4)
    loraplex.adapters(model)[-1][1].active = True
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-4)
    for n, a in loraplex.adapters(model):
        want = before[(n, a.name)] - (shift[n] if a.name == "p" else 0)  # PiSSA's LoRA: s B A - s B0 A0
        torch.testing.assert_close(a.delta_weight(), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.weight, base.get_submodule(n).weight, rtol=1e-5, atol=1e-5)


def test_zero_delta_keeps_a_trainable_rank_one_lora() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5))
    x = torch.randn(3, 6)
    model = loraplex.adapt(clone(base), "lora", rank=4)  # B = 0: ΔW = 0
    report = to_lora(model, energy=0.5)
    (c,) = report.layers
    assert (c.rank, c.delta_rank, c.error) == (1, 0, 0.0)
    a = lora_of(model, "0")
    assert torch.count_nonzero(a.B) == 0
    torch.testing.assert_close(a.A @ a.A.T, torch.eye(1))
    torch.testing.assert_close(model(x), base(x))
    model(x).sum().backward()
    assert a.B.grad is not None and a.B.grad.abs().sum() > 0  # it can still learn
    again = loraplex.adapt(clone(base), "lora", rank=4)
    assert to_lora(again, rank=3).layers[0].rank == 3 and torch.count_nonzero(lora_of(again, "0").B) == 0


def test_rank_above_layer_size_is_clamped() -> None:
    base, model, x = built(first("lora"))  # mlp: fc1 12 -> 20, fc2 20 -> 18
    report = to_lora(model, rank=19)
    assert {c.layer: c.rank for c in report.layers} == {"fc1": 12, "fc2": 18}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of rank and energy"),
        ({"rank": 2, "energy": 0.5}, "exactly one of rank and energy"),
        ({"rank": 0}, "rank=0 must be an integer >= 1"),
        ({"rank": 2.0}, "rank=2.0 must be an integer >= 1"),
        ({"rank": True}, "rank=True must be an integer >= 1"),
        ({"energy": 0}, r"energy=0 must be a number in \(0, 1\]"),
        ({"energy": 1.5}, r"energy=1.5 must be a number in \(0, 1\]"),
        ({"energy": float("nan")}, r"energy=nan must be a number in \(0, 1\]"),
    ],
)
def test_bad_targets_are_refused(kwargs, message) -> None:
    _, model, _ = built(first("lora"))
    with pytest.raises(ValueError, match=message):
        to_lora(model, **kwargs)


def test_non_weight_updates_are_refused_and_the_model_left_unchanged() -> None:
    torch.manual_seed(0)
    model = loraplex.adapt(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)), "lora", rank=2, init="pissa", targets=["0"])
    loraplex.adapt(model, "adapter", targets=["1"], name="serial")
    perturb(model)
    x = torch.randn(2, 6)
    y = model(x)
    with pytest.raises(ValueError, match="layer '1' carries a 'adapter' adapter"):
        to_lora(model, rank=2)
    assert [a.method for _, a in loraplex.adapters(model)] == ["lora", "adapter"]
    torch.testing.assert_close(model(x), y)
    with pytest.raises(ValueError, match="no adapter"):
        to_lora(nn.Sequential(nn.Linear(3, 3)), rank=1)
    conv = loraplex.adapt(nn.Sequential(nn.Conv2d(3, 3, 1)), "loha", rank=1, targets=["0"])
    conv[0].base = nn.Conv2d(3, 3, 1, groups=3)  # a root no LoRA can adapt (not one (out, in·k) matrix)
    with pytest.raises(ValueError, match="layer '0': Conv2d with groups=3 must have groups=1"):
        to_lora(conv, rank=1)
    assert conv[0].method == "loha"


def test_conv1d_gpt2_converts_and_loads_in_peft(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    base = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    model = loraplex.adapt(copy.deepcopy(base), "dora", rank=4)
    perturb(model)
    y = model(ids).logits
    report = to_lora(model, rank=64)  # c_attn 16 -> 48, c_proj 16 -> 16, c_fc 16 -> 64: full rank 16 each
    assert {c.rank for c in report.layers} == {16}
    assert all(a.transposed for _, a in loraplex.adapters(model))
    torch.testing.assert_close(model(ids).logits, y, rtol=1e-5, atol=1e-5)
    loraplex.export_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(theirs(ids).logits, y, rtol=1e-5, atol=1e-5)


def test_report_summary_and_json() -> None:
    _, model, _ = built(first("dora"))  # on mlp
    report = to_lora(model, rank=2)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["rank"] == 2 and d["energy"] is None and len(d["layers"]) == 2
    assert d["max_error"] == max(c["error"] for c in d["layers"]) == report.max_error
    assert d["params"] == 2 * (12 + 20) + 2 * (20 + 18)
    assert report.summary().startswith("to_lora(rank=2): 2 adapters (dora) -> LoRA ranks 2..2, 140 params")


# ---------------------------------------------------------------------------------------------------------------
# convolutions and embeddings: the same code path, in the (out, in) matrix layout


@pytest.mark.parametrize("scase", SPATIAL_CASES, ids=str)
def test_conv_and_embedding_lora_equals_an_explicit_truncated_update(scase: Case) -> None:
    """The converted LoRA on each root (dilated, strided, padded convs; an embedding with padding_idx) computes the
    root layer run with ``W + ΔW_k``, ``ΔW_k`` built by numpy's SVD of the flattened merged update."""
    from matrix import layer_input, with_weight

    base, model, _ = built(scase)
    deltas = true_deltas(base, model)
    k = 2
    report = to_lora(model, rank=k)
    assert {c.layer for c in report.layers} == set(deltas)
    for c in report.layers:
        a = lora_of(model, c.layer)
        root = base.get_submodule(c.layer)
        conv = isinstance(root, nn.Conv1d | nn.Conv2d)
        assert a.method == "lora"
        assert a.kind == ("conv" if conv else "embedding" if isinstance(root, nn.Embedding) else "linear")
        if conv:
            assert (c.in_features, c.out_features) == (root.weight[0].numel(), root.out_channels)
        u, s, vh = np.linalg.svd(deltas[c.layer], full_matrices=False)
        cut = torch.from_numpy((u[:, :k] * s[:k]) @ vh[:k]).float().reshape(root.weight.shape)
        x = layer_input(root)
        torch.testing.assert_close(a(x), with_weight(root, x, cut), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.delta_weight(), cut, rtol=1e-4, atol=1e-5)


CONV_PEFT = [c for c in SPATIAL_CASES if c.specs[0].name == "conv"] + [
    c for c in SPATIAL_CASES if c.specs[0].name == "embed"
]


@pytest.mark.parametrize("scase", CONV_PEFT, ids=str)
@pytest.mark.parametrize("rank", [None, 2])
def test_conv_and_embedding_loras_load_in_peft(scase: Case, rank: int | None, tmp_path) -> None:
    """PEFT round trip: full rank gives the original outputs, rank 2 the truncated ones (PEFT's conv LoRA has no
    dilation, so the conv model's dilated ``c2`` is left out: it stays unadapted)."""
    peft = pytest.importorskip("peft")
    spec = scase.specs[0]
    targets = ["c1", "c3"] if spec.name == "conv" else list(scase.targets)
    base = spec.make(0)
    model = loraplex.adapt(clone(base), scase.method, targets=targets, train=["classifier"], **scase.options)
    perturb(model)
    model.eval()
    x = spec.input()
    y = model(x)
    report = to_lora(model, rank=rank if rank is not None else 10_000)
    if rank is None:
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    loraplex.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)
    for c in report.layers:
        layer = theirs.base_model.model.get_submodule(c.layer)
        want = lora_of(model, c.layer).delta_weight().detach()
        torch.testing.assert_close(layer.get_delta_weight("default"), want, rtol=1e-5, atol=1e-6)


def test_dilated_conv_converts_but_does_not_export(tmp_path) -> None:
    """Decision kept from LoRA.to_peft: a dilated conv converts (exactly at full rank) and export_peft refuses it."""
    base, model, x = built(next(c for c in SPATIAL_CASES if c.specs[0].name == "conv" and c.method == "loha"))
    y = model(x)
    to_lora(model, rank=10_000)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dilation"):
        loraplex.export_peft(model, tmp_path)


def test_conv_rank_is_clamped_to_the_flattened_matrix() -> None:
    """Conv2d(6, 8, (3, 2)): ΔW is (8, 36), so rank 100 keeps 8; Conv1d(8, 10, 3): (10, 24) keeps 10; c1 (6, 27): 6."""
    _, model, _ = built(next(c for c in SPATIAL_CASES if c.specs[0].name == "conv" and c.method == "lokr"))
    report = to_lora(model, rank=100)
    assert {c.layer: (c.rank, c.in_features, c.out_features) for c in report.layers} == {
        "c1": (6, 27, 6),
        "c2": (8, 36, 8),
        "c3": (10, 24, 10),
    }
    assert report.params == 6 * 33 + 8 * 44 + 10 * 34
