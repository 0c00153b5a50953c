"""LoRD one-shot compression: Eckart–Young, rank selection, activation-aware PCA, save / load, LoRD + LoRA."""

from __future__ import annotations

import copy
import itertools
import json
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from slices import write_slice
from torch import nn

import loraplex
from loraplex.compression import (
    LowRankConv2d,
    LowRankLinear,
    allocate,
    compress,
    load_compressed,
    plan,
    save_compressed,
)
from loraplex.compression.allocate import DENSE, LayerSpectrum, by_energy, by_ratio, total_error
from loraplex.compression.lord import randomized_factors, weight_energies


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 24))


def truncated(w: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense re-derivation with numpy: ``W_k`` and the singular values."""
    u, s, vt = np.linalg.svd(w.detach().double().numpy(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k], s


@settings(max_examples=25, deadline=None)
@given(out=st.integers(2, 20), inp=st.integers(2, 20), seed=st.integers(0, 99), data=st.data())
def test_factorised_layer_is_the_truncated_svd(out: int, inp: int, seed: int, data: st.DataObject) -> None:
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out).double()
    k = data.draw(st.integers(1, min(out, inp)))
    layer = LowRankLinear.from_linear(lin, k)
    wk, s = truncated(lin.weight, k)
    w = layer.dense_weight().detach().numpy()
    np.testing.assert_allclose(w, wk, atol=1e-10)
    # Eckart–Young: the Frobenius error is the spectral tail, the spectral error is sigma_{k+1}
    diff = lin.weight.detach().numpy() - w
    assert np.linalg.norm(diff) == pytest.approx(np.sqrt((s[k:] ** 2).sum()), abs=1e-9)
    assert np.linalg.norm(diff, 2) == pytest.approx(s[k] if k < len(s) else 0.0, abs=1e-9)
    # the two factors share the singular values evenly
    np.testing.assert_allclose(layer.up.weight.norm(dim=0).detach().numpy(), np.sqrt(s[:k]), rtol=1e-9)
    np.testing.assert_allclose(layer.down.weight.norm(dim=1).detach().numpy(), np.sqrt(s[:k]), rtol=1e-9)
    x = torch.randn(3, inp, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ torch.from_numpy(wk).T + lin.bias)


def test_conv_factorisation_uses_the_channel_scheme() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1).double()
    low = LowRankConv2d.from_conv(conv, 5)
    wk, _ = truncated(conv.weight.reshape(8, -1), 5)
    np.testing.assert_allclose(low.dense_weight().detach().reshape(8, -1).numpy(), wk, atol=1e-10)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    ref = nn.functional.conv2d(x, torch.from_numpy(wk).reshape(8, 3, 3, 3), conv.bias, stride=2, padding=1)
    torch.testing.assert_close(low(x), ref)
    full = LowRankConv2d.from_conv(conv, 8)
    torch.testing.assert_close(full(x), conv(x))
    with pytest.raises(ValueError, match="groups=2 must be 1"):
        LowRankConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), 2)


def test_rank_outside_the_layer_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"rank=9 must be an integer in \[1, min\(out, in\)\] = \[1, 8\]"):
        LowRankLinear.from_linear(nn.Linear(8, 12), 9)


def test_randomized_svd_matches_the_exact_truncation() -> None:
    torch.manual_seed(0)
    w = torch.randn(200, 60) @ torch.diag(torch.logspace(0, -3, 60)) @ torch.linalg.qr(torch.randn(60, 60))[0]
    up, down = randomized_factors(w, 6)
    wk, s = truncated(w, 6)
    exact = np.linalg.norm(w.double().numpy() - wk)
    approx = float(torch.linalg.norm(w.double() - up @ down))
    assert approx == pytest.approx(exact, rel=1e-6)


def test_weight_energies_are_squared_singular_values() -> None:
    w = torch.randn(30, 11)
    np.testing.assert_allclose(weight_energies(w).numpy(), np.linalg.svd(w.double().numpy())[1] ** 2, rtol=1e-9)
    np.testing.assert_allclose(weight_energies(w.T).numpy(), np.linalg.svd(w.double().numpy())[1] ** 2, rtol=1e-9)


def spectra(seed: int, shapes: list[tuple[int, int]]) -> list[LayerSpectrum]:
    rng = np.random.default_rng(seed)
    out = []
    for i, (o, n) in enumerate(shapes):
        e = np.sort(rng.exponential(size=min(o, n)) ** 3)[::-1]
        out.append(LayerSpectrum(f"l{i}", n, o, e))
    return out


@settings(max_examples=40, deadline=None)
@given(energy=st.floats(0.05, 1.0), seed=st.integers(0, 999))
def test_energy_selection_meets_its_target(energy: float, seed: int) -> None:
    layers = spectra(seed, [(40, 30), (64, 16), (20, 50)])
    for s in layers:
        k = by_energy([s], energy)[s.name]
        cum = np.cumsum(s.energies) / s.energies.sum()
        k_true = int(np.argmax(cum >= energy * (1 - 1e-12)) + 1)  # smallest k reaching the target
        assert k == (k_true if k_true <= s.max_rank else DENSE)


def brute_force(layers: list[LayerSpectrum], budget: float) -> float:
    """The least total relative error over every rank assignment that fits the budget."""
    best = np.inf
    options = [[DENSE, *range(1, s.max_rank + 1)] for s in layers]
    errs = [s.relative_errors() for s in layers]
    for combo in itertools.product(*options):
        size = sum(s.params(k) for s, k in zip(layers, combo, strict=True))
        if size <= budget:
            err = sum(0.0 if k == DENSE else e[k] for e, k in zip(errs, combo, strict=True))
            best = min(best, err)
    return best


@settings(max_examples=40, deadline=None)
@given(ratio=st.floats(0.3, 1.0), seed=st.integers(0, 999), exact=st.booleans())
def test_ratio_selection_fits_and_is_optimal(ratio: float, seed: int, exact: bool) -> None:
    layers = spectra(seed, [(12, 10), (16, 6), (9, 14)])
    total = sum(s.dense_params for s in layers)
    # exact=False: the Lagrangian solver, used for tables too large to solve exactly
    with mock.patch.object(allocate, "EXACT_LIMIT", allocate.EXACT_LIMIT if exact else 0):
        ranks = by_ratio(layers, ratio)
    size = sum(s.params(ranks[s.name]) for s in layers)
    assert size <= ratio * total
    err = total_error(layers, ranks)
    if exact:  # the dynamic programme is the exhaustive optimum
        assert err == pytest.approx(brute_force(layers, ratio * total), abs=1e-12)
    else:  # never worse than any single rank for all layers that fits
        for k in range(1, min(s.max_rank for s in layers) + 1):
            if sum(s.params(k) for s in layers) <= ratio * total:
                assert err <= total_error(layers, {s.name: k for s in layers}) + 1e-12


@pytest.mark.parametrize(("seed", "ratio"), [(469, 0.8), (616, 0.8), (791, 0.8), (819, 0.4375)])
def test_lagrangian_fallback_is_never_worse_than_a_uniform_rank(seed: int, ratio: float) -> None:
    """Cases where the relaxation alone landed behind a uniform rank (hypothesis found one in CI's runs)."""
    layers = spectra(seed, [(12, 10), (16, 6), (9, 14)])
    total = sum(s.dense_params for s in layers)
    with mock.patch.object(allocate, "EXACT_LIMIT", 0):
        err = total_error(layers, by_ratio(layers, ratio))
    for k in range(1, min(s.max_rank for s in layers) + 1):
        if sum(s.params(k) for s in layers) <= ratio * total:
            assert err <= total_error(layers, {s.name: k for s in layers}) + 1e-12


def test_ratio_minimises_the_sum_of_the_reported_relative_errors() -> None:
    # issue 18: the solver minimised Σ tail/total (squared relative errors) while plan() reports and the README
    # promises Σ ||W - Ŵ||_F / ||W||_F. The objective is computed here from the energies, not via the allocator.
    def rel(s: LayerSpectrum, k: int) -> float:
        return 0.0 if k == DENSE else float(np.sqrt(s.energies[k:].sum() / s.energies.sum()))

    for seed in range(12):
        layers = spectra(seed, [(12, 10), (16, 6), (9, 14)])
        budget = 0.45 * sum(s.dense_params for s in layers)
        best = np.inf
        for combo in itertools.product(*[[DENSE, *range(1, s.max_rank + 1)] for s in layers]):
            if sum(s.params(k) for s, k in zip(layers, combo, strict=True)) <= budget:
                best = min(best, sum(rel(s, k) for s, k in zip(layers, combo, strict=True)))
        for limit in (allocate.EXACT_LIMIT, 0):  # the dynamic programme is optimal, the Lagrangian never far off
            with mock.patch.object(allocate, "EXACT_LIMIT", limit):
                ranks = by_ratio(layers, 0.45)
            got = sum(rel(s, ranks[s.name]) for s in layers)
            if limit:  # the old objective (squares) missed this optimum for 5 of the 12 seeds, by up to 17 %
                assert got == pytest.approx(best, abs=1e-12)
            else:
                assert got <= best * 1.1 + 1e-12
            assert got == pytest.approx(total_error(layers, ranks), abs=1e-12)


def test_plan_reports_the_errors_the_allocator_minimised() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 16), nn.Linear(16, 9))
    layers = [
        LayerSpectrum(n, m.in_features, m.out_features, weight_energies(m.weight).numpy())
        for n, m in model.named_children()
    ]
    ranks = by_ratio(layers, 0.5)
    choices = plan(model, ratio=0.5)
    assert {c.name: c.rank for c in choices} == ranks
    assert sum(c.relative_error for c in choices) == pytest.approx(total_error(layers, ranks), rel=1e-6)


