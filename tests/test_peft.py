"""Reference parity with HuggingFace PEFT (properties.md F.17): outputs, ΔW and checkpoints both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from matrix import MODELS, export_to_peft, import_from_peft, perturb
from torch import nn

import loraplex
from loraplex.adapters import DoRA

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["fc1", "fc2"]
CONFIGS = {
    "lora": ({"rank": 4, "alpha": 8}, {}),
    "rslora": ({"rank": 4, "alpha": 8, "rslora": True}, {"use_rslora": True}),
    "gaussian": ({"rank": 4, "alpha": 8, "init": "gaussian"}, {"init_lora_weights": "gaussian"}),
    "dora": ({"rank": 4, "alpha": 8}, {"use_dora": True}),
    "pissa": ({"rank": 4, "alpha": 8, "init": "pissa"}, {"init_lora_weights": "pissa"}),
    "olora": ({"rank": 4, "alpha": 8, "init": "olora"}, {"init_lora_weights": "olora"}),
}


def pair(kind: str, base: nn.Module, targets=TARGETS, **extra) -> tuple[nn.Module, nn.Module]:
    ours_opts, peft_opts = CONFIGS[kind]
    method = "dora" if kind == "dora" else "lora"
    ours = loraplex.adapt(copy.deepcopy(base), method, targets=targets, train=["classifier"], **ours_opts, **extra)
    config = peft.LoraConfig(
        r=ours_opts["rank"],
        lora_alpha=ours_opts["alpha"],
        target_modules=targets,
        modules_to_save=["classifier"],
        **peft_opts,
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    return ours, theirs


def peft_layer(theirs: nn.Module, name: str) -> nn.Module:
    return theirs.base_model.model.get_submodule(name)


def copy_into_peft(ours: nn.Module, theirs: nn.Module) -> None:
    with torch.no_grad():
        for name, a in loraplex.adapters(ours):
            layer = peft_layer(theirs, name)
            layer.lora_A["default"].weight.copy_(a.A)
            layer.lora_B["default"].weight.copy_(a.B)
            if isinstance(a, DoRA):
                layer.lora_magnitude_vector["default"].weight.copy_(a.m)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_same_parameters_same_outputs_and_delta(kind: str) -> None:
    spec = MODELS[0]
    base = spec.make()
    ours, theirs = pair(kind, base)
    if kind in ("pissa", "olora"):  # same init: same factors and the same residual base weight
        for name, a in loraplex.adapters(ours):
            layer = peft_layer(theirs, name)
            torch.testing.assert_close(a.A, layer.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.B, layer.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.weight, layer.base_layer.weight, rtol=1e-5, atol=1e-6)
    perturb(ours)
    copy_into_peft(ours, theirs)
    x = spec.input()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    merged = theirs.merge_and_unload()
    for name, a in loraplex.adapters(ours):
        want = merged.get_submodule(name).weight - a.weight
        torch.testing.assert_close(a.delta_weight(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_export_loads_in_peft(kind: str, tmp_path) -> None:
    spec = MODELS[0]
    base = spec.make()
    ours, _ = pair(kind, base)
    perturb(ours)
    with torch.no_grad():
        ours.classifier.weight.add_(0.5)
    theirs = export_to_peft(ours, base, tmp_path)
    x = spec.input()
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
def test_import_reads_peft_checkpoints(kind: str, tmp_path) -> None:
    spec = MODELS[1]
    base = spec.make()
    _, theirs = pair(kind, base, targets=["query", "value", "up"])
    ours = import_from_peft(theirs, base, tmp_path)
    x = spec.input()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert {n for n, _ in loraplex.adapters(ours)} == {"query", "value", "up"}
    assert all(p.requires_grad for p in ours.classifier.parameters())


def test_import_rank_and_alpha_patterns(tmp_path) -> None:
    spec = MODELS[1]
    base = spec.make()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], rank_pattern={"value": 2}, alpha_pattern={"value": 3}
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = import_from_peft(theirs, base, tmp_path / "peft")
    x = spec.input()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert ours.value.rank == 2 and ours.value.scale == 1.5
    again = export_to_peft(ours, base, tmp_path / "back")
    torch.testing.assert_close(again(x), theirs(x), rtol=1e-5, atol=1e-5)


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def test_conv1d_layers_match_peft_and_round_trip(tmp_path) -> None:
    base = tiny_gpt2()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = loraplex.adapt(copy.deepcopy(base), "dora", rank=4, alpha=8)
    assert {n.rsplit(".", 1)[-1] for n, _ in loraplex.adapters(ours)} == {"c_attn", "c_proj", "c_fc"}
    perturb(ours)
    a = ours.transformer.h[0].attn.c_attn
    x = torch.randn(3, 16)
    torch.testing.assert_close(a(x), a.base(x) + x @ a.delta_weight().T, rtol=1e-5, atol=1e-5)
    loraplex.export_peft(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
    back = loraplex.import_peft(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(back(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
    y = ours(ids).logits
    loraplex.merge(ours)
    torch.testing.assert_close(ours(ids).logits, y, rtol=1e-5, atol=1e-5)


def test_import_refuses_what_it_cannot_reproduce(tmp_path) -> None:
    spec = MODELS[0]
    base = spec.make()
    _, theirs = pair("pissa", base)
    theirs.save_pretrained(tmp_path / "pissa")
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        loraplex.import_peft(copy.deepcopy(base), tmp_path / "pissa")
    ia3 = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=TARGETS, feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        loraplex.import_peft(copy.deepcopy(base), tmp_path / "ia3")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="pickle"):
        loraplex.import_peft(copy.deepcopy(base), tmp_path / "bin")
