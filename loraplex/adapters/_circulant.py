"""Block-circulant products by real FFTs: pure kernels for C3A and other circulant methods.

A kernel ``w`` of shape ``(m, n, b)`` stands for the block-circulant matrix ``C(w)`` of shape
``(m·b, n·b)`` whose block ``(i, j)`` is ``C_ij[r, c] = w[i, j, (c - r) mod b]``: first row
``w[i, j]``, each next row shifted right by one. The product ``z = x C(w)^T`` is, block by block, a
sum of circular cross-correlations, ``z_i[t] = Σ_j Σ_s x_j[s] w_ij[(s - t) mod b]``, which real
FFTs (``X = rfft(x)``) diagonalise: ``Z_i = Σ_j X_j ⊙ conj(W_ij)``, a complex ``(N, n) @ (n, m)``
matmul per frequency. Gradients: ``gx_j = irfft(Σ_i G_i ⊙ W_ij)`` (a convolution) and
``gw_ij = irfft(Σ_N conj(G_i) ⊙ X_j)``.

Axis legend: N rows (tokens), n = in / b input blocks, m = out / b output blocks,
F = b // 2 + 1 frequencies. Spectra are laid out frequency first, ``(F, N, k)``, so that each
frequency's sum over blocks is one matrix of a batched matmul (BLAS wants unit-stride rows or
columns; rfft's natural ``(N, k, F)`` gives neither).

Choices measured on CPU (N = 2048; 384 and 1536 wide; b = 64, 128): ``torch.matmul`` on
frequency-first spectra beats ``einsum`` (which permutes as well and leaves irfft a strided
input, 5-10x slower to transform), ties or beats real ``(F, N, 2n) @ (F, 2n, 2m)`` block matmuls,
and beats DFTs written as GEMMs (no permutes, but ``N·in·b`` multiply-adds) by about 1.5x.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.fft import irfft, rfft


def circulant(w: Tensor) -> Tensor:
    """The dense ``C(w)``, exactly (copies of kernel entries, no FFT rounding): (m, n, b) -> (m·b, n·b).

    Block ``(i, j)`` is the Hankel matrix ``H[r, c] = ww[1 + r + c]`` of the doubled kernel
    ``ww = [w, w]`` (a strided view) with its rows reversed: one copy, 7x faster than gathering
    with a ``(c - r) mod b`` index tensor (m = n = 6, b = 64).
    """
    m, n, b = w.shape
    ww = torch.cat([w, w], dim=-1)  # (m, n, 2b), contiguous
    hankel = ww.as_strided((m, b, n, b), (n * 2 * b, 1, 2 * b, 1), ww.storage_offset() + 1)
    rows = torch.arange(b - 1, -1, -1, device=w.device)
    return torch.index_select(hankel, 1, rows).view(m * b, n * b)  # (m, b, n, b) -> (out, in)


def _spectrum(v: Tensor, k: int, b: int, conj: bool = False) -> Tensor:
    """rfft of each length-b block, frequency first, conjugated if asked: (N, k·b) -> (F, N, k).

    Returned contiguous and without a lazy conjugate bit: ``bmm`` given a strided or conjugated
    complex operand copies it one frequency at a time (3x slower, measured); the one copy here
    does the permute and the conjugation together.
    """
    Z = rfft(v.reshape(-1, k, b)).permute(2, 0, 1)  # (F, N, k), strided view
    return torch.empty(Z.shape, dtype=Z.dtype, device=Z.device).copy_(Z.conj() if conj else Z)


def _signal(Z: Tensor, b: int) -> Tensor:
    """Inverse of ``_spectrum``: (F, N, k) -> (N, k·b); irfft wants its input contiguous."""
    _, N, k = Z.shape
    return irfft(Z.permute(1, 2, 0).contiguous(), n=b).view(N, k * b)


def _kernel_grad(G: Tensor, x: Tensor, n: int, b: int) -> Tensor:
    """``gw_ij = irfft(Σ_N conj(G_i) ⊙ X_j)`` from the output-gradient spectrum G (F, N, m): (m, n, b).

    Computed as the conjugate of ``Σ_N G_i ⊙ conj(X_j)``, so that the conjugation rides on the
    copy that lays ``X`` out frequency first.
    """
    H = _spectrum(x, n, b, conj=True).mT @ G  # (F, n, N) @ (F, N, m) -> (F, n, m) = conj(GW)^T
    return irfft(H.permute(2, 1, 0).conj_physical(), n=b)  # (m, n, F) -> (m, n, b)


class _BlockCirculant(torch.autograd.Function):
    """``z = s · x C(w)^T`` by FFT, in ``promote(x.dtype, w.dtype, float32)``, returned in ``x.dtype``.

    The float32 floor matters when the kernel is half too (``model.half()`` after adapting): CPU FFTs
    refuse fp16 / bf16 (a RuntimeError), and half-precision spectra overflow (sums of ``b`` products).

    Saves only ``x`` (the caller's tensor, whatever its dtype) and ``w``: no spectra, no fp32
    copy of a half-precision input; ``rfft(x)`` is recomputed in backward.
    Shapes: x (N, n·b); w (m, n, b) -> (N, m·b).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, s: float) -> Tensor:
        m, n, b = w.shape
        dtype = torch.promote_types(torch.promote_types(x.dtype, w.dtype), torch.float32)  # fp32 for half models
        ctx.save_for_backward(x, w)
        ctx.s, ctx.dtype = s, dtype
        if x.shape[0] == 0:  # MKL's FFT refuses empty batches
            return x.new_zeros(0, m * b)
        Wc = rfft(w.to(dtype)).conj_physical().mul_(s).permute(2, 1, 0).contiguous()  # (F, n, m)
        Z = _spectrum(x.to(dtype), n, b) @ Wc  # (F, N, n) @ (F, n, m) -> (F, N, m)
        return _signal(Z, b).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        m, n, b = w.shape
        s, dtype = ctx.s, ctx.dtype
        if x.shape[0] == 0:
            return torch.zeros_like(x), torch.zeros_like(w), None
        G = _spectrum(g.to(dtype), m, b)  # (F, N, m), used twice
        gx = gw = None
        if ctx.needs_input_grad[0]:
            Wf = rfft(w.to(dtype)).mul_(s).permute(2, 0, 1).contiguous()  # (F, m, n)
            gx = _signal(G @ Wf, b).to(x.dtype)  # (F, N, n) -> (N, n·b)
        if ctx.needs_input_grad[1]:
            gw = _kernel_grad(G, x.to(dtype), n, b).mul_(s).to(w.dtype)
        return gx, gw, None