def test_ratio_below_the_smallest_factorisation_is_a_clear_error() -> None:
    layers = spectra(0, [(12, 10)])
    with pytest.raises(ValueError, match=r"ratio=0.01 keeps .* below the smallest factorisation"):
        by_ratio(layers, 0.01)
    with pytest.raises(ValueError, match=r"ratio=1.5 must be a number in \(0, 1\]"):
        by_ratio(layers, 1.5)


def test_compress_selects_and_reports_every_layer() -> None:
    model = mlp()
    ref = copy.deepcopy(model)
    choices = plan(model, ratio=0.5)
    assert [c.name for c in choices] == ["0", "2", "4"]
    before = sum(c.params_before for c in choices)
    after = sum(c.params_after for c in choices)
    assert after <= 0.5 * before
    for c in choices:
        layer = model.get_submodule(c.name)
        w = ref.get_submodule(c.name).weight
        if c.rank == DENSE:
            assert isinstance(layer, nn.Linear) and c.relative_error == 0
            continue
        assert isinstance(layer, LowRankLinear) and layer.rank == c.rank
        wk, s = truncated(w, c.rank)
        np.testing.assert_allclose(layer.dense_weight().detach().double().numpy(), wk, atol=1e-5)
        tail = np.sqrt((s[c.rank :] ** 2).sum() / (s**2).sum())
        assert c.relative_error == pytest.approx(tail, rel=1e-4)
        assert c.params_after == c.rank * (c.in_features + c.out_features)


