"""Rank allocation: allocators that watch and resize adapters during training (see ``base.py``)."""

from loraplex.rank.adalora import AdaLoRAAllocator
from loraplex.rank.ardlora import ARDLoRAAllocator
from loraplex.rank.base import Allocator
from loraplex.rank.elalora import ElaLoRAAllocator
from loraplex.rank.gora import gora_init

# name -> allocator class; ``loraplex finetune --allocator NAME`` builds ``ALLOCATORS[NAME](model, total_steps)``.
ALLOCATORS: dict[str, type[Allocator]] = {}
ALLOCATORS["adalora"] = AdaLoRAAllocator
ALLOCATORS["elalora"] = ElaLoRAAllocator
ALLOCATORS["ardlora"] = ARDLoRAAllocator

__all__ = ["ALLOCATORS", "AdaLoRAAllocator", "ARDLoRAAllocator", "Allocator", "ElaLoRAAllocator", "gora_init"]
