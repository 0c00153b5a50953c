"""Optimisers for low-rank adapters: LoRA+ parameter groups, the LoRA-Pro optimiser, the ``--optimizer`` registry."""

from loraplex.optim.loraplus import lora_plus
from loraplex.optim.lorapro import LoRAPro
from loraplex.optim.registry import OPTIMIZERS

__all__ = ["OPTIMIZERS", "LoRAPro", "lora_plus"]
