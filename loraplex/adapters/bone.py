"""Bone (Kang): the Block Affine transformation of every r x r block of W (PEFT's MiSS ``init_weights="bat"``)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

import loraplex.options as opt
from loraplex.adapter import Adapter, is_restoring
from loraplex.options import Option, validate

# Axes: I = out / r output blocks, J = in / r input blocks; block (i, j) is W[i r:(i+1) r, j r:(j+1) r].


def block_affine(W: Tensor, T: Tensor, with_base: bool = False) -> Tensor:
    """``ΔW_ij = W_ij T_i + T_i`` (plus ``W`` when ``with_base``): W (out, in), T (I, r, r) -> (out, in).

    Row block i of W viewed as (r J, r) rows holds every row of every W_ij, so one batched product
    ``(I, r J, r) @ (I, r, r)`` gives all ``W_ij T_i`` with no permute.
    """
    n, r, _ = T.shape  # n = I output blocks
    W3 = W.to(T.dtype).reshape(n, -1, r)  # (I, r J, r)
    M = torch.baddbmm(W3, W3, T) if with_base else torch.bmm(W3, T)  # (I, r J, r)
    return M.view(n, r, -1, r).add_(T[:, :, None, :]).view(W.shape)  # + T_i on every block of row block i


def block_affine_grad(W: Tensor, T: Tensor, G: Tensor) -> Tensor:
    """``dL/dT_i = Σ_j (W_ij + I)^T G_ij`` from ``G = dL/dW'`` (out, in): -> (I, r, r)."""
    n, r, _ = T.shape  # n = I output blocks
    W3 = W.to(T.dtype).reshape(n, -1, r)  # (I, r J, r)
    return torch.bmm(W3.transpose(1, 2), G.view(n, -1, r)) + G.view(n, r, -1, r).sum(2)  # (I, r, r)


