"""transformers integration: train loraplex adapters with ``transformers.Trainer``.

``Trainer`` builds its own optimizer, so adapters whose schedule counts optimizer steps (SingLoRA's
ramp) are advanced by a callback: ``Trainer(..., callbacks=[AdvanceCallback()])``. ``on_step_end``
runs once per optimizer update, after gradient accumulation, which is the count the ramp wants.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from loraplex.inject import advance
from loraplex.rank.base import Allocator


class AdvanceCallback(TrainerCallback):  # type: ignore[misc]
    """Call ``loraplex.advance(model)`` after every optimizer step of a ``transformers.Trainer``."""

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            advance(model)


class AllocatorCallback(TrainerCallback):  # type: ignore[misc]
    """Drive a ``loraplex.rank`` allocator from ``transformers.Trainer``: no user code in the loop.

    ``on_pre_optimizer_step`` calls ``allocator.before_step()`` (regulariser gradients) and
    ``on_optimizer_step`` calls ``allocator.step(optimizer)``, once per optimizer update.
    """

    def __init__(self, allocator: Allocator) -> None:
        self.allocator = allocator

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.allocator.before_step()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is None:
            raise ValueError("AllocatorCallback needs the optimizer: transformers did not pass it to the callback")
        self.allocator.step(optimizer)


__all__ = ["AdvanceCallback", "AllocatorCallback"]
