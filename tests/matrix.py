"""Small deterministic models, the method cases of the property matrix, and helpers."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


class MLP(nn.Module):
    """Two hidden linears with odd sizes and a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 20)
        self.fc2 = nn.Linear(20, 18)
        self.classifier = nn.Linear(18, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """A tiny pre-norm transformer block: attention (q, k, v, o) and an MLP."""

    def __init__(self, d: int = 16, heads: int = 2, hidden: int = 40) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.classifier = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.norm1(x)
        q, k, v = (m(h).view(B, T, self.heads, -1).transpose(1, 2) for m in (self.query, self.key, self.value))
        att = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, D / heads)
        x = x + self.out(att.transpose(1, 2).reshape(B, T, D))
        x = x + self.down(F.gelu(self.up(self.norm2(x))))
        return self.classifier(x.mean(1))


class Odd(nn.Module):
    """One non-square layer whose sizes are primes, not powers of two."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(13, 29)
        self.classifier = nn.Linear(29, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.proj(x)))


class ConvNet(nn.Module):
    """Conv2d (padded), Conv2d (non-square kernel, stride, dilation), Conv1d without bias, a head (issue 11)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, (3, 2), stride=2, dilation=(1, 2))
        self.c3 = nn.Conv1d(8, 10, 3, padding=2, bias=False)
        self.classifier = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.c2(F.gelu(self.c1(x))))  # (N, 8, 4, 4)
        h = F.gelu(self.c3(h.flatten(2)))  # (N, 10, 18)
        return self.classifier(h.mean(-1))


class Embed(nn.Module):
    """A token embedding (with a padding index) and a linear, then a head (issue 11)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8, padding_idx=0)
        self.proj = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.proj(self.emb(ids))).mean(1))


def layer_input(layer: nn.Module, seed: int = 2) -> torch.Tensor:
    """An input batch for one layer (or an adapter stack on it): token ids, (N, C, L), (N, C, H, W) or (N, in)."""
    from loraplex.adapter import root_layer

    root = root_layer(layer)
    g = torch.Generator().manual_seed(seed)
    if isinstance(root, nn.Embedding):
        return torch.randint(0, root.num_embeddings, (2, 5), generator=g)
    if isinstance(root, nn.Conv1d | nn.Conv2d):
        return torch.randn(2, root.in_channels, *[9] * (root.weight.dim() - 2), generator=g)
    return torch.randn(6, layer.in_features, generator=g)


def with_weight(layer: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The root layer of ``layer`` run with weight ``W + delta`` (its own layout) on ``x``."""
    from loraplex.adapter import root_layer

    root = root_layer(layer)
    return torch.func.functional_call(root, {"weight": root.weight + delta}, (x,))