class _BlockAffineLinear(torch.autograd.Function):
    """``y = x W'^T + b`` with ``W' = W + ΔW(W, T)`` (``ΔW`` alone, no bias, when not ``with_base``).

    ``W'`` is built once in forward and kept for the input gradient (rebuilding it in backward
    would spare out·in floats per layer for out·in·r flops: 1-8% slower, measured).
    Shapes: x (N, in) in T's dtype; W (out, in) frozen; b (out,) or None; T (I, r, r).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W: Tensor, b: Tensor | None, T: Tensor, with_base: bool) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the adapter's math stays in T's dtype
            M = block_affine(W, T, with_base)  # (out, in)
            y = x @ M.T if b is None else torch.addmm(b.to(T.dtype), x, M.T)  # (N, out)
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, W, T, M)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, W, T, M = ctx.saved_tensors
        gy = gy.contiguous()
        gx = gT = None
        with torch.autocast(gy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                gx = gy @ M  # (N, in)
            if ctx.needs_input_grad[3]:
                gT = block_affine_grad(W, T, gy.T @ x)  # G = gy^T x: (out, in), the full-rank GEMM
        return gx, None, None, gT, None


class Bone(Adapter):
    """Bone: Block Affine adaptation (https://arxiv.org/abs/2409.15371 v1), as PEFT's MiSS ``"bat"``.

    W is cut into r x r blocks ``W_ij`` (i over ``out``, j over ``in``); each becomes
    ``W'_ij = W_ij (I + T_i) + T_i``: one trainable ``T_i`` per output block, shared by its row of blocks.
    ``T = 0`` at init (the base model), as PEFT. ``delta_weight() = W' - W``. PEFT ignores
    ``miss_dropout`` in this mode, so there is no dropout option.

    Forward: no exact forward avoids W' at no greater cost. ``T_i`` acts between ``W_ij`` and
    ``x_j`` and differs per output block, so ``Σ_j W_ij T_i x_j`` needs ``T_i x_j`` for every (i, j)
    and a second product with W: two extra N·in·out GEMMs, against out·in·r flops (independent of
    the N tokens) to build W' once before one GEMM. The gradient
    ``dL/dT_i = Σ_j (W_ij + I)^T G_ij`` needs every block of ``G = gy^T x`` (a full-rank GEMM, as
    full fine-tuning), since ``T_i`` couples to every ``W_ij``. So for N > r materialising is
    optimal; this layer builds W' in fp32 with one batched matmul, computes ``x W'^T + b`` in fp32
    (as PEFT, then casts to the base dtype), and keeps W' for backward.
    Measured on CPU with W' rebuilt in backward (N = 2048, r = 32, 64; 384x384, 384x1536,
    1536x384): ~1.5x the frozen layer's forward + backward (the three GEMMs of full fine-tuning),
    0.95-1.01x PEFT's time, 1.17-1.34x loraplex LoRA r = 8; it keeps one (out, in) tensor (W') for
    backward, PEFT keeps two.
    Stacked on another adapter it adds ``x ΔW^T`` to the layer below.

    Shapes: x (..., in) -> (..., out); T (out / r, r, r).

    Args:
        base: the layer to adapt.
        rank: block size r; must divide ``in_features`` and ``out_features``.

    Example:
        >>> layer = Bone(nn.Linear(16, 32), rank=4)
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 32])
    """

    method = "bone"
    reads_base_weight = True  # ΔW reads W0 (see Adapter.reads_base_weight)
    paper = "https://arxiv.org/abs/2409.15371"
    formula = "rank * out"
    # Unmeasured. PEFT's MetaMathQA benchmark trains "bat" with AdamW at 1e-4 (Llama-3.2-3B); the author's
    # JL-er/RWKV-PEFT scripts/run_bone.sh uses 2e-5 (RWKV-6 1.6B). A step of T moves ΔW_ij by ~lr (1 + sqrt(r)|W|),
    # more than LoRA's ~0.17 lr at its 1e-3 default (r = 8, in = 384), hence 2e-4, as MiSS.
    default_lr = 2e-4
    size_option = "rank"
    declared_options: ClassVar[dict[str, Option]] = {"rank": opt.rank(64, "the block size r (divides in and out)")}

    def __init__(self, base: nn.Module, *, rank: int = 64) -> None:
        super().__init__(base)
        validate(self.declared_options, {"rank": rank})
        for name, size in (("in_features", self.in_features), ("out_features", self.out_features)):
            if size % rank:
                raise ValueError(f"rank={rank} must divide {name}={size} (W is cut into rank x rank blocks)")
        self.rank = rank
        self.T = nn.Parameter(torch.zeros(self.out_features // rank, rank, rank, device=self.param_device))
        if not is_restoring():
            self.reset_parameters()

    @classmethod
    def num_params(cls, in_features: int, out_features: int, *, rank: int = 64, **_: object) -> int:
        return rank * out_features

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.T)

    peft_type = "MISS"
    peft_keys: ClassVar[tuple[str, ...]] = ("miss_block",)

    def to_peft(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        if self.transposed:
            raise ValueError("PEFT's MiSS adapts nn.Linear only, not transformers' Conv1D")
        config = {"r": self.rank, "mini_r": 1, "init_weights": "bat", "miss_dropout": 0.0}
        return config, {"miss_block": self.T.detach()}

    @classmethod
    def peft_matches(cls, config: dict[str, Any]) -> bool:
        return config.get("init_weights", True) == "bat"

    @classmethod
    def peft_options(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
        T = tensors.get("miss_block")
        if T is None or T.ndim != 3:
            raise ValueError("PEFT tensor 'miss_block' is missing or not of shape (out / r, r, r)")
        return {"rank": T.shape[-1]}

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return self.base(x)
        xf = x.reshape(-1, self.in_features).to(self.T.dtype)  # (N, in)
        if self.stacked:  # the layer below plus this adapter's own x ΔW^T
            y = self.base(x)
            own = _BlockAffineLinear.apply(xf, self.weight, None, self.T, False)
            return y + own.view(*x.shape[:-1], self.out_features).to(y.dtype)
        y = _BlockAffineLinear.apply(xf, self.weight, self.bias, self.T, True)  # (N, out)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def delta_weight(self) -> Tensor:
        return block_affine(self.weight, self.T)  # (out, in)
