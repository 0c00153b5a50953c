"""Fused kernels shared by adapters: pure functions of tensors.

``lowrank_linear`` computes LoRA's and DoRA's whole layer in one autograd node. Written with plain
autograd, a LoRA layer costs 1.59x the frozen linear's forward + backward on CPU (N = 512 tokens,
384 -> 1536); this node costs 1.30x, because it (1) adds the low-rank product into the base GEMM's
output buffer (``addmm_``) instead of allocating a sum, (2) adds the low-rank input gradient into
the base input gradient in place, and (3) orders the skinny products so BLAS reads the big
``(N, out)`` gradient row-major: ``B^T gy^T`` and ``h^T gy`` run 2.3x and 4x faster than the
``gy B`` and ``gy^T h`` that autograd's ``mm`` backward picks (measured, see benchmarks/).

DoRA builds ``V = W + s B A`` for its norm anyway, so with many rows its node multiplies by ``V``
(one GEMM each way, no in-place low-rank passes): MiniLM 32 x 32 on CPU, DoRA went from 1.22x to
1.05x LoRA's step. The same merged product for LoRA itself (building ``V`` per step) measured no faster than the
skinny products (1.226x vs 1.225x the frozen model), so LoRA keeps them: it needs no ``(out, in)``
work per step, which wins for small batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _LowRankLinear(torch.autograd.Function):
    """``y = g ⊙ (x W^T + s (x A^T) B^T) + b`` with ``g = m ⊙ inv_norm`` (DoRA) or ``g = 1`` (LoRA).

    Shapes: x (N, in); W (out, in) frozen; b (out,) frozen or None; A (r, in); B (out, r);
    m, inv_norm (out,) or None (DoRA's inv_norm is detached, its norm a constant; BoRA's carries m_col's
    gradient through its column gain, and gets one).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, s: float,
                m: Tensor | None, inv_norm: Tensor | None, V: Tensor | None) -> Tensor:  # fmt: skip
        ctx.s, ctx.by_v = s, False
        if m is None:
            hT_lora = A @ x.T  # (r, N): 1.3-1.5x faster than x @ A.T on CPU
            y = x @ W.T if b is None else torch.addmm(b, x, W.T)  # (N, out): the base GEMM
            y.addmm_(hT_lora.T, B.T, alpha=s)  # low-rank product added in place
            ctx.save_for_backward(x, W, A, B, hT_lora, None, None, None)
            return y
        # DoRA: with many rows, one GEMM by the direction V = W + s B A (built for the norm anyway) replaces
        # the skinny x A^T and the in-place add (x A^T moves to backward, for B's gradient). Break-even
        # measured on CPU: MiniLM (N = 1024, 384 <-> 1536) 1.22x -> 1.05x LoRA's step; one 1024-wide
        # layer at N = 512, where V costs as much as the skinny products, 1.08x -> 1.18x: so only when
        # N (in + out) >= 2 in out, i.e. when the (N, ·) passes it saves outweigh V's (out, in) ones.
        assert inv_norm is not None
        n_out, n_in = W.shape
        by_v = x.shape[0] * (n_in + n_out) >= 2 * n_in * n_out
        hT: Tensor | None = None
        if by_v:
            z = x @ (torch.addmm(W, B, A, alpha=s) if V is None else V).T  # (N, out), kept for m's gradient
        else:
            hT = A @ x.T  # (r, N)
            z = x @ W.T
            z.addmm_(hT.T, B.T, alpha=s)
        g = m * inv_norm  # (out,)
        y = torch.mul(z, g) if b is None else torch.addcmul(b, z, g)
        ctx.save_for_backward(x, W, A, B, hT, m, inv_norm, z)  # V is recomputed: no (out, in) copy kept
        ctx.by_v = by_v
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, W, A, B, hT, m, inv_norm, z = ctx.saved_tensors
        s = ctx.s
        gy = gy.contiguous()  # attention hands back permuted gradients; every product below wants rows
        gm = ginv = None
        if m is not None:
            if ctx.needs_input_grad[6] or ctx.needs_input_grad[7]:
                gz = (gy * z).sum(0)  # (out,): the gradient of the gain g = m ⊙ inv_norm
                gm = gz * inv_norm if ctx.needs_input_grad[6] else None
                ginv = gz * m if ctx.needs_input_grad[7] else None  # BoRA: its row norm depends on m_col
            gy = gy * (m * inv_norm)
        ghT = (B.T * s).contiguous() @ gy.T  # (r, N): B^T gy^T reads gy row-major
        gA = ghT @ x if ctx.needs_input_grad[3] else None  # (r, in)
        gB = None
        if ctx.needs_input_grad[4]:
            if hT is None:
                hT = A @ x.T  # (r, N)
            gB = (hT @ gy).T.mul(s).contiguous()  # (out, r)
        gx = None
        if ctx.needs_input_grad[0]:
            if ctx.by_v:
                gx = gy @ torch.addmm(W, B, A, alpha=s)  # (N, in): by V, no second pass over gx
            else:
                gx = gy @ W  # (N, in)
                gx.addmm_(ghT.T, A)
        return gx, None, None, gA, gB, None, gm, ginv, None


def lowrank_linear(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    A: Tensor,
    B: Tensor,
    s: float,
    m: Tensor | None = None,
    inv_norm: Tensor | None = None,
    V: Tensor | None = None,
) -> Tensor:
    """Fused LoRA (``m is None``) or DoRA layer over a frozen ``W``: x (..., in) -> (..., out).

    ``V``: DoRA's direction ``W + s B A`` (out, in) where the caller has built it already (no grad);
    computed here otherwise.
    """
    lead = x.shape[:-1]
    y = _LowRankLinear.apply(x.reshape(-1, x.shape[-1]), W, b, A, B, s, m, inv_norm, V)
    return y.view(*lead, W.shape[0])


def can_fuse(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor) -> bool:
    """The fused node assumes a frozen base, one dtype throughout and no autocast."""
    return (
        not W.requires_grad
        and (b is None or not b.requires_grad)
        and x.dtype == W.dtype == A.dtype
        and not torch.is_autocast_enabled(x.device.type)
    )
