"""MiSS ("balance", "mini") and Bone (PEFT's "bat"): parity with HuggingFace PEFT, the dense
reference over shapes, checkpoints both ways, memory, and option errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from loraplex.adapters.bone import Bone
from loraplex.adapters.lora import LoRA
from loraplex.adapters.miss import MiSS

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

MINILM = [(384, 384), (384, 1536), (1536, 384)]  # chained: 384 -> 384 -> 1536 -> 384


def own(a: nn.Module) -> nn.Parameter:
    return a.T if isinstance(a, Bone) else a.D


def perturbed(a: MiSS | Bone, seed: int = 0, scale: float = 0.2) -> MiSS | Bone:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        own(a).add_(scale * torch.randn(own(a).shape, generator=g))
    return a.eval()


def peft_pair(
    base: nn.Sequential, cls: type, ours_opts: dict, peft_opts: dict, scale: float = 0.05
) -> tuple[nn.Module, nn.Module]:
    """Our adapters and PEFT's on copies of ``base``, with our (perturbed) parameter values in both."""
    ours = nn.Sequential(*(perturbed(cls(copy.deepcopy(m), **ours_opts), i, scale) for i, m in enumerate(base)))
    names = [str(i) for i in range(len(base))]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.MissConfig(target_modules=names, **peft_opts))
    with torch.no_grad():
        for i, a in enumerate(ours):
            theirs.base_model.model[i].miss_block["default"].copy_(own(a))
    return ours, theirs


@pytest.mark.parametrize(
    "cls, sizes, ours_opts, peft_opts",
    [
        (MiSS, MINILM, {"rank": 64}, {"r": 64}),
        (MiSS, [(13, 29)], {"rank": 4}, {"r": 4}),  # in % r != 0: PEFT pads x, ΔW's last tile is cut
        (MiSS, [(13, 29), (29, 6)], {"rank": 5, "init": "kaiming"}, {"r": 5, "init_weights": False}),
        (MiSS, MINILM, {"rank": 64, "variant": "mini", "mini_r": 8}, {"r": 64, "init_weights": "mini", "mini_r": 8}),
        (Bone, MINILM, {"rank": 64}, {"r": 64, "init_weights": "bat"}),
        (Bone, MINILM, {"rank": 32}, {"r": 32, "init_weights": "bat"}),
        (Bone, [(12, 20), (20, 8)], {"rank": 4}, {"r": 4, "init_weights": "bat"}),
    ],
    ids=["balance-minilm", "balance-13x29", "kaiming", "mini-minilm", "bone-r64", "bone-r32", "bone-small"],
)
def test_same_parameters_as_peft_same_outputs_and_delta(cls, sizes, ours_opts, peft_opts) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(*(nn.Linear(i, o) for i, o in sizes)).eval()
    ours, theirs = peft_pair(base, cls, ours_opts, peft_opts)
    x = torch.randn(3, 5, sizes[0][0])
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    merged = theirs.merge_and_unload()
    for i, a in enumerate(ours):
        torch.testing.assert_close(a.delta_weight(), merged[i].weight - base[i].weight, rtol=1e-5, atol=1e-5)


def test_kaiming_init_draws_what_peft_draws() -> None:
    base = nn.Sequential(nn.Linear(13, 29))
    torch.manual_seed(7)
    ours = MiSS(copy.deepcopy(base[0]), rank=5, init="kaiming")
    torch.manual_seed(7)
    theirs = peft.get_peft_model(base, peft.MissConfig(r=5, init_weights=False, target_modules=["0"]))
    torch.testing.assert_close(ours.D, theirs.base_model.model[0].miss_block["default"], rtol=0, atol=0)


# Checkpoints both ways (MiSS balance / mini / kaiming, Bone): test_peft_parity.py, cases miss, miss-mini,
# miss-kaiming, bone.


def test_conv1d_matches_linear_and_is_not_exported() -> None:
    conv = transformers.pytorch_utils.Conv1D(20, 12)  # (in 12, out 20), weight stored (in, out)
    linear = nn.Linear(12, 20)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T), linear.bias.copy_(conv.bias)
    x = torch.randn(4, 12)
    for cls, opts in [(MiSS, {"rank": 5}), (MiSS, {"rank": 4, "variant": "mini", "mini_r": 5}), (Bone, {"rank": 4})]:
        a, b = perturbed(cls(copy.deepcopy(conv), **opts)), perturbed(cls(copy.deepcopy(linear), **opts))
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.delta_weight(), b.delta_weight(), rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="Conv1D"):
            a.to_peft()


# Dense reference over shapes -------------------------------------------------------------------


