"""Declared factorisation capabilities (issue 18): ``factor_pairs`` / ``factor_blocks`` / ``product_pairs``.

Every registered method is built from the property matrix's cases, moved off its init, and its claims are
checked numerically in float64: ΔW = Σ s·B@A for ``factor_pairs`` (and the grid terms of ``factor_blocks``),
and, for ``product_pairs``, the same layer after ``(A, B) -> (M A, B M⁻¹)``. A wrong claim fails; and the
consumers (LoRA-Pro, LoRA+) refuse / slow down what claims nothing (Kronecker, ARD-LoRA).
"""

from __future__ import annotations

import pytest
import torch
from matrix import CASES, MODELS, Case, perturb
from torch import nn

import loraplex
from loraplex.adapter import Adapter
from loraplex.adapters import METHODS
from loraplex.adapters.gralora import block_delta
from loraplex.optim import lora_plus
from loraplex.optim.lorapro import LoRAPro

D = torch.float64
WEIGHT_CASES = [c for c in CASES if c.weight_update]


def built(case: Case, seed: int = 0) -> tuple[nn.Module, list[tuple[str, Adapter]]]:
    """The case's first model, adapted, in float64, every adapter parameter moved off its init (eval mode)."""
    spec = case.specs[0]
    model = loraplex.adapt(spec.make(seed), case.method, targets=case.targets, **case.options).double().eval()
    perturb(model, seed=seed + 3, scale=0.3)
    found = loraplex.adapters(model)
    assert found, case
    return model, found


def own(a: Adapter) -> set[int]:
    return {id(p) for _, p in a.own_parameters()}


def test_every_registered_method_has_a_case() -> None:
    assert set(METHODS) <= {c.method for c in CASES}


def test_factor_pairs_are_exact(case: Case) -> None:
    """``matrix(delta_weight()) == Σ s · B @ A`` over ``factor_pairs``, and the same sum over ``factor_blocks``."""
    if not case.weight_update:
        pytest.skip("no ΔW (the serial bottleneck adapter); it declares nothing")
    _, found = built(case)
    with torch.no_grad():
        check_sums(case, found)


def check_sums(case: Case, found: list[tuple[str, Adapter]]) -> None:
    for layer, a in found:
        delta = a.matrix(a.delta_weight())
        pairs = a.factor_pairs()
        if pairs:
            assert all(id(A) in own(a) and id(B) in own(a) for A, B, _ in pairs), layer
            total = sum(s * (B @ A) for A, B, s in pairs)
            torch.testing.assert_close(delta, total, rtol=1e-12, atol=1e-12, msg=f"{case} {layer}")
        blocks = a.factor_blocks()
        if blocks:
            assert all(id(A) in own(a) and id(B) in own(a) for A, B, _, _ in blocks), layer
            total = sum(s * (block_delta(A, B) if k else B @ A) for A, B, s, k in blocks)
            torch.testing.assert_close(delta, total, rtol=1e-12, atol=1e-12, msg=f"{case} {layer}")


def test_product_pairs_enter_only_as_the_product(case: Case) -> None:
    """``(A, B) -> (M A, B M⁻¹)`` keeps ``s B A``, so it must keep ΔW and the output of a declared product pair."""
    if not case.weight_update:
        pytest.skip("no ΔW (the serial bottleneck adapter); it declares nothing")
    model, found = built(case)
    with torch.no_grad():
        check_products(case, model, found)


def check_products(case: Case, model: nn.Module, found: list[tuple[str, Adapter]]) -> None:
    x = case.specs[0].input()
    x = x if x.dtype == torch.long else x.to(D)
    y = model(x)
    deltas = [a.delta_weight().clone() for _, a in found]
    g = torch.Generator().manual_seed(7)
    claimed = 0
    for _, a in found:
        for A, B, _ in a.product_pairs():
            r = A.shape[0]
            M = torch.eye(r, dtype=D) + 0.4 * torch.randn(r, r, generator=g, dtype=D)
            A.copy_(M @ A)
            B.copy_(B @ torch.linalg.inv(M))
            claimed += 1
    if not claimed:
        return
    for (layer, a), before in zip(found, deltas, strict=True):
        torch.testing.assert_close(a.delta_weight(), before, rtol=1e-9, atol=1e-10, msg=f"{case} {layer}")
    torch.testing.assert_close(model(x), y, rtol=1e-9, atol=1e-10)