def test_rank_beyond_break_even_keeps_the_layer() -> None:
    model = mlp()
    choices = plan(model, rank=14)  # 24x40: break-even 15 (saves); 40x32: 17 (saves); 32x24: 13 (kept)
    assert [c.rank for c in choices] == [14, 14, DENSE]
    assert isinstance(model[4], nn.Linear)
    model = mlp()
    choices = plan(model, rank={"2": 3})
    assert [c.rank for c in choices] == [DENSE, 3, DENSE]


def test_transformers_conv1d_layers_compress_too() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(30, 20), nn.ReLU(), Conv1D(8, 30))  # Conv1D(out, in): weight (in, out)
    ref = copy.deepcopy(model)
    compress(model, targets=["0"], rank=4)
    wk, _ = truncated(ref[0].weight.T, 4)
    x = torch.randn(5, 20)
    expected = x @ torch.from_numpy(wk).float().T + ref[0].bias
    torch.testing.assert_close(model[0](x), expected, atol=1e-5, rtol=1e-5)


def calibration(seed: int = 1, batches: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(24, 24, generator=g) * torch.logspace(0, -2, 24)  # anisotropic inputs
    return [torch.randn(64, 24, generator=g) @ mix + 0.5 for _ in range(batches)]


def test_activation_aware_error_is_the_output_eigenvalue_tail_and_beats_weight_svd() -> None:
    data = [b.double() for b in calibration()]
    x = torch.cat(data)
    model = nn.Sequential(nn.Linear(24, 40)).double()
    torch.manual_seed(3)
    nn.init.normal_(model[0].bias)
    ref = copy.deepcopy(model)
    choices = plan(model, rank=5, targets=["0"], method="activation", calibration=data)
    y, y_hat = ref(x).detach(), model(x).detach()
    # dense re-derivation: eigenvalues of the output covariance (population, 1/n)
    yc = y - y.mean(0)
    lam = np.sort(np.linalg.eigvalsh((yc.T @ yc / len(y)).numpy()))[::-1]
    mse = ((y - y_hat) ** 2).sum(1).mean().item()
    assert mse == pytest.approx(lam[5:].sum(), rel=1e-6)
    assert choices[0].relative_error == pytest.approx(np.sqrt(lam[5:].sum() / lam.sum()), rel=1e-6)
    svd_model = compress(copy.deepcopy(ref), rank=5, targets=["0"])
    svd_mse = ((y - svd_model(x).detach()) ** 2).sum(1).mean().item()
    assert mse < svd_mse


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="exactly one of rank, energy, ratio .got rank, ratio"):
        compress(mlp(), rank=2, ratio=0.5)
    with pytest.raises(ValueError, match="exactly one of rank, energy, ratio .got none"):
        compress(mlp())
    with pytest.raises(ValueError, match="method='qr' must be one of svd, activation"):
        compress(mlp(), rank=2, method="qr")
    with pytest.raises(ValueError, match='method="activation" needs calibration'):
        compress(mlp(), rank=2, method="activation")
    with pytest.raises(ValueError, match=r"energy=0 must be a number in \(0, 1\]"):
        compress(mlp(), energy=0)
    with pytest.raises(ValueError, match="rank=0 for layer '0' must be a positive integer"):
        compress(mlp(), rank=0)
    with pytest.raises(ValueError, match="calibration never reached"):
        compress(mlp(), rank=2, method="activation", calibration=[])