@dataclass(frozen=True)
class Model:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    vocab: int = 0  # > 0: the input is token ids below this

    def make(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def input(self, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if self.vocab:
            return torch.randint(0, self.vocab, self.input_shape, generator=g)
        return torch.randn(self.input_shape, generator=g).to(dtype)


MODELS = [
    Model("mlp", MLP, (5, 12)),
    Model("block", Block, (3, 7, 16)),
    Model("odd", Odd, (4, 13)),
    Model("conv", ConvNet, (2, 3, 9, 9)),
    Model("embed", Embed, (4, 6), vocab=11),
]
CONV_TARGETS = ("c1", "c2", "c3")


@dataclass(frozen=True)
class Case:
    """One method with options.

    ``identity``: the paper says the adapted model equals the base at init; ``stackable``: two
    adapters of this case may sit on one layer; ``models``: the matrix models whose layer sizes the
    options fit (block sizes must divide them); ``layer``: (in, out) of the single-layer checks;
    ``targets``: the layers adapted in the model checks (square-only methods pick square ones);
    ``weight_update``: the method's effect is a ΔW (False for the serial bottleneck adapter, where
    the properties built on ``delta_weight`` do not apply and merge must refuse).
    """

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    identity: bool = True
    stackable: bool = True
    models: tuple[str, ...] = ("mlp", "block", "odd")
    layer: tuple[int, int] = (13, 29)
    targets: str | tuple[str, ...] = "all-linear"
    weight_update: bool = True

    @property
    def specs(self) -> list[Model]:
        return [m for m in MODELS if m.name in self.models]

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return self.method + (f"[{opts}]" if opts else "")


CASES = [
    Case("lora", {"rank": 4, "alpha": 8}),
    Case("lora", {"rank": 3, "alpha": 5, "rslora": True, "init": "gaussian"}),
    Case("lora", {"rank": 4, "alpha": 8, "init": "pissa"}, stackable=False),
    Case("lora", {"rank": 4, "alpha": 8, "init": "olora"}, stackable=False),
    Case("dora", {"rank": 4, "alpha": 8}),
    Case("dora", {"rank": 2, "alpha": 2, "rslora": True, "dropout": 0.1}),
    Case("gralora", {"rank": 2, "alpha": 4, "k": 1, "hybrid_rank": 1}),  # 13 and 29 are prime: k = 1
    Case("gralora", {"rank": 4, "alpha": 8, "k": 2, "hybrid_rank": 2}, models=("mlp", "block"), layer=(12, 20)),
    Case("gralora", {"rank": 8, "alpha": 16, "k": 4, "dropout": 0.1}, models=("block",), layer=(16, 40)),
    Case(
        "gralora",
        {"rank": 6, "alpha": 8, "k": 2, "hybrid_rank": 2, "convention": "official"},
        models=("mlp",),
        layer=(12, 20),
    ),  # fmt: skip
    Case("c3a", {"block_size": 1}, identity=False),  # xavier init (PEFT's default) is not the base
    Case("c3a", {"block_size": 2, "init": "zeros"}, models=("mlp",), layer=(12, 20)),
    Case("c3a", {"block_size": 8, "init": "gaussian"}, identity=False, models=("block",), layer=(16, 40)),
    Case("miss", {"rank": 4}),
    Case("miss", {"rank": 3, "variant": "mini", "mini_r": 1, "dropout": 0.1}),  # 29 is prime: mini_r=1 fits all
    Case("miss", {"rank": 5, "init": "kaiming"}, identity=False),
    Case("bone", {"rank": 1}),  # the only rank dividing 13 and 29
    Case("bone", {"rank": 2}, models=("mlp", "block"), layer=(12, 20)),
    Case("bone", {"rank": 4}, models=("block",), layer=(16, 40)),
    Case("loldu", {"rank": 4, "alpha": 2.0}),
    Case("loldu", {"rank": 12, "init": "normal"}, identity=False),  # rank = min(in, out) of fc1
    Case("singlora", {"rank": 4, "alpha": 4, "ramp_steps": 2}),  # u(0) = 0: the base at init
    Case("singlora", {"rank": 3, "ramp_steps": 0, "init": "gaussian", "rslora": True}, identity=False),  # no ramp
    Case("bora", {"rank": 4, "alpha": 8}),
    Case("bora", {"rank": 2, "alpha": 2, "rslora": True, "dropout": 0.1, "init": "gaussian"}),
    Case("kronecker", {}),  # factor chosen per layer (1 for 13 -> 29: a rank-1 outer product)
    Case("kronecker", {"factor": 2, "alpha": 2.0, "dropout": 0.1}, models=("mlp", "block"), layer=(12, 20)),
    Case("kronecker", {"factor": 4}, models=("block",), layer=(16, 40)),
    Case("loha", {"rank": 4, "alpha": 8}),  # Khatri-Rao path on these sizes
    Case("loha", {"rank": 8, "rank_dropout": 0.1, "module_dropout": 0.1, "init": "kaiming"}, identity=False),  # dense
    Case("lokr", {}),  # rank 8: full w1 and w2 on mlp / block, w2 factored on 13 -> 29
    Case("lokr", {"rank": 1, "alpha": 2, "decompose_both": True, "init": "lycoris", "rank_dropout": 0.1}),
    Case("lokr", {"rank": 2, "decompose_factor": 2, "init": "kaiming", "module_dropout": 0.1}, identity=False),
    Case("lokh", {}),
    Case("lokh", {"rank": 2, "alpha": 1.0, "decompose_factor": 2, "init": "lycoris"}),
    Case("lokh", {"rank": 3, "init": "random"}, identity=False),
    # SURM circulant / Toeplitz / LDR LoRA: square layers only (block's 16x16 attention projections).
    Case("circulant", {}, models=("block",), layer=(16, 16), targets=("query", "key", "value", "out")),
    Case(
        "circulant",
        {"product": False, "alpha": 2.0, "dropout": 0.1},
        models=("block",),
        layer=(16, 16),
        targets=("query", "key", "value", "out"),
    ),
    Case("toeplitz", {}, models=("block",), layer=(16, 16), targets=("query", "key", "value", "out")),
    Case("toeplitz", {"alpha": 0.5, "dropout": 0.1}, models=("block",), layer=(16, 16), targets=("query", "value")),
    Case("ldr", {}, models=("block",), layer=(16, 16), targets=("query", "key", "value", "out")),
    Case(
        "ldr",
        {"displacement_rank": 3, "alpha": 2.0, "dropout": 0.1},
        models=("block",),
        layer=(16, 16),
        targets=("query", "key", "value", "out"),
    ),
    # The serial bottleneck adapter acts on each layer's output (out x out), so every layer fits every structure.
    Case("adapter", {}, stackable=False, weight_update=False),
    Case("adapter", {"bottleneck": 4, "activation": "relu", "dropout": 0.1}, stackable=False, weight_update=False),
    Case("adapter", {"structure": "circulant"}, stackable=False, weight_update=False),
    Case(
        "adapter",
        {"structure": "circulant", "product": False, "activation": "silu"},
        stackable=False,
        weight_update=False,
    ),
    Case("adapter", {"structure": "toeplitz", "activation": "tanh"}, stackable=False, weight_update=False),
    Case("adapter", {"structure": "toeplitz", "product": False, "dropout": 0.1}, stackable=False, weight_update=False),
    Case("adapter", {"structure": "kronecker"}, stackable=False, weight_update=False),  # 29 is prime: factor 1
    Case(
        "adapter",
        {"structure": "kronecker", "factor": 2, "activation": "linear"},
        stackable=False,
        weight_update=False,
        models=("mlp", "block"),
        layer=(12, 20),
    ),
    Case("adalora", {"rank": 4, "alpha": 32}),  # E = 0: the base at init (A, B move from step 2 on)
    Case("adalora", {"rank": 12, "alpha": 64.0, "dropout": 0.1}),  # rank > min(in, out) of fc1; PEFT's alpha=8 moves
    # the output by < 1e-4 in 3 steps (A, B ~ N(0, 0.02²), E = 0), too little for the switch-off test
    Case("elalora", {"rank": 4, "alpha": 32}),  # E = 0: the base at init; a larger alpha than the default 16, as
    # for adalora (E = 0 and A, B ~ N(0, 0.02²) move the output slowly)
    Case("elalora", {"rank": 10, "alpha": 64.0, "dropout": 0.1, "current_rank": 3}),  # resized: scale uses r0 = 10
    Case("ardlora", {"rank": 4, "alpha": 8}),  # heads=1: one rank scale per layer
    Case(
        "ardlora",
        {"rank": 3, "heads": 2, "temperature": 0.25, "dropout": 0.1},
        models=("block",),
        layer=(16, 16),
        targets=("query", "key", "value", "out"),
    ),
    # Issue 11: convolutions (LoRA, DoRA, LoHa, LoKr) and embeddings (LoRA), named explicitly.
    Case("lora", {"rank": 2, "alpha": 4}, models=("conv",), targets=CONV_TARGETS),
    Case("lora", {"rank": 3, "alpha": 6, "dropout": 0.1}, models=("embed",), targets=("emb", "proj")),
    Case("dora", {"rank": 2, "alpha": 4, "dropout": 0.1}, models=("conv",), targets=CONV_TARGETS),
    Case("loha", {"rank": 2, "alpha": 4, "rank_dropout": 0.1}, models=("conv",), targets=CONV_TARGETS),
    Case("lokr", {"rank": 2, "alpha": 4}, models=("conv",), targets=CONV_TARGETS),  # full w1, factored w2 on c3
]

# Per-method tolerance overrides (fp32 unless stated); the default covers every method not listed.
TOL: dict[str, dict[str, float]] = {
    "default": {"rtol": 1e-5, "atol": 1e-5},
    "lora[init=pissa]": {"rtol": 1e-4, "atol": 1e-4},  # W0 - sB0A0 + sB0A0 loses low bits of W0
    "lora[init=olora]": {"rtol": 1e-4, "atol": 1e-4},
}


def tol(case: Case) -> dict[str, float]:
    key = f"{case.method}[{','.join(f'{k}={v}' for k, v in case.options.items() if k == 'init')}]"
    return TOL.get(key, TOL["default"])


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 3, scale: float = 0.2) -> None:
    """Move every adapter parameter away from its init, deterministically (non-identity init)."""
    import loraplex

    g = torch.Generator().manual_seed(seed)
    for _, a in loraplex.adapters(model):
        for _, p in a.own_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def import_from_peft(theirs: nn.Module, base: nn.Module, path: Path) -> nn.Module:
    """Move a PEFT model's trainable parameters off their init, save it, import it into a copy of ``base``."""
    import loraplex

    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(path)
    return loraplex.import_peft(copy.deepcopy(base), path)


def export_to_peft(ours: nn.Module, base: nn.Module, path: Path) -> nn.Module:
    """``loraplex.export_peft`` then ``peft.PeftModel.from_pretrained`` on a copy of ``base``."""
    import peft

    import loraplex

    loraplex.export_peft(ours, path)
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), path)
