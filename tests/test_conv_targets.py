"""Issue 11: nn.Conv1d / nn.Conv2d targets for LoRA, DoRA, LoHa and LoKr, nn.Embedding for LoRA.

Checked against an independent dense re-derivation (the root layer run with ``W + ΔW`` built from
the factors by hand) and against HuggingFace PEFT's layers (same tensors -> same outputs, 1e-5).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from matrix import perturb
from torch import nn

import loraplex
from loraplex.adapters.lokr import LoKr, factorization


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 6, padding_idx=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.c1 = nn.Conv1d(8, 10, 3, padding=1)
        self.fc = nn.Linear(10, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (N, 16, 6)
        h = h.transpose(1, 2).reshape(-1, 6, 4, 4)
        h = F.gelu(self.c2(h)).flatten(2)  # (N, 8, 4)
        return self.fc(F.gelu(self.c1(h)).mean(-1))


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net().eval()


IDS = torch.randint(0, 13, (3, 16), generator=torch.Generator().manual_seed(1))


def test_lora_conv_and_embedding_equal_a_dense_rederivation() -> None:
    model = loraplex.adapt(net(), "lora", targets=["emb", "c2", "c1"], rank=3, alpha=6)
    perturb(model)
    for name in ("emb", "c2", "c1"):
        a = model.get_submodule(name)
        W = a.root.weight
        dense = 2.0 * (a.B @ a.A)  # (out, in), s = 6 / 3
        want = dense.T if name == "emb" else dense.reshape(W.shape)
        torch.testing.assert_close(a.delta_weight(), want)
    x = torch.randn(2, 6, 5, 5)
    c2 = model.c2
    A = c2.A.view(3, 6, 3, 3)
    by_hand = c2.root(x) + 2.0 * F.conv2d(F.conv2d(x, A, stride=2, padding=1), c2.B[:, :, None, None])
    torch.testing.assert_close(c2(x), by_hand, rtol=1e-5, atol=1e-5)
    emb = model.emb
    torch.testing.assert_close(emb(IDS), emb.root(IDS) + 2.0 * emb.A.T[IDS] @ emb.B.T)


def test_identity_merge_unload_and_all_linear() -> None:
    base = net()
    y = base(IDS)
    model = loraplex.adapt(copy.deepcopy(base), "lora", targets=["emb", "c2", "c1"], rank=2)
    torch.testing.assert_close(model(IDS), y)  # A = 0 on embeddings, B = 0 on convolutions
    perturb(model)
    moved = model(IDS)
    assert not torch.allclose(moved, y, atol=1e-4)
    loraplex.merge(model)
    assert type(model.c2) is nn.Conv2d and type(model.emb) is nn.Embedding
    torch.testing.assert_close(model(IDS), moved, rtol=1e-5, atol=1e-5)
    only = loraplex.adapt(copy.deepcopy(base), "dora")  # "all-linear": the linear layers only
    assert [n for n, _ in loraplex.adapters(only)] == ["fc"]


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr"])
def test_dilated_and_reflect_padded_convs_merge_exactly(method: str) -> None:
    layer = nn.Conv2d(4, 6, (3, 2), stride=(1, 2), dilation=(2, 1), padding=2, padding_mode="reflect")
    model = loraplex.adapt(nn.Sequential(layer), method, targets=["0"], rank=2)
    perturb(model)
    x = torch.randn(2, 4, 9, 8)
    y = model(x)
    loraplex.merge(model)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_refusals_name_the_layer_and_method() -> None:
    with pytest.raises(ValueError, match=r"'bone' cannot adapt Conv2d"):
        loraplex.adapt(net(), "bone", targets=["c2"])
    with pytest.raises(ValueError, match=r"'dora' cannot adapt Embedding"):
        loraplex.adapt(net(), "dora", targets=["emb"])
    with pytest.raises(ValueError, match=r"'loha' cannot adapt Embedding"):
        loraplex.adapt(net(), "loha", targets=["emb"])
    with pytest.raises(ValueError, match=r"groups=2 must have groups=1"):
        loraplex.adapt(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)), "lora", targets=["0"])
    with pytest.raises(ValueError, match=r"max_norm=1.0 must have max_norm=None"):
        loraplex.adapt(nn.Sequential(nn.Embedding(5, 3, max_norm=1.0)), "lora", targets=["0"])
    with pytest.raises(ValueError, match=r"dilation"):  # PEFT's lora_A drops the dilation
        loraplex.export_peft(
            loraplex.adapt(nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2)), "lora", targets=["0"]), "/nonexistent/x"
        )


def test_embedding_ignores_dropout_as_peft() -> None:
    model = loraplex.adapt(net(), "lora", targets=["emb"], rank=2, dropout=0.5).train()
    perturb(model)
    torch.testing.assert_close(model.emb(IDS), model.emb(IDS), rtol=0, atol=0)


def test_lokr_conv_factors_the_channels_as_peft() -> None:
    a = LoKr(nn.Conv2d(6, 8, 3), rank=1)
    (in_m, in_n), (out_l, out_k) = factorization(6), factorization(8)
    assert a.w1.shape == (out_l, in_m) and (a.w2_a.shape, a.w2_b.shape) == ((out_k, 1), (1, in_n * 9))
    assert LoKr.num_params(54, 8, rank=1, kernel=9) == sum(p.numel() for _, p in a.own_parameters())


# PEFT parity ------------------------------------------------------------------------------------


def peft_roundtrip(model: nn.Module, base: nn.Module, tmp_path) -> nn.Module:
    peft = pytest.importorskip("peft")
    loraplex.export_peft(model, tmp_path / "out")
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()


CASES = [
    ("lora", ["emb", "c2", "c1"], {"rank": 3, "alpha": 6}),
    ("lora", ["c2", "c1"], {"rank": 2, "alpha": 2, "rslora": True}),
    ("dora", ["c2", "c1"], {"rank": 2, "alpha": 4}),
    ("loha", ["c2", "c1"], {"rank": 2, "alpha": 4}),
    ("lokr", ["c2"], {"rank": 8, "alpha": 4}),  # full w1 and w2 (PEFT's 4-D lokr_w2)
    ("lokr", ["c2", "c1"], {"rank": 1, "alpha": 4}),  # factored w2
]


@pytest.mark.parametrize(("method", "targets", "options"), CASES, ids=lambda v: str(v))
def test_peft_parity_both_ways(method: str, targets: list[str], options: dict, tmp_path) -> None:
    base = net()
    ours = loraplex.adapt(copy.deepcopy(base), method, targets=targets, **options)
    perturb(ours)
    theirs = peft_roundtrip(ours, base, tmp_path)
    y = ours(IDS)
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS), y, rtol=1e-5, atol=1e-5)
    back = loraplex.import_peft(copy.deepcopy(base), tmp_path / "out")
    torch.testing.assert_close(back(IDS), y, rtol=1e-5, atol=1e-5)
    for name in targets:  # PEFT's own ΔW in the layer's layout
        mine = ours.get_submodule(name).delta_weight()
        peft_layer = theirs.base_model.model.get_submodule(name)
        if method == "lora":
            torch.testing.assert_close(peft_layer.get_delta_weight("default"), mine, rtol=1e-5, atol=1e-6)


def test_lokr_conv1d_full_w2_refuses_export(tmp_path) -> None:
    model = loraplex.adapt(net(), "lokr", targets=["c1"], rank=8)
    with pytest.raises(ValueError, match="Conv1d"):
        loraplex.export_peft(model, tmp_path)
