"""LoRA+: the same learning-rate groups as HuggingFace PEFT's create_loraplus_optimizer, and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from matrix import MODELS, export_to_peft

import loraplex
from loraplex.optim import lora_plus

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_groups_match_peft(method: str, tmp_path) -> None:
    """Every tensor gets the learning rate PEFT's LoRA+ gives its twin (B and 1-D tensors: ratio x lr)."""
    base = MODELS[1].make()
    ours = loraplex.adapt(copy.deepcopy(base), method, rank=2, train=["classifier"])
    theirs = export_to_peft(ours, base, tmp_path / "peft")
    for p in theirs.parameters():  # PEFT loads inference-mode; trainable as ours
        p.requires_grad_(False)
    for n, p in theirs.named_parameters():
        if "lora_" in n or "modules_to_save" in n:
            p.requires_grad_(True)
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8.0)
    peft_lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    names = dict(theirs.named_parameters())
    ours_lr = {id(p): g["lr"] for g in lora_plus(ours, lr=1e-3, ratio=8.0) for p in g["params"]}
    checked = 0
    for layer, a in loraplex.adapters(ours):
        twins = {
            "A": "lora_A.default.weight",
            "B": "lora_B.default.weight",
            "m": "lora_magnitude_vector.default.weight",
        }
        for attr, key in twins.items():
            if hasattr(a, attr) and isinstance(getattr(a, attr), torch.nn.Parameter):
                assert ours_lr[id(getattr(a, attr))] == peft_lr[id(names[f"base_model.model.{layer}.{key}"])], layer
                checked += 1
    for k in ("weight", "bias"):
        mine = getattr(ours.classifier, k)
        twin = names[f"base_model.model.classifier.modules_to_save.default.{k}"]
        assert ours_lr[id(mine)] == peft_lr[id(twin)]
    assert checked >= 12 and {v for v in ours_lr.values()} == {1e-3, 8e-3}


def test_every_trainable_tensor_in_exactly_one_group() -> None:
    model = loraplex.adapt(MODELS[0].make(), "lora", rank=2, train=["classifier"])
    groups = lora_plus(model, lr=1e-3, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.1), (16e-3, 0.1), (16e-3, 0.0)]
    assert groups[2]["params"] == [model.classifier.bias]  # biases: no decay, as PEFT


def peft_twin(ours_name: str, ours: torch.nn.Module) -> str:
    """PEFT's name of one of our trainable parameters (an adapter's A / B / m, or a module_to_save's)."""
    module, leaf = ours_name.rsplit(".", 1)
    if isinstance(ours.get_submodule(module), loraplex.Adapter):
        key = {"A": "lora_A", "B": "lora_B", "m": "lora_magnitude_vector"}[leaf]
        return f"base_model.model.{module}.{key}.default.weight"
    return f"base_model.model.{module}.modules_to_save.default.{leaf}"


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_weight_decay_groups_match_peft(method: str, tmp_path) -> None:
    """Issue 18: biases and LayerNorm parameters get no weight decay, as PEFT's create_loraplus_optimizer.

    Every trainable tensor gets PEFT's (lr, weight_decay): a block with two LayerNorms, a fully trained
    linear (weight and bias) and a trained head, adapters on the attention projections.
    """
    base = MODELS[1].make()
    train = ["norm1", "norm2", "up", "classifier"]
    ours = loraplex.adapt(copy.deepcopy(base), method, targets=["query", "value"], rank=2, train=train)
    theirs = export_to_peft(ours, base, tmp_path / "peft")
    for n, p in theirs.named_parameters():  # PEFT loads inference-mode; trainable as ours
        p.requires_grad_("lora_" in n or "modules_to_save" in n)
    opt = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8.0, loraplus_weight_decay=0.05
    )
    peft_of = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    names = dict(theirs.named_parameters())
    ours_of = {
        id(p): (g["lr"], g["weight_decay"])
        for g in lora_plus(ours, lr=1e-3, ratio=8.0, weight_decay=0.05)
        for p in g["params"]
    }
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trained) == len(peft_of) == 2 * (2 if method == "lora" else 3) + 2 * 2 + 2 + 2
    for n, p in trained:
        assert ours_of[id(p)] == peft_of[id(names[peft_twin(n, ours)])], n
    assert ours_of[id(ours.norm1.weight)] == ours_of[id(ours.up.bias)] == (8e-3, 0.0)
    assert ours_of[id(ours.up.weight)] == (1e-3, 0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"ratio": 0}, "ratio=0"), ({"lr": -1.0}, "lr=-1.0"), ({"lr": 1e-3, "method": "c3a"}, "c3a")],
)
def test_errors(kwargs: dict, message: str) -> None:
    method = kwargs.pop("method", "lora")
    model = loraplex.adapt(MODELS[0].make(), method, **({"block_size": 1} if method == "c3a" else {"rank": 2}))
    with pytest.raises(ValueError, match=message):
        lora_plus(model, **({"lr": 1e-3} | kwargs))
