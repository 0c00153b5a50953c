"""transformers integration: train loraplex adapters with ``transformers.Trainer``.

``Trainer`` builds its own optimizer, so adapters whose schedule counts optimizer steps (SingLoRA's
ramp) are advanced by a callback: ``Trainer(..., callbacks=[AdvanceCallback()])``. ``on_step_end``
runs once per optimizer update, after gradient accumulation, which is the count the ramp wants.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from loraplex.inject import advance


class AdvanceCallback(TrainerCallback):  # type: ignore[misc]
    """Call ``loraplex.advance(model)`` after every optimizer step of a ``transformers.Trainer``."""

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            advance(model)


__all__ = ["AdvanceCallback"]
