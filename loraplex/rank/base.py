"""The allocator contract: rank allocation hooked into any training loop.

An allocator watches (and may resize) the adapters of one model during training. The loop
contract, the same in ``loraplex.finetune``, under ``transformers.Trainer``
(``loraplex.hf.AllocatorCallback``) and in a hand-written loop::

    loss.backward()
    alloc.before_step()        # adds regulariser gradients (orthogonality, l1 / TV), reads gradients
    optimizer.step()
    alloc.step(optimizer)      # importance update, rank changes; the optimizer state of what survives is kept
    optimizer.zero_grad()

Regularisers act through gradients (``before_step`` back-propagates them into ``.grad``), not
through the loss, so that the same allocator works under Trainer, whose loss a callback cannot
change. Under DDP every process holds the same parameters and all-reduced gradients, so
allocators that decide from them take identical decisions on every process.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from loraplex.options import Option, validate

STEPS = {"total_steps": Option("int", None, "the optimizer steps of the whole run")}


class Allocator:
    """Base class of rank allocators (see the module docstring for the loop contract).

    Args:
        model: the adapted model (its adapters are found with ``loraplex.adapters``).
        total_steps: the optimizer steps of the whole run (schedules are functions of the step).
    """

    name: ClassVar[str]
    # the keyword options (loraplex/options.py); each subclass validates them with ``validate(.., locals())``
    declared_options: ClassVar[dict[str, Option]] = {}
    # True for allocators that replace parameters (ElaLoRA's resizes): after a ``step`` that set
    # ``self.resized``, a DDP wrapper must be rebuilt (``loraplex.finetune`` does); FSDP is refused.
    resizes: ClassVar[bool] = False

    def __init__(self, model: nn.Module, total_steps: int) -> None:
        validate(STEPS, {"total_steps": total_steps})
        self.model = model
        self.total_steps = total_steps
        self.t = 0  # optimizer steps seen
        self.resized = False  # whether the last ``step`` replaced parameters

    @classmethod
    def at_budget(cls, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Method and allocator options for a run whose FINAL size is ``options`` (``loraplex compare``).

        ``options`` holds the method's size option chosen for the budget (e.g. ``{"rank": 8}``); the
        default keeps it as the starting size (allocators that conserve the total rank).
        """
        return dict(options), {}

    def before_step(self) -> None:
        """After ``loss.backward()``, before ``optimizer.step()``: add regulariser gradients."""

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """After ``optimizer.step()``, before ``zero_grad``: update importance, change ranks."""
        raise NotImplementedError

    def ranks(self) -> dict[str, int]:
        """The current rank of every adapted layer, by layer name."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (JSON values and tensors; see ``checkpoint.split_state``)."""
        return {"t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
