"""Rank allocation: allocators that watch and resize adapters during training (see ``base.py``), and
initialisers that adapt the model themselves from a gradient pre-pass (GoRA)."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class Initialiser:
    """A rank initialiser: it adapts the model in place of ``adapt``, from a gradient pre-pass (ranks fixed after).

    ``init(model, batches, *, targets, train, seed, **method_options, **init_options)`` adapts the model;
    ``methods``: the adapter methods it creates (any other is a ``ValueError``); ``options``: the method
    options it takes; the pre-pass reads the first ``init_options[steps_option]`` (else ``default_steps``)
    training batches.
    """

    init: Callable[..., Any]
    methods: tuple[str, ...]
    options: tuple[str, ...]
    description: str
    steps_option: str = "n_steps"
    default_steps: int = 8


# name -> initialiser; ``loraplex finetune --allocator NAME`` runs it in place of ``adapt``.
INITIALISERS: dict[str, Initialiser] = {
    "gora": Initialiser(
        init=gora_init,
        methods=("lora",),
        options=("rank", "alpha", "rslora", "dropout"),
        description="GoRA: ranks from gradient importance, A from the projected gradient",
    ),
}

__all__ = [
    "ALLOCATORS",
    "INITIALISERS",
    "AdaLoRAAllocator",
    "ARDLoRAAllocator",
    "Allocator",
    "ElaLoRAAllocator",
    "Initialiser",
    "gora_init",
]