class _CirculantLinear(torch.autograd.Function):
    """``y = x (W + s C(w))^T + bias`` over a frozen ``W``: one GEMM forward, one GEMM for ``gx``.

    Forward and input gradient are the base layer's own products, with the merged weight (built
    exactly, ``in·out`` memory work against the GEMMs' ``N·in·out`` multiply-adds), so only the
    kernel gradient costs extra, by FFT (in at least fp32, as ``_BlockCirculant``, returned in ``w``'s
    dtype). Saves ``x``, ``W`` and ``w``; the merged weight is rebuilt in backward rather than kept.
    Shapes: x (N, n·b); W (m·b, n·b); bias (m·b,) or None; w (m, n, b) -> (N, m·b).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W: Tensor, bias: Tensor | None, w: Tensor, s: float) -> Tensor:
        ctx.save_for_backward(x, W, w)
        ctx.s = s
        merged = torch.add(W, circulant(w), alpha=s)  # (out, in)
        return x @ merged.T if bias is None else torch.addmm(bias, x, merged.T)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, W, w = ctx.saved_tensors
        m, n, b = w.shape
        g = g.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = g @ torch.add(W, circulant(w), alpha=ctx.s)  # (N, in)
        if ctx.needs_input_grad[3] and x.shape[0] == 0:
            gw = torch.zeros_like(w)
        elif ctx.needs_input_grad[3]:
            dt = torch.promote_types(g.dtype, torch.float32)  # CPU FFTs refuse half types
            gw = _kernel_grad(_spectrum(g.to(dt), m, b), x.to(dt), n, b).mul_(ctx.s).to(w.dtype)  # (m, n, b)
        return gx, None, None, gw, None


def block_circulant_matmul(x: Tensor, w: Tensor, scale: float = 1.0) -> Tensor:
    """``scale · x C(w)^T`` by real FFTs, computed in at least fp32: (..., n·b) -> (..., m·b).

    Example:
        >>> w = torch.randn(2, 3, 4)  # C(w) is (8, 12)
        >>> x = torch.randn(5, 12)
        >>> torch.allclose(block_circulant_matmul(x, w), x @ circulant(w).T, atol=1e-5)
        True
    """
    m, n, b = w.shape
    z = _BlockCirculant.apply(x.reshape(-1, n * b), w, scale)
    return z.view(*x.shape[:-1], m * b)


def circulant_linear(x: Tensor, W: Tensor, bias: Tensor | None, w: Tensor, scale: float) -> Tensor:
    """``x (W + scale · C(w))^T + bias`` in one autograd node; frozen W, one dtype: (..., in) -> (..., out)."""
    y = _CirculantLinear.apply(x.reshape(-1, x.shape[-1]), W, bias, w, scale)
    return y.view(*x.shape[:-1], W.shape[0])
