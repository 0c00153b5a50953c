"""The ``--optimizer`` registry: name -> factory ``(model, parameter groups, config) -> torch.optim.Optimizer``.

``loraplex finetune`` (:mod:`loraplex.train`), the CLI's choices and ``loraplex compare`` read
:data:`OPTIMIZERS`; a factory gets the trainable model, the learning-rate groups ``train`` built
(one group, or two with ``head_lr``) and the run's configuration (:class:`OptimizerSettings`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from loraplex.optim.loraplus import lora_plus
from loraplex.optim.lorapro import LoRAPro

__all__ = ["OPTIMIZERS", "OptimizerFactory", "OptimizerSettings", "make_adamw"]


class OptimizerSettings(Protocol):
    """What a factory reads off the run's configuration (``loraplex.train.FinetuneConfig`` has these)."""

    optimizer_options: dict[str, Any]
    weight_decay: float
    fsdp: bool


OptimizerFactory = Callable[[nn.Module, list[dict[str, Any]], OptimizerSettings], torch.optim.Optimizer]


def make_adamw(groups: list[dict[str, Any]], **kw: Any) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where torch has one for these tensors (4x faster step on CPU)."""
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, **kw)


# The extension point: ``--optimizer`` chooses from these (later issues register more).
def _adamw(model: nn.Module, groups: list[dict[str, Any]], cfg: OptimizerSettings) -> torch.optim.Optimizer:
    if cfg.optimizer_options:
        raise ValueError(f"optimizer 'adamw' takes no options, got {sorted(cfg.optimizer_options)}")
    return (torch.optim.AdamW if cfg.fsdp else make_adamw)(groups, lr=groups[0]["lr"], weight_decay=cfg.weight_decay)


def _lora_plus(model: nn.Module, groups: list[dict[str, Any]], cfg: OptimizerSettings) -> torch.optim.Optimizer:
    if len(groups) > 1:
        raise ValueError("optimizer 'lora-plus' sets its own learning-rate groups: drop head_lr")
    if unknown := sorted(set(cfg.optimizer_options) - {"ratio"}):
        raise ValueError(f"optimizer 'lora-plus' takes the option 'ratio', not {unknown}")
    plus = lora_plus(model, groups[0]["lr"], weight_decay=cfg.weight_decay, **cfg.optimizer_options)
    return (torch.optim.AdamW if cfg.fsdp else make_adamw)(plus, lr=groups[0]["lr"])


def _lora_pro(model: nn.Module, groups: list[dict[str, Any]], cfg: OptimizerSettings) -> torch.optim.Optimizer:
    if cfg.fsdp:
        raise ValueError("optimizer 'lora-pro' needs whole A, B factors: not with --fsdp")
    if len(groups) > 1:
        raise ValueError("optimizer 'lora-pro' sets its own parameter groups: drop head_lr")
    if unknown := sorted(set(cfg.optimizer_options) - {"mode", "ridge", "others"}):
        raise ValueError(f"optimizer 'lora-pro' takes the options 'mode', 'ridge', 'others', not {unknown}")
    return LoRAPro(model, lr=groups[0]["lr"], weight_decay=cfg.weight_decay, **cfg.optimizer_options)


OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adamw": _adamw,
    "lora-plus": _lora_plus,
    "lora-pro": _lora_pro,
}
