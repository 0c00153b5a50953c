"""LoKr: factorization and factor shapes as PEFT's, parity with HuggingFace PEFT (outputs, ΔW, gradients,
inits, seeded dropouts), checkpoints both ways, Conv1D, half precision and option errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from matrix import MODELS, export_to_peft, import_from_peft, perturb
from torch import nn

import loraplex
from loraplex.adapters.lokr import KronShapes, LoKr, factorization

peft = pytest.importorskip("peft")
from peft.tuners.lokr.layer import factorization as peft_factorization  # noqa: E402

# loraplex.export_peft writes "bias": "none" for every method, a field LyCORIS configs (LoHa, LoKr) lack:
# PEFT ignores it with this warning (peft_io.py, reported).
KEYS = LoKr.peft_keys


def test_factorization_is_peft_s() -> None:
    for dim in [*range(1, 130), 256, 384, 768, 1536, 3072, 4096, 11008]:
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 1000):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


def peft_lokr(layer: nn.Module, **config) -> nn.Module:
    cfg = peft.LoKrConfig(target_modules=["0"], **config)
    return peft.get_peft_model(nn.Sequential(copy.deepcopy(layer)), cfg)


def peft_tensors(theirs: nn.Module) -> dict[str, torch.Tensor]:
    layer = theirs.base_model.model[0]
    return {k: getattr(layer, k)["default"] for k in KEYS if "default" in getattr(layer, k)}


CONFIGS = [
    {},
    {"r": 1, "alpha": 2.0},
    {"r": 2, "decompose_both": True},
    {"r": 3, "alpha": 5.0, "decompose_factor": 4},
    {"r": 12, "decompose_factor": 2, "decompose_both": True},
]
SIZES = [(384, 384), (384, 1536), (12, 20), (13, 29), (16, 40), (40, 16)]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_same_parameter_shapes_and_count_as_peft(config: dict) -> None:
    ours_opts = {
        "rank": config.get("r", 8),
        "decompose_both": config.get("decompose_both", False),
        "decompose_factor": config.get("decompose_factor", -1),
    }
    for d_in, d_out in SIZES:
        layer = nn.Linear(d_in, d_out)
        theirs = {k: tuple(v.shape) for k, v in peft_tensors(peft_lokr(layer, **config)).items()}
        ours = LoKr(layer, **ours_opts)
        assert {k: tuple(v.shape) for k, v in ours.to_peft()[1].items()} == theirs
        assert LoKr.num_params(d_in, d_out, **ours_opts) == sum(math.prod(s) for s in theirs.values())


def test_shapes_for_minilm() -> None:
    assert KronShapes.of(384, 384, 8, False, -1) == KronShapes(16, 24, 16, 24, True, False)
    assert KronShapes.of(384, 1536, 8, False, -1) == KronShapes(32, 48, 16, 24, True, False)
    assert KronShapes.of(384, 384, 12, False, -1).full_w2  # rank >= max(24, 24) / 2: a plain w2
    assert (LoKr.num_params(384, 384), LoKr.num_params(384, 1536)) == (640, 1088)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize(("d_in", "d_out", "rows"), [(384, 1536, 64), (12, 20, 3), (13, 29, 1)])
def test_same_parameters_same_outputs_delta_and_gradients_as_peft(config: dict, d_in: int, d_out: int, rows) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out)
    theirs = peft_lokr(layer, **config).eval()
    options = LoKr.peft_options(theirs.peft_config["default"].to_dict(), peft_tensors(theirs))  # as import reads it
    ours = LoKr(copy.deepcopy(layer), **options).eval()
    perturb(nn.Sequential(ours))
    with torch.no_grad():
        for k, v in ours.to_peft()[1].items():
            peft_tensors(theirs)[k].copy_(v)
    x = torch.randn(rows, d_in)
    y, want = ours(x), theirs(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.delta_weight(), theirs.base_model.model[0].get_delta_weight("default"))
    gy = torch.randn_like(y)
    mine = [p for _, p in ours.own_parameters()]
    got = torch.autograd.grad(y, mine, gy)
    wanted = torch.autograd.grad(want, list(peft_tensors(theirs).values()), gy)
    for u, v in zip(got, wanted, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5 * v.abs().max().item())


@pytest.mark.parametrize(("init", "ours_init"), [(True, "zeros"), (False, "kaiming"), ("lycoris", "lycoris")])
@pytest.mark.parametrize("config", [{}, {"r": 1, "decompose_both": True}], ids=str)
def test_inits_zero_the_same_factors_as_peft(init, ours_init: str, config: dict) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(384, 384)
    theirs = peft_tensors(peft_lokr(layer, init_weights=init, **config))
    options = {"rank": config.get("r", 8), "decompose_both": config.get("decompose_both", False)}
    ours = LoKr(layer, init=ours_init, **options).to_peft()[1]
    for k, v in theirs.items():
        assert bool(ours[k].any()) == bool(v.any()), k
        if v.any():  # both kaiming_uniform(a=sqrt(5)) of the same shape
            bound = 1 / v.shape[1] ** 0.5
            assert 0.8 * bound < ours[k].abs().max() <= bound and 0.8 * bound < v.abs().max() <= bound
    x = torch.randn(3, 384)
    assert torch.equal(LoKr(layer, init=ours_init, **options)(x), layer(x)) == (ours_init != "kaiming")


@pytest.mark.parametrize("scale", [False, True])
def test_seeded_dropouts_in_training_match_peft(scale: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 20)
    drops = {"rank_dropout": 0.4, "module_dropout": 0.3, "rank_dropout_scale": scale}
    theirs = peft_lokr(layer, r=1, init_weights=False, **drops).train()
    ours = LoKr(copy.deepcopy(layer), rank=1, init="kaiming", **drops).train()
    with torch.no_grad():
        for k, v in ours.to_peft()[1].items():
            peft_tensors(theirs)[k].copy_(v)
    x = torch.randn(5, 12)
    skipped = masked = 0
    for seed in range(12):
        torch.manual_seed(seed)
        y = ours(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)
        skipped += torch.equal(y, layer(x))
        masked += (y - layer(x)).abs().sum(0).eq(0).any().item()
    assert skipped and masked


# Checkpoints both ways --------------------------------------------------------------------------------


def test_export_loads_in_peft_and_imports_back(tmp_path) -> None:
    spec = MODELS[1]  # q / k / v / out 16 -> 16, up 16 -> 40, down 40 -> 16
    base = spec.make()
    ours = loraplex.adapt(copy.deepcopy(base), "lokr", targets=["query", "up"], rank=1, alpha=3, train=["classifier"])
    loraplex.adapt(ours, "lokr", targets=["down"], rank=2, alpha=8)
    perturb(ours)
    with torch.no_grad():
        ours.classifier.weight.add_(0.5)
    theirs = export_to_peft(ours, base, tmp_path).eval()
    x = spec.input()
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
    config = theirs.peft_config["default"]
    assert (config.rank_pattern, config.alpha_pattern) == ({"down": 2}, {"down": 8.0})
    back = loraplex.import_peft(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(back(x), ours(x), rtol=1e-5, atol=1e-5)
    assert (back.up.rank, back.up.scale, back.down.rank, back.down.scale) == (1, 3.0, 2, 4.0)


@pytest.mark.parametrize(
    "config",
    [
        {"init_weights": True},
        {"init_weights": False, "rank_dropout": 0.1, "rank_dropout_scale": True},
        {"init_weights": "lycoris", "decompose_factor": 2, "module_dropout": 0.2},
        {"init_weights": True, "decompose_both": True, "r": 2},  # r >= max(out_l, in_m) / 2: w1 stays full
    ],
    ids=str,
)
def test_import_reads_peft_checkpoints_with_patterns(tmp_path, config: dict) -> None:
    spec = MODELS[1]
    base = spec.make()
    config = {"r": 1, "alpha": 6, **config}
    cfg = peft.LoKrConfig(
        **config,
        rank_pattern={"up": 3},
        alpha_pattern={"value": 1},
        target_modules=["query", "value", "up"],
        modules_to_save=["classifier"],
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    ours = import_from_peft(theirs, base, tmp_path / "peft")
    x = spec.input()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    r = config["r"]
    assert (ours.query.rank, ours.query.scale, ours.up.rank, ours.up.scale, ours.value.scale) == (r, 6 / r, 3, 2, 1 / r)
    assert ours.up.options["init"] == {True: "zeros", False: "kaiming", "lycoris": "lycoris"}[config["init_weights"]]
    again = export_to_peft(ours, base, tmp_path / "back")
    torch.testing.assert_close(again(x), theirs(x), rtol=1e-5, atol=1e-5)


# A factored w1 (r = 1, decompose_both) imported from PEFT: test_peft_parity.py, case lokr-both.


def test_conv1d_layers_adapt_but_do_not_export() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = loraplex.adapt(transformers.GPT2LMHeadModel(config).eval(), "lokr", rank=2)
    perturb(model)
    for _, a in loraplex.adapters(model):
        assert a.transposed
        x = torch.randn(3, a.in_features)
        torch.testing.assert_close(a(x), a.base(x) + x @ a.delta_weight().T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Conv1D"):
        loraplex.export_peft(model, "unused")


# Half precision, options ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_models(dtype: torch.dtype) -> None:
    spec = MODELS[1]
    model = loraplex.adapt(spec.make().to(dtype), "lokr", rank=1, init="kaiming", decompose_both=True)
    y = model(spec.input(dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().square().mean().backward()
    for _, a in loraplex.adapters(model):
        assert all(p.dtype == torch.float32 and p.grad is not None for _, p in a.own_parameters())


def test_bad_options_are_value_errors() -> None:
    layer = nn.Linear(8, 8)
    for kw, match in [
        ({"rank": 0}, "rank=0 must be an integer >= 1"),
        ({"alpha": "8"}, "alpha='8' must be a finite number"),
        ({"rank_dropout": 1.5}, r"rank_dropout=1.5 must be a number in \[0, 1\)"),
        ({"module_dropout": True}, "module_dropout=True"),
        ({"decompose_factor": 0}, "decompose_factor=0 must be -1"),
        ({"decompose_both": 1}, "decompose_both=1 must be True or False"),
        ({"rank_dropout_scale": "yes"}, "rank_dropout_scale='yes'"),
        ({"init": "lora"}, "init='lora' must be one of 'zeros', 'kaiming', 'lycoris'"),
    ]:
        with pytest.raises(ValueError, match=match):
            LoKr(layer, **kw)
