"""GoRA: Gradient-driven Adaptive LoRA (He et al., NeurIPS 2025, https://arxiv.org/abs/2502.12171).

GoRA sets, once before training, each layer's LoRA rank and its initial factors from the gradient
of the frozen weights; training is then plain LoRA. Reference: ``hhnqqq/MyTransformers``
``common/lora_modules/gora.py`` (``gora_reinit``, ``compute_importance``, ``get_allocated_rank``,
``LinearWithGoRA.grad_compress_init``), defaults from its argument parser
(``common/utils/arguments.py``) and its Llama-3 WizardLM example script.

1. **Gradient pre-pass** (``average_gradients``): ``G_i = Σ_batches ∂L/∂W_i / n`` for every
   targeted layer, only the targeted base weights requiring grad.
2. **Importance** (``layer_importance``): ``I_i = ‖W_i ⊙ G_i‖_F`` by default; shares ``ŝ_i = I_i / Σ I``.
3. **Allocation** (``allocate``): ``T = rank · Σ_i (in_i + out_i)``;
   ``r_i = round(T ŝ_i) // (in_i + out_i)``, clamped to ``[r_min, r_max]``, then to ``min(in_i, out_i)``.
4. **Init** (``compress``): ``A`` as LoRA's default (kaiming uniform, ``a = √5``) and
   ``B = -(c / s) · G Aᵀ (A Aᵀ + 1e-8 I)⁺``, so that the initial update is
   ``ΔW0 = s B A = -c · G A⁺A``: one gradient-descent step projected on A's row space, with
   ``c = lr_g · √(in_i / r_i)`` (``scale_by_lr``) or ``c = stable_gamma / r_s``. W0 is NOT changed:
   the adapted model is not the base model at init, by design (the paper's "one step of GD").

The adapters are plain ``lora`` adapters (``loraplex.adapt(model, "lora", rank=r_i, ...)``, one call
per distinct option set), so ``loraplex.save`` / ``load`` / ``merge`` / PEFT export need nothing new.
"""
# size: GoRA's four steps (distributed gradient pre-pass, importance, allocation, init), derivation

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from loraplex.adapter import (
    Adapter,
    check_int,
    is_conv1d,
    linear_sizes,
    root_layer,
    weight_of,
)
from loraplex.inject import Targets, adapt, layers, resolve
from loraplex.options import Option, validate

IMPORTANCES = (
    "union_frobenius_norm",  # ‖W ⊙ G‖_F, the reference's default
    "union_mean",  # mean |W ⊙ G|, the example script's choice
    "union_nuc_norm",  # ‖W ⊙ G‖_*
    "grad_frobenius_norm",  # ‖G‖_F
    "grad_mean",  # mean |G|
    "grad_nuc_norm",  # ‖G‖_*
)


def layer_importance(W: Tensor, G: Tensor, kind: str = "union_frobenius_norm") -> float:
    """One layer's importance from its weight ``W`` and averaged gradient ``G``, both ``(out, in)``, in fp32."""
    M = G.float() if kind.startswith("grad_") else W.float() * G.float()
    if kind.endswith("mean"):
        return M.abs().mean().item()
    return torch.linalg.matrix_norm(M, ord="nuc" if kind.endswith("nuc_norm") else "fro").item()


def allocate(
    importances: Sequence[float], sizes: Sequence[tuple[int, int]], rank: int, r_min: int = 1, r_max: int = 9999
) -> list[int]:
    """Ranks ``r_i`` from importances and ``(in_i, out_i)`` sizes, as ``get_allocated_rank`` ("moderate").

    ``T = rank · Σ F_i`` with ``F_i = in_i + out_i``; ``r_i = round(T ŝ_i) // F_i`` with
    ``ŝ_i = I_i / Σ I``; then ``min(max(r_i, r_min), r_max)`` (the reference) and ``min(·, in_i, out_i)``
    (ours: a higher rank adds parameters but no expressiveness). Budget: before clamping
    ``Σ r_i F_i ≤ Σ round(T ŝ_i) ≤ T + L/2`` for L layers (round adds at most 1/2 each); raising a layer
    to ``r_min`` can add up to ``r_min F_i`` more, capping only removes. A zero-importance layer gets
    ``r_min``; ``r_i = 0`` (possible only with ``r_min = 0``) means "no adapter", as the reference.

    Example:
        >>> allocate([3.0, 1.0, 0.0], [(16, 16), (16, 16), (16, 16)], rank=8, r_min=2)
        [16, 6, 2]
    """
    total = sum(importances)
    if not math.isfinite(total) or total <= 0:
        raise ValueError(
            f"the importances sum to {total}: the loss must depend on the targeted layers through finite gradients"
        )
    budget = rank * sum(i + o for i, o in sizes)
    ranks = []
    for imp, (n_in, n_out) in zip(importances, sizes, strict=True):
        r = round(budget * imp / total) // (n_in + n_out)
        ranks.append(min(max(r, r_min), r_max, n_in, n_out))
    return ranks


