"""The registry: method name -> adapter class. Only finished methods are listed."""

from loraplex.adapter import Adapter
from loraplex.adapters.bone import Bone
from loraplex.adapters.dora import DoRA
from loraplex.adapters.gralora import GraLoRA
from loraplex.adapters.lora import LoRA
from loraplex.adapters.miss import MiSS

METHODS: dict[str, type[Adapter]] = {
    "lora": LoRA,
    "dora": DoRA,
    "gralora": GraLoRA,
    "miss": MiSS,
    "bone": Bone,
}

__all__ = ["METHODS", "Bone", "DoRA", "GraLoRA", "LoRA", "MiSS"]
