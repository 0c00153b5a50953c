"""LoRA+ (Hayou, Ghosh, Yu, ICML 2024): B learns ``ratio`` times faster than A."""

from __future__ import annotations

from typing import Any

from torch import nn

from loraplex.adapter import Factorized
from loraplex.inject import adapters

RATIO = 16.0  # the paper's recommended λ = η_B / η_A = 2^4 (also PEFT's examples)


def lora_plus(model: nn.Module, lr: float, ratio: float = RATIO, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Parameter groups for any torch optimizer: ``B`` of every factorised adapter at ``ratio · lr``.

    LoRA+ (https://arxiv.org/abs/2402.12354) sets ``η_B = λ η_A`` (``λ`` = ``ratio``, recommended
    16). The B matrices are read from the adapters (``Factorized``: LoRA, rsLoRA, DoRA, GoRA's LoRA,
    PiSSA / OLoRA), not from parameter names. As the reference code and PEFT's
    ``create_loraplus_optimizer``, every other trainable 1-D tensor (biases, DoRA's magnitude, the
    head's bias) also goes to the fast group, and everything else (A, the head's weight, other
    methods' parameters) to ``lr``; weight decay applies to every group, as PEFT's
    ``loraplus_weight_decay``.

    Example:
        >>> import torch, loraplex
        >>> model = loraplex.adapt(nn.Sequential(nn.Linear(8, 8)), "lora", rank=2)
        >>> groups = lora_plus(model, lr=1e-4)
        >>> [(len(g["params"]), g["lr"]) for g in groups]
        [(1, 0.0001), (1, 0.0016)]
        >>> optimizer = torch.optim.AdamW(groups)
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio > 0:
        raise ValueError(f"ratio={ratio!r} must be a number > 0 (the paper recommends 16)")
    if not isinstance(lr, int | float) or not lr > 0:
        raise ValueError(f"lr={lr!r} must be a number > 0")
    fast_ids = {id(a.B) for _, a in adapters(model) if isinstance(a, Factorized)}
    if not fast_ids:
        methods = sorted({a.method for _, a in adapters(model)}) or ["none"]
        raise ValueError(f"LoRA+ needs factorised (B A) adapters such as lora or dora; the model has: {methods}")
    slow: list[nn.Parameter] = []
    fast: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (fast if id(p) in fast_ids or p.ndim == 1 else slow).append(p)
    return [
        {"params": slow, "lr": lr, "weight_decay": weight_decay},
        {"params": fast, "lr": lr * ratio, "weight_decay": weight_decay},
    ]
