"""Optimisers for low-rank adapters: LoRA+ parameter groups and the LoRA-Pro optimiser."""

from loraplex.optim.loraplus import lora_plus
from loraplex.optim.lorapro import LoRAPro

__all__ = ["LoRAPro", "lora_plus"]