@st.composite
def adapters(draw: st.DrawFn) -> tuple[nn.Module, int]:
    """A perturbed MiSS or Bone (maybe stacked on a LoRA) on a random float64 layer, and ``in``."""
    kind = draw(st.sampled_from(["balance", "mini", "bone"]))
    r = draw(st.integers(1, 6))
    if kind == "bone":
        n_in, n_out = r * draw(st.integers(1, 4)), r * draw(st.integers(1, 4))
    else:
        n_in, n_out = draw(st.integers(r, 3 * r + 2)), draw(st.integers(1, 12))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layer: nn.Module = nn.Linear(n_in, n_out, bias=draw(st.booleans()))
    if draw(st.booleans()):  # stacked: the effect adds to the LoRA below, relative to the root weight
        layer = LoRA(layer, rank=2)
        nn.init.normal_(layer.B)
    if kind == "bone":
        a: MiSS | Bone = Bone(layer, rank=r)
    else:
        mini_r = draw(st.sampled_from([d for d in range(1, n_out + 1) if n_out % d == 0]))
        a = MiSS(layer, rank=r, variant=kind, mini_r=mini_r)
    return perturbed(a.double(), scale=0.5), n_in


@settings(max_examples=40, deadline=None)
@given(adapters(), st.integers(1, 4))
def test_forward_and_gradients_match_the_dense_reference(case: tuple[nn.Module, int], n: int) -> None:
    a, n_in = case
    x = torch.randn(n, 2, n_in, dtype=torch.float64, requires_grad=True)
    y = a(x)
    torch.testing.assert_close(y, a.base(x) + x @ a.delta_weight().T, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    params = [own(a)]
    got = torch.autograd.grad((y * g).sum(), [x, *params])
    want = torch.autograd.grad(((a.base(x) + F.linear(x, a.delta_weight())) * g).sum(), [x, *params])
    for u, v in zip(got, want, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cls, opts", [(MiSS, {"rank": 4}), (Bone, {"rank": 4})])
def test_low_precision_base_and_dropout(cls: type, opts: dict) -> None:
    torch.manual_seed(0)
    a = perturbed(cls(nn.Linear(16, 24), **opts))
    x = torch.randn(5, 16)
    want = a(x)
    a.root.to(torch.bfloat16)
    y = a(x.bfloat16())
    assert y.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for _, p in a.own_parameters())
    torch.testing.assert_close(y.float(), want, rtol=3e-2, atol=3e-2)
    if cls is MiSS:  # dropout acts on the shard sum's input only, in training
        d = perturbed(MiSS(nn.Linear(16, 24), rank=4, dropout=0.5))
        torch.testing.assert_close(d(x), d.base(x) + x @ d.delta_weight().T)
        assert not torch.allclose(d.train()(x), d.eval()(x))


def test_bone_keeps_less_for_backward_than_peft() -> None:
    """Bytes saved for backward beyond the input and the parameters: one (out, in) here (W'), two in PEFT."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 96))
    ours, theirs = peft_pair(base, Bone, {"rank": 16}, {"r": 16, "init_weights": "bat"})
    x = torch.randn(8, 64, requires_grad=True)

    def saved(model: nn.Module) -> int:
        known = {t.untyped_storage().data_ptr() for t in [x, *model.parameters()]}
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum().backward()
        return sum(v for k, v in kept.items() if k not in known)

    assert saved(ours) == 64 * 96 * 4 < 2 * 64 * 96 * 4 <= saved(theirs)
    with torch.no_grad():  # no graph, no saved tensors, same values
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# Options, identity -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, opts, message",
    [
        (Bone, {"rank": 8}, "rank=8 must divide in_features=12"),
        (Bone, {"rank": 3}, "rank=3 must divide out_features=20"),
        (Bone, {"rank": 0}, "rank=0 must be an integer >= 1"),
        (MiSS, {"rank": 16}, "rank=16 must be <= in_features=12"),
        (MiSS, {"rank": 4, "variant": "mini", "mini_r": 3}, "mini_r=3 must divide out_features=20"),
        (MiSS, {"variant": "bat"}, "variant='bat' must be one of 'balance', 'mini'"),
        (MiSS, {"rank": 4, "init": "gaussian"}, "init='gaussian' must be one of 'zeros', 'kaiming'"),
        (MiSS, {"rank": 4, "dropout": 1.0}, r"dropout=1.0 must be a number in \[0, 1\)"),
    ],
)
def test_option_errors_name_the_value_and_the_constraint(cls: type, opts: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(nn.Linear(12, 20), **opts)


@pytest.mark.parametrize(
    "cls, opts", [(MiSS, {"rank": 5}), (MiSS, {"rank": 4, "variant": "mini"}), (Bone, {"rank": 4})]
)
def test_identity_at_init_and_the_formula(cls: type, opts: dict) -> None:
    layer = nn.Linear(12, 20)
    a = cls(layer, **opts)
    x = torch.randn(3, 12)
    torch.testing.assert_close(a(x), layer(x), rtol=0, atol=1e-6)
    assert sum(p.numel() for _, p in a.own_parameters()) == cls.num_params(12, 20, **opts)
    a.active = False
    assert torch.equal(a(x), layer(x))
    assert not torch.allclose(MiSS(layer, rank=5, init="kaiming")(x), layer(x))
