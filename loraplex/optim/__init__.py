"""Optimisers for low-rank adapters: LoRA+ parameter groups (and LoRA-Pro, see ``lorapro.py``)."""

from loraplex.optim.loraplus import lora_plus

__all__ = ["lora_plus"]
