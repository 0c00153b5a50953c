"""adapt(): target selection, freezing, option errors; merge / unload / disabled on whole models."""

from __future__ import annotations

import pytest
import torch
from matrix import MODELS, Block, clone, perturb
from torch import nn

import loraplex
from loraplex import Adapter


def adapted_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, Adapter)}


def test_targets_by_suffix_regex_and_all_linear() -> None:
    nested = nn.Sequential()
    nested.add_module("enc", Block())
    assert adapted_names(loraplex.adapt(clone(nested), "lora", targets=["query", "enc.value"])) == {
        "enc.query",
        "enc.value",
    }
    assert adapted_names(loraplex.adapt(clone(nested), "lora", targets=r"enc\.(up|down)")) == {"enc.up", "enc.down"}
    everything = adapted_names(loraplex.adapt(clone(nested), "lora"))
    assert everything == {f"enc.{n}" for n in ("query", "key", "value", "out", "up", "down")}  # no classifier
    fewer = loraplex.adapt(clone(nested), "lora", exclude=["query", "key"])
    assert adapted_names(fewer) == everything - {"enc.query", "enc.key"}


def test_all_linear_skips_the_output_embeddings() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    model = transformers.BertForMaskedLM(config)
    names = adapted_names(loraplex.adapt(model, "lora", rank=2))
    assert "cls.predictions.decoder" not in names and names


def test_a_suffix_matches_whole_components_only() -> None:
    model = nn.Module()
    model.value = nn.Linear(4, 4)
    model.xvalue = nn.Linear(4, 4)
    assert adapted_names(loraplex.adapt(model, "lora", targets=["value"], rank=2)) == {"value"}


def test_nothing_matched_lists_module_names() -> None:
    with pytest.raises(ValueError, match=r"matched no linear layer.*fc1"):
        loraplex.adapt(MODELS[0].make(), "lora", targets=["nope"])


def test_bad_options_name_the_layer_option_and_constraint() -> None:
    with pytest.raises(ValueError, match=r"layer 'fc1' .*rank=13 must be <= min\(in_features=12"):
        loraplex.adapt(MODELS[0].make(), "lora", targets=["fc1"], rank=13, init="pissa")
    with pytest.raises(ValueError, match=r"rank=0 must be an integer >= 1"):
        loraplex.adapt(MODELS[0].make(), "lora", rank=0)
    with pytest.raises(ValueError, match=r"dropout=1.5 must be a number in \[0, 1\)"):
        loraplex.adapt(MODELS[0].make(), "dora", dropout=1.5)
    with pytest.raises(ValueError, match=r"method 'lora' has no option 'rnak'"):
        loraplex.adapt(MODELS[0].make(), "lora", rnak=4)
    with pytest.raises(ValueError, match=r"method='lokra' is not one of"):
        loraplex.adapt(MODELS[0].make(), "lokra")
    with pytest.raises(ValueError, match=r"init='pissa' must be one of 'kaiming', 'gaussian'"):
        loraplex.adapt(MODELS[0].make(), "dora", init="pissa")
    with pytest.raises(ValueError, match=r"train='head' names no module"):
        loraplex.adapt(MODELS[0].make(), "lora", train=["head"])


def test_failed_adapt_leaves_the_model_unchanged() -> None:
    model = MODELS[0].make()  # fc1 is 12 x 20: rank 13 fits fc2 (20 x 18) but not fc1
    model.fc1, model.fc2 = model.fc2, model.fc1  # PiSSA on fc2-now-first rewrites it before fc1 fails
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="rank=13"):
        loraplex.adapt(model, "lora", rank=13, init="pissa")
    assert not loraplex.adapters(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=1e-6, atol=1e-6)


def test_freezing_keeps_adapters_and_train_modules_only() -> None:
    model = loraplex.adapt(MODELS[1].make(), "dora", targets=["query"], train=["classifier", "norm1"], rank=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"query.A", "query.B", "query.m", "classifier.weight", "classifier.bias"} | {
        "norm1.weight",
        "norm1.bias",
    }


def test_adapting_an_eval_model_keeps_it_in_eval() -> None:
    model = loraplex.adapt(MODELS[0].make().eval(), "lora", dropout=0.5)
    assert not any(m.training for m in model.modules())


def test_same_name_twice_on_a_layer_is_an_error() -> None:
    model = loraplex.adapt(MODELS[0].make(), "lora")
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        loraplex.adapt(model, "lora")
    with pytest.raises(ValueError, match="at most one DoRA"):
        loraplex.adapt(loraplex.adapt(MODELS[0].make(), "dora", name="a"), "dora", name="b")


def test_merge_and_unload_stacks() -> None:
    spec = MODELS[1]
    base = spec.make()
    model = loraplex.adapt(clone(base), "lora", name="a")
    loraplex.adapt(model, "dora", name="b", targets=["query", "up"])
    perturb(model)
    x = spec.input()
    y = model(x)
    merged = loraplex.merge(clone(model))
    assert not loraplex.adapters(merged)
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
    loraplex.unload(model)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


def test_disabled_restores_state_after_an_exception() -> None:
    model = loraplex.adapt(MODELS[0].make(), "lora")
    with pytest.raises(RuntimeError), loraplex.disabled(model):
        assert not any(a.active for _, a in loraplex.adapters(model))
        raise RuntimeError
    assert all(a.active for _, a in loraplex.adapters(model))


def test_dora_zero_rows_give_no_nan() -> None:
    layer = nn.Linear(8, 6)
    with torch.no_grad():
        layer.weight[2] = 0
    model = nn.Sequential(layer)
    loraplex.adapt(model, "dora", rank=2)
    x = torch.randn(4, 8)
    y = model(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(y, layer(x))
    torch.testing.assert_close(model[0].delta_weight(), torch.zeros(6, 8))


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_rewriting_inits_refuse_non_finite_base_weights_before_any_layer_changes(init: str, value: float) -> None:
    """Before: PiSSA with NaN raised torch._LinAlgError "linalg.svd: ... non-finite values" after rewriting the
    first layer (not rolled back: not a ValueError); PiSSA with inf and OLoRA gave NaN factors silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
    with torch.no_grad():
        model[2].weight[3, 4:7] = value
    state = {k: v.clone() for k, v in model.state_dict().items()}
    counts = r"\(3 NaN, 0 inf\)" if value != value else r"\(0 NaN, 3 inf\)"
    kind = "SVD" if init == "pissa" else "QR"
    msg = rf"layer '2' \(lora\): the base layer has non-finite weights {counts}; init='{init}' needs finite .*{kind}"
    with pytest.raises(ValueError, match=msg):
        loraplex.adapt(model, "lora", rank=2, init=init)
    assert not loraplex.adapters(model)
    assert model.state_dict().keys() == state.keys()
    for k, v in state.items():  # exactly: the check runs before the first layer is rewritten
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, equal_nan=True)
    from loraplex.adapters.lora import LoRA

    with pytest.raises(ValueError, match=rf"the base layer has non-finite weights {counts}"):
        LoRA(model[2], rank=2, init=init)
    loraplex.adapt(model, "lora", rank=2, init="kaiming")  # an init that does not factorise W0 accepts it
