"""LoRA+ (Hayou, Ghosh, Yu, ICML 2024): B learns ``ratio`` times faster than A."""

from __future__ import annotations

from typing import Any

from torch import nn

from loraplex.inject import adapters
from loraplex.options import Option, validate

RATIO = 16.0  # the paper's recommended λ = η_B / η_A = 2^4 (also PEFT's examples)
# lora_plus's options (loraplex/options.py); lr has no default
LORA_PLUS_OPTIONS = {
    "lr": Option("float", None, "the learning rate of A (and of every other slow parameter)", positive=True),
    "ratio": Option("float", RATIO, "B's learning rate over A's (the paper recommends 16)", positive=True),
    "weight_decay": Option("float", 0.0, "weight decay (not on biases and norms)", nonneg=True),
}

# Modules whose parameters get no weight decay: PEFT's ALL_LAYERNORM_LAYERS is [nn.LayerNorm]; every other
# normalisation's affine parameters are exempt too (transformers' own RMSNorms are found by class name).
NORMS: tuple[type[nn.Module], ...] = tuple(
    t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.GroupNorm, nn.modules.batchnorm._NormBase) if t
)


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer (LayerNorm, RMSNorm, GroupNorm, batch / instance norm, ``*LayerNorm``, ``*RMSNorm``)."""
    return isinstance(module, NORMS) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def no_decay(model: nn.Module) -> set[int]:
    """``id`` of every parameter exempt from weight decay: biases (attribute name containing ``bias``) and the
    parameters of normalisation layers (``is_norm``), as PEFT's ``create_loraplus_optimizer``."""
    out = set()
    for module in model.modules():
        norm = is_norm(module)
        for name, p in module.named_parameters(recurse=False):
            if norm or "bias" in name:
                out.add(id(p))
    return out


def lora_plus(model: nn.Module, lr: float, ratio: float = RATIO, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Parameter groups for any torch optimizer: ``B`` of every low-rank product at ``ratio · lr``.

    LoRA+ (https://arxiv.org/abs/2402.12354) sets ``η_B = λ η_A`` (``λ`` = ``ratio``, recommended
    16). The B matrices are those the adapters declare, never guessed from names: the ``B`` of
    ``Adapter.product_pairs`` (A and B enter only through ``s B A``: LoRA with any init, GoRA's LoRA,
    DoRA, BoRA) and of ``Adapter.factor_blocks`` (GraLoRA's ``blocks_B`` and ``hybrid_B``; PEFT's
    name test ``"lora_B" in name`` matches ``gralora_B`` too). Other methods' parameters get ``lr``
    even when one is called ``B``: Kronecker (``s kron(B, A)``, no product), ARD-LoRA (a gate between
    B and A), AdaLoRA (``B diag(E) A``, though PEFT's name test would catch its ``lora_B``), LoHa, ...

    As the reference code and PEFT's ``create_loraplus_optimizer``, every other trainable 1-D tensor
    (biases, LayerNorm weights, DoRA's magnitude, AdaLoRA's E) also goes to the fast group, and
    everything else (A, the head's weight, other methods' parameters) to ``lr``.

    Weight decay, as PEFT: biases (a parameter whose attribute name contains ``bias``) and the
    parameters of normalisation layers get ``weight_decay=0``; everything else ``weight_decay``.
    Decisions: PEFT exempts only ``nn.LayerNorm`` (transformers' ``ALL_LAYERNORM_LAYERS``); here
    RMSNorm, GroupNorm, batch norms and classes named ``*LayerNorm`` / ``*RMSNorm`` too (no
    transformers import). PEFT exempts only in its fast group; here a (rare, multi-dimensional)
    norm weight in the slow group is exempt as well. PEFT's separate embedding group
    (``loraplus_lr_embedding``, 1e-6 by default, for a LoRA on an ``nn.Embedding``) is not copied:
    an embedding LoRA's A gets ``lr`` and its B ``ratio · lr``, as on any other layer.

    Groups, in order: ``lr`` with decay, ``ratio · lr`` with decay, then, only when not empty,
    ``ratio · lr`` without decay and ``lr`` without decay.

    Example:
        >>> import torch, loraplex
        >>> model = loraplex.adapt(nn.Sequential(nn.Linear(8, 8)), "lora", rank=2)
        >>> groups = lora_plus(model, lr=1e-4)
        >>> [(len(g["params"]), g["lr"]) for g in groups]
        [(1, 0.0001), (1, 0.0016)]
        >>> optimizer = torch.optim.AdamW(groups)
    """
    validate(LORA_PLUS_OPTIONS, locals())
    fast_ids = set()
    for _, a in adapters(model):
        fast_ids |= {id(B) for _, B, _ in a.product_pairs()} | {id(B) for _, B, _, _ in a.factor_blocks()}
    if not fast_ids:
        methods = sorted({a.method for _, a in adapters(model)}) or ["none"]
        raise ValueError(
            f"LoRA+ needs adapters with a low-rank product s·B@A (lora, dora, bora, gralora); the model has: {methods}"
        )
    exempt = no_decay(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(f, d): [] for f in (False, True) for d in (True, False)}
    for p in model.parameters():
        if p.requires_grad:
            groups[(id(p) in fast_ids or p.ndim == 1, id(p) not in exempt)].append(p)
    out = [
        {"params": groups[(False, True)], "lr": lr, "weight_decay": weight_decay},
        {"params": groups[(True, True)], "lr": lr * ratio, "weight_decay": weight_decay},
    ]
    for fast in (True, False):
        if groups[(fast, False)]:
            out.append({"params": groups[(fast, False)], "lr": lr * ratio if fast else lr, "weight_decay": 0.0})
    return out
