"""The registry: method name -> adapter class. Only finished methods are listed."""

from loraplex.adapter import Adapter
from loraplex.adapters.adalora import AdaLoRA
from loraplex.adapters.ardlora import ARDLoRA
from loraplex.adapters.bone import Bone
from loraplex.adapters.bora import BoRA
from loraplex.adapters.bottleneck import Bottleneck
from loraplex.adapters.c3a import C3A
from loraplex.adapters.circulant import Circulant
from loraplex.adapters.dora import DoRA
from loraplex.adapters.elalora import ElaLoRA
from loraplex.adapters.gralora import GraLoRA
from loraplex.adapters.kronecker import Kronecker
from loraplex.adapters.ldr import LDR
from loraplex.adapters.loha import LoHa
from loraplex.adapters.lokh import LoKH
from loraplex.adapters.lokr import LoKr
from loraplex.adapters.loldu import LoLDU
from loraplex.adapters.lora import LoRA
from loraplex.adapters.miss import MiSS
from loraplex.adapters.singlora import SingLoRA
from loraplex.adapters.toeplitz import Toeplitz

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
    "kronecker": Kronecker,
    "loha": LoHa,
    "lokr": LoKr,
    "lokh": LoKH,
    "circulant": Circulant,
    "toeplitz": Toeplitz,
    "ldr": LDR,
    "adapter": Bottleneck,
    "adalora": AdaLoRA,
    "elalora": ElaLoRA,
    "ardlora": ARDLoRA,
}

__all__ = [
    "METHODS",
    "BoRA",
    "Bone",
    "C3A",
    "DoRA",
    "GraLoRA",
    "LoLDU",
    "LoRA",
    "MiSS",
    "SingLoRA",
    "Kronecker",
    "LoHa",
    "LoKH",
    "LoKr",
    "Circulant",
    "Toeplitz",
    "LDR",
    "Bottleneck",
    "AdaLoRA",
    "ElaLoRA",
    "ARDLoRA",
]