def test_who_claims_what() -> None:
    """The declarations, method by method: only LoRA is ``s B A``; DoRA / BoRA only use the product."""
    pairs, products, blocks = set(), set(), set()
    for case in WEIGHT_CASES:
        for _, a in built(case)[1]:
            pairs |= {case.method} if a.factor_pairs() else set()
            products |= {case.method} if a.product_pairs() else set()
            blocks |= {case.method} if a.factor_blocks() else set()
    assert pairs == {"lora"}
    assert products == {"lora", "dora", "bora"}
    assert blocks == {"lora", "gralora"}


@pytest.mark.parametrize("options", [{"rank": 4}, {"rank": 3, "heads": 2}], ids=["heads=1", "heads=2"])
def test_kronecker_and_ardlora_claim_nothing(options: dict) -> None:
    """Both have A, B and scale, but ``s kron(B, A)`` / ``B diag(m) A`` are not ``s B A``."""
    for a in (METHODS["kronecker"](nn.Linear(16, 16)), METHODS["ardlora"](nn.Linear(16, 16), **options)):
        assert hasattr(a, "A") and hasattr(a, "B") and hasattr(a, "scale")
        assert a.factor_pairs() == [] and a.product_pairs() == [] and a.factor_blocks() == []


def block_model() -> nn.Module:
    return next(m for m in MODELS if m.name == "block").make()


@pytest.mark.parametrize(
    ("method", "options"),
    [("kronecker", {}), ("ardlora", {"rank": 3, "heads": 2}), ("ardlora", {"rank": 4})],
    ids=["kronecker", "ardlora-heads=2", "ardlora-heads=1"],
)
def test_lorapro_refuses_adapters_without_factor_pairs(method: str, options: dict) -> None:
    """Before: Kronecker was stepped as s B A (silently wrong), ardlora heads=2 crashed on a shape."""
    model = loraplex.adapt(block_model(), method, targets=["query", "value"], **options)
    with pytest.raises(ValueError, match=rf"LoRAPro: layer 'query' \({method}\) has no factor pairs"):
        LoRAPro(model)
    # mixed with a LoRA elsewhere: still refused by default; others="adamw" steps it with AdamW
    model = loraplex.adapt(model, "lora", targets=["key"], rank=2)
    with pytest.raises(ValueError, match=rf"layer 'query' \({method}\)"):
        LoRAPro(model, mode="low")
    opt = LoRAPro(model, mode="low", others="adamw")
    assert sum(g["pair"] for g in opt.param_groups) == 1
    x = next(m for m in MODELS if m.name == "block").input()
    model(x).square().sum().backward()
    opt.step()


def test_lora_plus_gives_kronecker_b_the_base_lr() -> None:
    """Before: Kronecker's B (matched by name) got ratio x lr; it is no B of a product s B A."""
    model = loraplex.adapt(block_model(), "kronecker", targets=["query", "value"])
    model = loraplex.adapt(model, "lora", targets=["key"], rank=2)
    lr = {id(p): g["lr"] for g in lora_plus(model, lr=1e-3, ratio=16.0) for p in g["params"]}
    for _, a in loraplex.adapters(model):
        if a.method == "kronecker":
            assert lr[id(a.A)] == lr[id(a.B)] == 1e-3
        else:
            assert (lr[id(a.A)], lr[id(a.B)]) == (1e-3, 16e-3)
    only_kron = loraplex.adapt(block_model(), "kronecker", targets=["query"])
    with pytest.raises(ValueError, match="LoRA\\+ needs adapters with a low-rank product"):
        lora_plus(only_kron, lr=1e-3)


@pytest.mark.parametrize("method", ["lora", "dora", "bora"])
def test_hotswap_pads_declared_product_pairs(method: str) -> None:
    """prepare_hotswap pads the pair ``product_pairs`` declares, output unchanged; Kronecker is refused."""
    model = loraplex.adapt(MODELS[0].make(), method, rank=2)
    perturb(model)
    x = MODELS[0].input()
    y = model(x)
    loraplex.prepare_hotswap(model, 5)
    for _, a in loraplex.adapters(model):
        ((A, B, _),) = a.product_pairs()
        assert A.shape[0] == B.shape[1] == 5
    torch.testing.assert_close(model(x), y)
    kron = loraplex.adapt(MODELS[0].make(), "kronecker")
    with pytest.raises(ValueError, match="cannot be padded"):
        loraplex.prepare_hotswap(kron, 5)
