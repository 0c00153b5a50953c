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
    assert all(g["weight_decay"] == 0.1 for g in groups)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"ratio": 0}, "ratio=0"), ({"lr": -1.0}, "lr=-1.0"), ({"lr": 1e-3, "method": "c3a"}, "c3a")],
)
def test_errors(kwargs: dict, message: str) -> None:
    method = kwargs.pop("method", "lora")
    model = loraplex.adapt(MODELS[0].make(), method, **({"block_size": 1} if method == "c3a" else {"rank": 2}))
    with pytest.raises(ValueError, match=message):
        lora_plus(model, **({"lr": 1e-3} | kwargs))