def compress(G: Tensor, A: Tensor, coef: float) -> Tensor:
    """``B = -coef · G Aᵀ (A Aᵀ + 1e-8 I)⁺`` (fp32), so ``B A = -coef · G A⁺A`` (``grad_compress_init``).

    The minus sign is the gradient-descent direction (methods.md §12 "sign gotcha": the current
    reference file dropped it while its own check compares with ``-lr · G``). The ``r × r`` pseudo-inverse
    is taken in float64. Shapes: G (out, in), A (r, in) -> B (out, r).
    """
    gram = A.double() @ A.double().T  # (r, r)
    gram += 1e-8 * torch.eye(A.shape[0], dtype=gram.dtype, device=gram.device)
    B = (G.float() @ A.float().T).double() @ torch.linalg.pinv(gram)  # (out, r)
    return (-coef * B).float()


def _world() -> int:
    """The number of processes when torch.distributed is initialised, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _comm_device() -> torch.device:
    """Where collectives run: the current GPU under NCCL, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def average_gradients(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    n_steps: int | None = None,
) -> dict[str, Tensor]:
    """``G = Σ ∂L/∂W / n`` over the first ``n_steps`` batches (all when None), per layer name, ``(out, in)`` fp32.

    Only the named layers' root weights require grad during the pass; every ``requires_grad``
    flag and every ``.grad`` of the model is put back afterwards (even on error). The model stays
    in its current train / eval mode (the reference calls ``model.train()``: do it yourself for dropout).
    ``loss = loss_fn(model, batch)``, or ``model(**batch).loss``.
    """
    found = layers(model)
    weights: dict[str, Tensor] = {}  # the root weights as stored: (out, in), (in, out) for Conv1D
    transposed = {n: is_conv1d(root_layer(found[n])) for n in names}
    G: dict[str, Tensor] = {}
    for n in names:
        root = root_layer(found[n])
        w = root.weight
        assert isinstance(w, Tensor)
        weights[n] = w
        G[n] = torch.zeros_like(weight_of(root), dtype=torch.float32)  # (out, in)
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    count = 0
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for batch in itertools.islice(batches, n_steps):
                loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise ValueError(
                        f"the pre-pass loss must be a scalar tensor, got {type(loss).__name__}; "
                        "give batches with labels or a loss_fn(model, batch)"
                    )
                if loss.requires_grad:
                    loss.backward()
                for n, w in weights.items():
                    if w.grad is not None:
                        G[n] += (w.grad.T if transposed[n] else w.grad).float()
                    w.grad = None
                count += 1
    finally:
        for p, (flag, grad) in zip(params, saved, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
    if count == 0:
        raise ValueError("batches gave no batch: the GoRA gradient pre-pass needs at least one")
    return {n: g / count for n, g in G.items()}


# gora_init's keyword options (loraplex/options.py); loss_fn, targets, train and name are resolved where used.
GORA_OPTIONS = {
    "rank": Option("int", 8, "r_base, the average rank that sets the budget", size=True),
    "alpha": Option("float", 16.0, "LoRA alpha", positive=True),
    "n_steps": Option("int", None, "pre-pass batches (None: every batch)", optional=True),
    "importance": Option("choice", "union_frobenius_norm", "the layer importance", choices=IMPORTANCES),
    "r_min": Option("int", 1, "the smallest rank (0: a layer may get no adapter)", low=0),
    "r_max": Option("int", 9999, "the largest rank (>= r_min)"),
    "lr_g": Option("float", 5e-2, "the pre-pass step size", positive=True),
    "scale_by_lr": Option("bool", True, "scale the initial update by lr_g (else by stable_gamma)"),
    "rslora": Option("bool", False, "rank-stabilised scaling alpha / sqrt(r)"),
    "dynamic_scaling": Option("bool", True, "scale by each layer's rank (else by rank)"),
    "stable_gamma": Option("float", 0.02, "gamma without scale_by_lr", positive=True),
    "dropout": Option("prob", 0.0, "dropout on the adapters' input"),
    "seed": Option(
        "int", None, "seeds A's generator (None: from torch's RNG)", low=-(2**63), optional=True, rule="an integer"
    ),
}


def gora_init(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Targets = "all-linear",
    train: Sequence[str] = (),
    n_steps: int | None = None,
    importance: str = "union_frobenius_norm",
    r_min: int = 1,
    r_max: int = 9999,
    lr_g: float = 5e-2,
    scale_by_lr: bool = True,
    rslora: bool = False,
    dynamic_scaling: bool = True,
    stable_gamma: float = 0.02,
    dropout: float = 0.0,
    seed: int | None = None,
    name: str = "default",
) -> nn.Module:
    """Put GoRA-initialised LoRA adapters (per-layer ranks) on ``model``, in place; returns it.

    Call it before wrapping the model in DDP / FSDP and before building the optimizer, then train
    as with ``loraplex.adapt(model, "lora", ...)``. The model is NOT the base model at init
    (``ΔW0 ≠ 0``, W0 unchanged, by design); ``loraplex.disabled(model)`` gives the base. The pre-pass
    keeps ``G`` in fp32 on each weight's device (the reference moves it to the CPU) and runs in the
    model's current train / eval mode; afterwards the trainable set is ``adapt``'s (adapters + ``train``).

    Args (defaults: reference parser ``P``, example script ``E``, methods.md §12):
        batches: model-kwargs dicts (or anything ``loss_fn`` takes) for the gradient pre-pass.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
        rank: ``r_base``, the average rank that sets the budget (E: 8).
        alpha: LoRA alpha (E: 16).
        targets, train, dropout, name: as ``loraplex.adapt``.
        n_steps: pre-pass batches (E: 32); None uses every batch of ``batches``.
        importance: one of ``IMPORTANCES`` (P: ``union_frobenius_norm``; E: ``union_mean``).
        r_min, r_max: rank clamp (P: 1, 9999; E: 4, 32). ``r_min = 0`` lets a layer get no adapter.
        lr_g: the pre-pass step size ``gora_lr`` (E: 5e-2; P: 1e-3).
        scale_by_lr: ``ΔW0 = -lr_g √(in/r_i) G A⁺A`` (E: True; P: False), else ``-stable_gamma / r_s · G A⁺A``.
        rslora: ``r_s ← √r_s`` and ``s = alpha / √r_s`` (``gora_rank_stablize``; P: False, E: True).
        dynamic_scaling: ``r_s = r_i`` (True, E; the adapters are then exactly ``lora(rank=r_i, alpha)``)
            or ``r_s = rank`` (False, P: the adapter of rank ``r_i`` gets ``alpha · r_i / rank``,
            ``alpha · √(r_i / rank)`` with rslora, so that its scale is ``alpha / r_base``).
        stable_gamma: ``γ`` without ``scale_by_lr`` (P: 0.02).
        seed: seeds the generator of A (kaiming uniform, as LoRA). None draws it from the global torch
            RNG. Under torch.distributed, rank 0's seed is broadcast, G is all-reduced (averaged) and
            rank 0's ranks broadcast, so every process builds identical adapters.

    Example:
        >>> import loraplex
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        >>> batches = [{"x": torch.randn(4, 8)} for _ in range(2)]
        >>> model = gora_init(model, batches, loss_fn=lambda m, b: m(b["x"]).pow(2).mean(), rank=2, seed=0)
        >>> [a.method for _, a in loraplex.adapters(model)]  # plain LoRA, ranks from the gradients
        ['lora', 'lora']
    """
    validate(GORA_OPTIONS, locals())
    check_int("r_max", r_max, low=max(r_min, 1))
    names = resolve(model, targets)
    for n, layer in layers(model).items():  # fail before the pre-pass, not after it
        if n in names and name in {a.name for a in Adapter.stack(layer)}:
            raise ValueError(f"layer {n!r} already has an adapter named {name!r}")
    world = _world()
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())

    G = average_gradients(model, names, batches, loss_fn, n_steps)
    found = layers(model)
    dev = _comm_device() if world > 1 else None
    if dev is not None:  # every process must allocate and initialise identically
        for n in names:
            g = G[n].to(dev)
            dist.all_reduce(g)
            G[n] = g.to(G[n].device) / world
    sizes = [linear_sizes(found[n]) for n in names]
    imps = [layer_importance(weight_of(root_layer(found[n])), G[n], importance) for n in names]
    ranks = allocate(imps, sizes, rank, r_min, r_max)
    if dev is not None:
        shared = torch.tensor([*ranks, seed], dtype=torch.int64, device=dev)
        dist.broadcast(shared, src=0)
        *ranks, seed = shared.tolist()
    if not any(ranks):
        raise ValueError(f"every layer was allocated rank 0 (r_min={r_min}): no adapter to add")

    def alpha_of(r: int) -> float:
        return alpha if dynamic_scaling else alpha * (math.sqrt(r / rank) if rslora else r / rank)

    groups: dict[tuple[int, float], list[str]] = {}
    for n, r in zip(names, ranks, strict=True):
        if r > 0:
            groups.setdefault((r, alpha_of(r)), []).append(n)
    for (r, a), group in groups.items():
        pattern = "|".join(re.escape(n) for n in group)  # regex full match: exact names only
        adapt(model, "lora", targets=pattern, train=train, name=name, rank=r, alpha=a, dropout=dropout, rslora=rslora)

    gen = torch.Generator().manual_seed(seed)
    found = layers(model)
    with torch.no_grad():
        for n, r in zip(names, ranks, strict=True):
            if r == 0:
                continue
            lora = found[n]
            assert isinstance(lora, Adapter)
            ((lora_A, lora_B, s),) = lora.factor_pairs()  # GoRA's adapters are LoRAs: ΔW = s B A
            r_s = r if dynamic_scaling else rank
            coef = (
                lr_g * math.sqrt(lora.in_features / r) if scale_by_lr else stable_gamma / (r_s**0.5 if rslora else r_s)
            )
            A = torch.empty(r, lora.in_features)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)  # LoRA's default, seeded
            A = A.to(lora_A.device)
            lora_A.copy_(A)
            lora_B.copy_(compress(G.pop(n), A, coef / s))
    return model


__all__ = ["IMPORTANCES", "allocate", "average_gradients", "compress", "gora_init", "layer_importance"]