def test_save_load_roundtrip_and_no_pickle(tmp_path) -> None:
    model = mlp()
    compress(model, ratio=0.6)
    save_compressed(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compression.json", "model.safetensors"]
    fresh = mlp(seed=5)
    loaded = load_compressed(tmp_path, fresh)
    x = torch.randn(4, 24)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    spec = json.loads((tmp_path / "compression.json").read_text())
    name = next(iter(spec["layers"]))  # a factorised layer (which ones depends on the allocation)
    spec["layers"][name]["rank"] = "2"
    (tmp_path / "compression.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=f"layer '{name}' has a malformed entry"):
        load_compressed(tmp_path, mlp())
    spec["layers"] = {"9": {"kind": "lowrank", "in": 24, "out": 40, "rank": 2, "bias": True}}
    (tmp_path / "compression.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="layer '9' is not in the Sequential given"):
        load_compressed(tmp_path, mlp())
    spec["model_class"] = "os.system"
    (tmp_path / "compression.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="model_class='os.system' is not a transformers model class"):
        load_compressed(tmp_path)


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    return BertModel(cfg).eval()


def test_huggingface_model_roundtrip_and_classifier_wrapper(tmp_path) -> None:
    from transformers import AutoConfig, BertForSequenceClassification

    model = tiny_bert()
    compress(model, ratio=0.7)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    save_compressed(model, tmp_path)
    ids = torch.randint(0, 50, (2, 7))
    loaded = load_compressed(tmp_path).eval()
    assert type(loaded).__name__ == "BertModel"
    torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    config = AutoConfig.from_pretrained(tmp_path, num_labels=3)
    clf = load_compressed(tmp_path, BertForSequenceClassification(config)).eval()
    torch.testing.assert_close(clf.bert(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


def test_lord_then_lora_trains_the_compressed_model() -> None:
    model = mlp()
    compress(model, ratio=0.6)
    adapted = loraplex.adapt(model, "lora", rank=2, targets="all-linear")
    names = [n for n, _ in loraplex.adapters(adapted)]
    assert any(n.endswith(".down") for n in names) and any(n.endswith(".up") for n in names)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    x, y = torch.randn(16, 24), torch.randn(16, 24)
    losses = []
    for _ in range(5):
        loss = nn.functional.mse_loss(adapted(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        before = adapted(x)
        merged = loraplex.merge(adapted)
        assert not loraplex.adapters(merged)
        torch.testing.assert_close(merged(x), before, atol=1e-5, rtol=1e-5)


@pytest.fixture
def small(tmp_path):
    """40 training rows and 24 test rows (of labels the training rows have) of the embedded data, as JSONL."""
    return write_slice(tmp_path, 40, 24, seen_labels=True)


def test_cli_compress_then_finetune_the_compressed_model(small, tmp_path, monkeypatch, capsys) -> None:
    from loraplex.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "lord"
    args = ["compress", "minilm", "--ratio", "0.8", "--method", "activation", "--out", str(out)]
    assert main([*args, "--data", str(small), "--calibration-rows", "16", "--max-length", "24"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["target_params_after"] <= 0.8 * report["target_params_before"]
    assert report["params_after"] < report["params_before"] and report["layers_factorised"] > 0
    assert 0 < report["cosine"] <= 1 and 0 <= report["accuracy_compressed"] <= 1
    assert "load_compressed" in capsys.readouterr().out
    assert {"compression.json", "model.safetensors", "tokenizer.json", "report.md"} <= {p.name for p in out.iterdir()}
    run = tmp_path / "ft"
    ft = ["finetune", "--model", str(out), "--data", str(small), "--epochs", "1", "--batch-size", "20"]
    assert main([*ft, "--max-length", "24", "--method", "lora", "--rank", "2", "--out", str(run), "--no-progress"]) == 0
    spec = json.loads((run / "adapter.json").read_text())
    assert any(name.endswith(".down") for entry in spec["adapters"] for name in entry["layers"])
    assert main(["compress", "minilm", "--ratio", "0.001", "--out", str(tmp_path / "x"), "--data", str(small)]) == 2
    assert "below the smallest factorisation" in capsys.readouterr().err


def test_inspect_reads_a_compressed_folder(tmp_path, monkeypatch, capsys) -> None:
    from loraplex.analysis.report import load_model
    from loraplex.cli import main

    model = tiny_bert()
    compress(model, rank=4, targets=".*intermediate.dense")
    save_compressed(model, tmp_path)
    loaded = load_model(tmp_path)
    assert isinstance(loaded.encoder.layer[0].intermediate.dense, LowRankLinear)
    assert main(["inspect", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if "intermediate.dense" in line]
    assert len(rows) == 2 and all("low-rank" in r and "| 4 |" in r for r in rows)


@pytest.mark.parametrize("method", ["kronecker", "hadamard"])
def test_structured_compressors_fit_save_and_load(method: str, tmp_path) -> None:
    from loraplex.decompose.layers import LAYERS

    model = mlp()
    ref = copy.deepcopy(model)
    choices = plan(model, ratio=0.4, method=method)
    for c in choices:
        layer = model.get_submodule(c.name)
        assert c.kind == method and isinstance(layer, LAYERS[method])
        assert c.params_after == LAYERS[method].num_params(c.in_features, c.out_features, **c.options)
        assert c.params_after <= 0.4 * c.params_before
        w = ref.get_submodule(c.name).weight.detach().double()
        err = torch.linalg.norm(w - layer.dense_weight().detach().double()) / torch.linalg.norm(w)
        assert c.relative_error == pytest.approx(float(err), rel=1e-6) and 0 < c.relative_error < 1
    save_compressed(model, tmp_path)
    loaded = load_compressed(tmp_path, mlp(seed=9))
    x = torch.randn(3, 24)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=f'method="{method}" takes ratio='):
        compress(mlp(), rank=2, method=method)


def test_kronecker_compression_recovers_a_planted_kronecker_weight() -> None:
    model = nn.Sequential(nn.Linear(24, 40))
    torch.manual_seed(0)
    with torch.no_grad():
        model[0].weight.copy_(torch.kron(torch.randn(5, 4), torch.randn(8, 6)))  # 40x24 = (5x4) ⊗ (8x6)
    choices = plan(model, ratio=0.1, method="kronecker")
    assert choices[0].relative_error < 1e-6


def test_uniform_allocation_gives_every_layer_the_same_fraction() -> None:
    model = mlp()
    choices = plan(model, ratio=0.3, allocation="uniform")
    for c in choices:  # the largest rank within 30 % of each layer's own weights
        assert c.rank == int(0.3 * c.params_before) // (c.in_features + c.out_features)
        assert c.params_after <= 0.3 * c.params_before
    with pytest.raises(ValueError, match="allocation='even' must be one of error, uniform"):
        compress(mlp(), ratio=0.5, allocation="even")
    with pytest.raises(ValueError, match="ratio=0.01 leaves layer '0' .40x24. no rank"):
        compress(mlp(), ratio=0.01, allocation="uniform")


def test_top_level_names() -> None:
    assert loraplex.compress is compress and loraplex.load_compressed is load_compressed
    assert loraplex.save_compressed is save_compressed


# ---------------------------------------------------------------- non-finite inputs and bad ranks (issue 18)


def snapshot(model: nn.Module) -> tuple[list[type], dict[str, torch.Tensor]]:
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, snap: tuple[list[type], dict[str, torch.Tensor]]) -> None:
    types, state = snap
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(now[k], v, rtol=0, atol=0, equal_nan=True)


def poisoned(value: float) -> nn.Sequential:
    """``mlp()`` with 3 entries of the middle layer's weight set to ``value``: layer '0' would change first."""
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, :3] = value
    return model


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rank": 4},
        {"rank": 4, "solver": "randomized"},
        {"rank": {"0": 3, "2": 3}},
        {"ratio": 0.5},
        {"energy": 0.9},
        {"rank": 4, "method": "activation", "calibration": calibration()},
        {"ratio": 0.5, "method": "kronecker"},
        {"ratio": 0.5, "method": "hadamard"},
    ],
    ids=["rank", "randomized", "rank-dict", "ratio", "energy", "activation", "kronecker", "hadamard"],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_refused_naming_the_layer_before_any_change(kwargs: dict, value: float) -> None:
    """Before: torch._LinAlgError from svd / eigh (naming no layer), a silent NaN model (rank with inf), or the
    structured fit's "W has non-finite entries" after layer '0' was already replaced."""
    model = poisoned(value)
    snap = snapshot(model)
    counts = "3 NaN, 0 inf" if value != value else "0 NaN, 3 inf"
    method = kwargs.get("method", "svd")
    msg = rf"compress: layer '2' has non-finite weights \({counts}\); method=\"{method}\" needs finite values"
    with pytest.raises(ValueError, match=msg):
        compress(model, **kwargs)
    assert_unchanged(model, snap)


def test_non_finite_calibration_data_is_named_as_such() -> None:
    """Before: torch._LinAlgError "linalg.eigh: ... ill-conditioned or has too many repeated eigenvalues"."""
    data = calibration()
    data[2][5, 7] = float("nan")
    model = mlp()
    snap = snapshot(model)
    msg = r"calibration activations reaching layer '0' are non-finite \(1 NaN, 0 inf among 6144 input values\)"
    with pytest.raises(ValueError, match=msg + '.*method="activation" needs finite calibration data'):
        compress(model, rank=4, method="activation", calibration=data)
    assert_unchanged(model, snap)
    data = [b * float("inf") for b in calibration()]
    with pytest.raises(ValueError, match=r"reaching layer '0' are non-finite \(0 NaN, 6144 inf"):
        compress(model, ratio=0.5, method="activation", calibration=data)
    assert_unchanged(model, snap)
    with torch.no_grad():  # finite data, but a non-targeted layer before '2' makes its inputs NaN
        model[0].bias[0] = float("nan")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"calibration activations reaching layer '2' are non-finite \(256 NaN"):
        compress(model, targets=["2", "4"], rank=4, method="activation", calibration=calibration())
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match=r"compress: layer '0' has non-finite bias \(1 NaN, 0 inf\)"):
        compress(model, rank=4, method="activation", calibration=calibration())
    assert_unchanged(model, snap)


def test_rank_minus_one_and_untargeted_rank_names_are_refused() -> None:
    """Before: rank=-1 (the internal DENSE) and a rank dict naming a missing layer silently kept layers dense."""
    model = mlp()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"rank=-1 for layer '0' must be a positive integer"):
        compress(model, rank=-1)
    with pytest.raises(ValueError, match=r"rank=-1 for layer '2' must be a positive integer \(leave a layer out"):
        compress(model, rank={"0": 3, "2": -1})
    with pytest.raises(ValueError, match=r"rank names 1 layer\(s\) that are not targeted .*: '9'; targeted: '0', '2'"):
        compress(model, rank={"0": 3, "9": 4})
    with pytest.raises(ValueError, match=r"not targeted linear layers of the model: '4'; targeted: '0', '2'$"):
        compress(model, targets=["0", "2"], rank={"4": 3})  # a layer of the model, but not targeted
    assert_unchanged(model, snap)


def test_one_registry_of_compression_methods() -> None:
    """Issue 19: ``COMPRESSION_METHODS`` is the one list; ``plan`` checks its declared requirements and the CLI
    offers its names (with their descriptions); the structured ones are ``decompose.LAYERS``'s layers."""
    import argparse

    from loraplex.cli import parser
    from loraplex.compression.lord import COMPRESSION_METHODS, METHODS, SOLVERS, STRUCTURED
    from loraplex.decompose import LAYERS

    assert METHODS == tuple(COMPRESSION_METHODS) == ("svd", "activation", "kronecker", "hadamard")
    assert set(STRUCTURED) == set(LAYERS)
    assert all(m.description and set(m.solvers) <= set(SOLVERS) for m in COMPRESSION_METHODS.values())
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices["compress"]._actions if a.dest == "method")
    assert action.choices is not None and action.help is not None
    assert list(action.choices) == list(COMPRESSION_METHODS)
    assert all(m.description in action.help for m in COMPRESSION_METHODS.values())
    for method, spec in COMPRESSION_METHODS.items():
        if "randomized" not in spec.solvers:
            with pytest.raises(ValueError, match='solver="randomized" applies to method="svd" only'):
                plan(mlp(), ratio=0.5, method=method, solver="randomized", calibration=[torch.zeros(2, 24)])
