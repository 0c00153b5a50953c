"""The registry: method name -> adapter class. Only finished methods are listed."""

from loraplex.adapter import Adapter
from loraplex.adapters.dora import DoRA
from loraplex.adapters.lora import LoRA

METHODS: dict[str, type[Adapter]] = {
    "lora": LoRA,
    "dora": DoRA,
}

__all__ = ["METHODS", "DoRA", "LoRA"]
