"""Rank allocation: allocators that watch and resize adapters during training (see ``base.py``)."""

from loraplex.rank.base import Allocator

# name -> allocator class; ``loraplex finetune --allocator NAME`` builds ``ALLOCATORS[NAME](model, total_steps)``.
ALLOCATORS: dict[str, type[Allocator]] = {}

__all__ = ["ALLOCATORS", "Allocator"]
