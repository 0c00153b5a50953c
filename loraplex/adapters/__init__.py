"""The registry: method name -> adapter class. Only finished methods are listed."""

from loraplex.adapter import Adapter
from loraplex.adapters.bone import Bone
from loraplex.adapters.bora import BoRA
from loraplex.adapters.c3a import C3A
from loraplex.adapters.dora import DoRA
from loraplex.adapters.gralora import GraLoRA
from loraplex.adapters.loldu import LoLDU
from loraplex.adapters.lora import LoRA
from loraplex.adapters.miss import MiSS
from loraplex.adapters.singlora import SingLoRA

METHODS: dict[str, type[Adapter]] = {
    "lora": LoRA,
    "dora": DoRA,
    "gralora": GraLoRA,
    "c3a": C3A,
    "miss": MiSS,
    "bone": Bone,
    "loldu": LoLDU,
    "singlora": SingLoRA,
    "bora": BoRA,
}

__all__ = ["METHODS", "BoRA", "Bone", "C3A", "DoRA", "GraLoRA", "LoLDU", "LoRA", "MiSS", "SingLoRA"]
