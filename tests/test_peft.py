"""PEFT edge cases (properties.md F.17): patterns, GPT-2 Conv1D, refusals. The parity matrix is test_peft_parity.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from matrix import MODELS, export_to_peft, import_from_peft, perturb
from torch import nn

import loraplex

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# Outputs, ΔW, gradients and checkpoints both ways for LoRA, rsLoRA, Gaussian init, DoRA, PiSSA and OLoRA
# (and every other method with a PEFT twin): the parity matrix, tests/test_peft_parity.py. Here: the edge cases.
TARGETS = ["fc1", "fc2"]


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
    # PiSSA / OLoRA checkpoints: test_peft_parity.py::test_import_reads_peft_checkpoints_and_exports_them_back
    base = MODELS[0].make()
    ia3 = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=TARGETS, feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        loraplex.import_peft(copy.deepcopy(base), tmp_path / "ia3")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="pickle"):
        loraplex.import_peft(copy.deepcopy(base), tmp_path / "bin")
