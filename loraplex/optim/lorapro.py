"""LoRA-Pro (Wang et al., ICLR 2025): LoRA gradients adjusted so that the low-rank step best matches full fine-tuning.

Paper: https://arxiv.org/abs/2407.18242; reference code ``mrflogs/LoRA-Pro`` (its DeepSpeed patch,
``lorapro_full_adjustment`` / ``solve_sylvester``). Math: /work/shared/docs/methods.md section 5.

LoRA ``W = W0 + s B A`` with ``A (r, in)``, ``B (out, r)``; the full gradient ``g = dL/dW (out, in)`` gives
``g_A = s B^T g`` and ``g_B = s g A^T``. A step ``(dA, dB)`` moves W by the *equivalent gradient*
``s B dA + s dB A``. LoRA-Pro picks the ``(g^A, g^B)`` whose equivalent gradient is closest to ``g`` in
Frobenius norm (and, among those, closest to the raw ``(g_A, g_B)``)::

    g^A = (1/s²) (BᵀB)⁻¹ g_A + X A
    g^B = (1/s²) (I − B (BᵀB)⁻¹ Bᵀ) g_B (AAᵀ)⁻¹ − B X
    (BᵀB) X + X (AAᵀ) = −(1/s²) (BᵀB)⁻¹ g_A Aᵀ        (Sylvester, X (r, r))

The resulting equivalent gradient is ``P_B g + g P_A − P_B g P_A`` (projections on B's columns and A's rows),
independent of X. ``g`` itself is never needed: ``g_A`` and ``g_B`` suffice.

Decisions (where the reference is unclear or wrong):

* The adapter's real ``scale`` is used (the reference hard-codes ``16 / 8 = 2``, wrong for rsLoRA).
* Step-0 case: the reference switches on "global step 0"; here on "B is exactly zero" (BᵀB singular), which is
  step 0 for zero-init LoRA and stays correct for PiSSA/OLoRA (B ≠ 0 at step 0, general formula). Then
  ``g^A = g_A``, ``g^B = (1/s²) g_B (AAᵀ)⁻¹``, as the reference.
* Inverses ``(M + ridge I)⁻¹`` (the reference: ``pinv(M + 1e-8 I)``), ridge 1e-8 by default; the Sylvester
  equation by the eigendecompositions of the symmetric PSD ``BᵀB`` and ``AAᵀ`` (real ``eigh``, the reference uses a
  complex ``eig``), eigenvalues clamped at 0, denominators ``p_i + q_j + ridge``. All r x r algebra in float64 on
  CPU and fp32 on GPU (never bf16); the (out, in) products in the factors' dtype, at least fp32.
* Which adapters: those that declare ``Adapter.factor_blocks`` (``ΔW = Σ s B A`` exactly: LoRA with any
  init, GoRA's LoRA, GraLoRA's grid and hybrid pair), never guessed from attribute names. By default
  (``others="refuse"``) any other adapter that trains is a ``ValueError`` naming its layer and method:
  DoRA / BoRA (``ΔW`` rescaled by magnitudes), Kronecker (``s kron(B, A)``), ARD-LoRA (``B diag(m) A``),
  AdaLoRA, ... have parameters called A and B, but LoRA-Pro's formula does not describe them, and
  stepping them as if it did was silently wrong (Kronecker) or crashed on a shape (``ardlora heads=2``).
  ``others="adamw"`` steps such adapters with plain AdamW (not LoRA-Pro) alongside. Non-adapter
  parameters (a classifier head) always go to AdamW.
* Stacked factorized adapters on one layer are adjusted pair by pair (each pair's own best step).
* GraLoRA is supported: its k x k blocks are LoRAs ``s B_ij A_ij`` (one scale) on disjoint slices of its
  parameters (:func:`split_blocks`), adjusted block by block, which is exact (the problem separates). Its
  hybrid LoRA, if any, is one more pair adjusted on its own (an approximation, as for stacked adapters).
* DDP: the adjustment uses the gradients in ``.grad`` at ``step()``; under DDP they are already all-reduced, so
  every rank computes the same update and no extra communication is needed.
"""
# size: the paper's math in the docstring, Sylvester solve, GraLoRA blocks, full and low modes

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw

from loraplex.inject import adapters
from loraplex.options import Option, validate

MODES = ("full", "low")
OTHERS = ("refuse", "adamw")


def _solve_dtype(t: Tensor) -> torch.dtype:
    """float64 on CPU, fp32 (or float64 if given) on an accelerator: never a half type."""
    return torch.float64 if t.device.type == "cpu" or t.dtype == torch.float64 else torch.float32


def _work_dtype(t: Tensor) -> torch.dtype:
    """The dtype of the (out, in) products: the factors' dtype, at least fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _inv(M: Tensor, ridge: float) -> Tensor:
    """``(M + ridge I)⁻¹`` of a symmetric PSD r x r matrix, in M's dtype (the reference: ``pinv``)."""
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    return torch.linalg.pinv(M + ridge * eye, hermitian=True)


def solve_sylvester(P: Tensor, Q: Tensor, C: Tensor, ridge: float = 1e-8) -> Tensor:
    """X with ``P X + X Q = C`` for symmetric PSD P (r, r), Q (r', r'); C, X (r, r').

    ``P = U diag(p) Uᵀ``, ``Q = V diag(q) Vᵀ``: ``X = U [(Uᵀ C V)_ij / (p_i + q_j + ridge)] Vᵀ``, eigenvalues
    clamped at 0 (rounding). Computed in float64 on CPU / fp32 on GPU, returned in C's dtype.

    Singular operator (``ridge = 0`` with both P and Q singular, e.g. rank-deficient B and A): the
    denominators ``p_i + q_j + ridge`` are the operator's eigenvalues, and, as ``torch.linalg.pinv`` does
    for the Gram inverses, those ``<= eps · r · r' · max`` count as zero and their entries of Y are 0 (the
    minimum-norm least-squares X). Dividing by them gave ``0 / 0 = NaN``.

    Example:
        >>> P, Q = torch.eye(2, dtype=torch.float64), 2 * torch.eye(2, dtype=torch.float64)
        >>> solve_sylvester(P, Q, 3 * torch.eye(2, dtype=torch.float64), ridge=0.0)
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.float64)
    """
    dt = _solve_dtype(C)
    p, U = torch.linalg.eigh(P.to(dt))
    q, V = torch.linalg.eigh(Q.to(dt))
    F = U.T @ C.to(dt) @ V
    den = p.clamp_min(0)[:, None] + q.clamp_min(0)[None, :] + ridge  # (r, r'): the operator's eigenvalues
    kept = den > torch.finfo(dt).eps * den.numel() * den.max()  # pinv's default cutoff
    Y = torch.where(kept, F / torch.where(kept, den, 1.0), 0.0)
    return (U @ Y @ V.T).to(C.dtype)


def equivalent_grad(A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, s: float) -> Tensor:
    """``s B gA + s gB A`` (out, in): how a step ``(gA, gB)`` on ``(A (r, in), B (out, r))`` moves ``W``."""
    return s * (B @ gA + gB @ A)


def adjusted_grads(
    A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, s: float, ridge: float = 1e-8, *, sylvester: bool = True
) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's closed-form adjusted gradients ``(g^A (r, in), g^B (out, r))`` from the raw ``g_A``, ``g_B``.

    See the module docstring for the formula; when B is exactly zero (step 0 of a zero-init LoRA) it is
    ``g^A = g_A``, ``g^B = (1/s²) g_B (AAᵀ)⁻¹``. r x r algebra in float64 (CPU) / fp32 (GPU); returned in gA's
    dtype. ``sylvester=False`` takes X = 0 (the full mode's step 1: the equivalent gradient does not depend on X).
    """
    dt, out = _solve_dtype(A), gA.dtype
    A64, B64, gA64, gB64 = (t.to(dt) for t in (A, B, gA, gB))
    AAt_inv = _inv(A64 @ A64.T, ridge)  # (r, r)
    if not bool(B.any()):
        return gA, ((gB64 @ AAt_inv) / s**2).to(out)
    BtB = B64.T @ B64
    BtB_inv = _inv(BtB, ridge)
    if sylvester:
        X = solve_sylvester(BtB, A64 @ A64.T, -(BtB_inv @ gA64 @ A64.T) / s**2, ridge)  # (r, r)
    else:
        X = torch.zeros_like(BtB)
    new_A = (BtB_inv @ gA64) / s**2 + X @ A64
    gB_proj = gB64 - B64 @ (BtB_inv @ (B64.T @ gB64))  # (I − P_B) g_B without the (out, out) projector
    new_B = (gB_proj @ AAt_inv) / s**2 - B64 @ X
    return new_A.to(out), new_B.to(out)


def _pairs(model: nn.Module, others: str = "refuse") -> list[tuple[nn.Parameter, nn.Parameter, float, int]]:
    """``(A, B, scale, k)`` of every adapter term of ``model`` (``Adapter.factor_blocks``) whose factors both train.

    ``k = 0`` for a pair of ``factor_pairs`` (A (r, in), B (out, r), ``ΔW = s B A``); ``k`` for a GraLoRA grid
    (blocks_A (k, in / k, r), blocks_B (k, r, out / k)), whose hybrid LoRA, if any, is one more pair with ``k = 0``.
    An adapter with trainable parameters that declares no such terms (DoRA, Kronecker, ARD-LoRA, ...) is a
    ``ValueError`` naming its layer and method (``others="refuse"``), or left to AdamW (``others="adamw"``).
    A declaring adapter whose A or B is frozen is left to AdamW (its trainable factor, if any).
    """
    out: list[tuple[nn.Parameter, nn.Parameter, float, int]] = []
    for layer, a in adapters(model):
        terms = a.factor_blocks()
        if not terms and others == "refuse" and any(p.requires_grad for _, p in a.own_parameters()):
            raise ValueError(
                f"LoRAPro: layer {layer!r} ({a.method}) has no factor pairs (ΔW is not s·B@A); LoRA-Pro's "
                "adjustment holds only for adapters with ΔW = Σ s·B@A (lora and its inits, gralora). Pass "
                "others='adamw' to step such adapters with plain AdamW instead"
            )
        out.extend((A, B, float(s), k) for A, B, s, k in terms if A.requires_grad and B.requires_grad)
    return out


def split_blocks(A: Tensor, B: Tensor, k: int) -> list[tuple[Tensor, Tensor, slice, slice]]:
    """The LoRA pairs ``(A_ij (r / k, in / k), B_ij (out / k, r / k), rows, cols)`` of a GraLoRA grid, as views.

    ``ΔW[rows, cols] = s B_ij A_ij`` with ``A_ij = blocks_A[j, :, i-th r/k]ᵀ``, ``B_ij = blocks_B[i, j-th r/k, :]ᵀ``
    (see loraplex/adapters/gralora.py). Every element of A and B lies in exactly one block, so the same views of
    the gradients are the blocks' LoRA gradients, and ``min ‖g̃ − g‖_F`` splits into one LoRA-Pro problem per
    block: LoRA-Pro on GraLoRA is exact block by block. ``k = 0``: the plain pair ``(A, B)`` over all of W.
    """
    if not k:
        return [(A, B, slice(None), slice(None))]
    _, n_in, r = A.shape
    t, n_out = r // k, B.shape[2]
    return [
        (A[j, :, i * t : (i + 1) * t].T, B[i, j * t : (j + 1) * t, :].T,
         slice(i * n_out, (i + 1) * n_out), slice(j * n_in, (j + 1) * n_in))
        for i in range(k) for j in range(k)
    ]  # fmt: skip


class LoRAPro(torch.optim.Optimizer):
    """LoRA-Pro (https://arxiv.org/abs/2407.18242) for every factorised adapter of ``model``; AdamW elsewhere.

    Param groups: one per adapter, ``[A, B]`` with its ``scale`` and ``k`` (GraLoRA's grid size, 0 for a plain
    pair; adjusted together), then one group (``pair`` False) with every other trainable parameter (classifier
    head; with ``others="adamw"``, adapters without factor pairs) stepped by torch's AdamW with the same
    hyper-parameters. Groups' ``lr`` / ``weight_decay`` may be changed afterwards (schedulers work).

    ``mode="full"`` is the paper's AdamW variant (methods.md steps 1-5), per layer and step:
    (1) ``g̃`` = equivalent gradient of the adjusted raw gradients; (2) Adam moments on the full (out, in) ``g̃``
    (``exp_avg``, ``exp_avg_sq``: 2 out·in floats per layer, as the paper), ``ĝ = m̂ / (√v̂ + eps)``, bias-corrected;
    (3) pseudo LoRA gradients ``s Bᵀ ĝ``, ``s ĝ Aᵀ``; (4) their adjusted gradients (with the Sylvester X);
    (5) ``p ← p (1 − lr wd) − lr g^p`` (the reference's SGD application, plus AdamW's decoupled decay).

    ``mode="low"`` (this library's memory-light variant, not in the paper): the raw gradients are adjusted
    (with X), then AdamW runs on the adjusted ``g^A``, ``g^B`` themselves, moments of r (in + out) floats per
    layer. Approximation: Adam's element-wise normalisation is applied in the factor coordinates, so the step on
    W is no longer "Adam on the full gradient, then projected"; what is kept is LoRA-Pro's direction per step
    (the best low-rank match of g, with the (1/s²) Gram rescaling that the normalisation then evens out), and
    Adam's per-coordinate step size. It costs what LoRA + AdamW costs plus a few r x r decompositions.

    DDP: the gradients read from ``.grad`` at ``step()`` are already all-reduced, so no extra communication.
    FSDP is not supported: its sharded flat parameters do not hold whole A and B factors.

    Args:
        model: the adapted model; a ``ValueError`` if it has no trainable factorised adapter (one that declares
            ``Adapter.factor_blocks``), or, with ``others="refuse"``, a trainable adapter that declares none.
        lr: learning rate (the paper: 2e-5 with SGD on the adjusted gradients, i.e. this full mode).
        betas, eps: Adam's (the paper: 0.9, 0.999, 1e-8).
        weight_decay: decoupled weight decay (the paper: 0).
        mode: ``"full"`` or ``"low"``.
        ridge: added to the Gram matrices before inverting, and to the Sylvester denominators (reference: 1e-8).
        others: ``"refuse"`` (default) or ``"adamw"``: what to do with a trainable adapter whose ``ΔW`` is not
            ``Σ s B A`` (see the module docstring).

    Example:
        >>> import loraplex
        >>> model = loraplex.adapt(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), "lora", rank=2)
        >>> opt = LoRAPro(model, lr=1e-2)
        >>> model(torch.randn(5, 8)).square().mean().backward()
        >>> opt.step()
        >>> len(opt.param_groups)
        2
    """

    declared_options = {
        "lr": Option("float", 1e-3, "learning rate", nonneg=True),
        "betas": Option("betas", (0.9, 0.999), "Adam's moment factors"),
        "eps": Option("float", 1e-8, "Adam's eps (keeps m / (sqrt(v) + eps) finite)", positive=True),
        "weight_decay": Option("float", 0.0, "decoupled weight decay", nonneg=True),
        "mode": Option(
            "choice", "full", "full: the paper's AdamW on the full gradient; low: AdamW on A, B", choices=MODES
        ),
        "ridge": Option("float", 1e-8, "added to the Gram matrices and Sylvester denominators", nonneg=True),
        "others": Option("choice", "refuse", "what to do with a trainable non-factorised adapter", choices=OTHERS),
    }

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mode: str = "full",
        ridge: float = 1e-8,
        others: str = "refuse",
    ) -> None:
        validate(self.declared_options, locals())
        pairs = _pairs(model, others)
        if not pairs:
            raise ValueError(
                "LoRA-Pro needs at least one trainable factorized adapter (one with factor pairs, ΔW = Σ s·B@A: "
                "LoRA, rsLoRA, PiSSA / OLoRA, GoRA, GraLoRA); the model has none"
            )
        taken = {id(p) for A, B, _, _ in pairs for p in (A, B)}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
        groups: list[dict[str, Any]] = [{"params": [A, B], "scale": s, "pair": True, "k": k} for A, B, s, k in pairs]
        if rest:
            groups.append({"params": rest, "scale": None, "pair": False, "k": 0})
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "mode": mode, "ridge": ridge}
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["pair"]:
                self._step_pair(group)
            else:
                self._step_adamw(group)
        return loss

    def _step_pair(self, group: dict[str, Any]) -> None:
        A, B = group["params"]
        if A.grad is None and B.grad is None:
            return
        gA = A.grad if A.grad is not None else torch.zeros_like(A)
        gB = B.grad if B.grad is not None else torch.zeros_like(B)
        lr, wd, eps, ridge, s = group["lr"], group["weight_decay"], group["eps"], group["ridge"], group["scale"]
        beta1, beta2 = group["betas"]
        state, k = self.state[A], group["k"]
        full = group["mode"] == "full"
        wt = _work_dtype(A)
        n_out, n_in = (B.shape[0], A.shape[1]) if not k else (k * B.shape[2], k * A.shape[1])
        if not state:
            state["step"] = 0
            shapes = [(n_out, n_in)] if full else [A.shape, B.shape]
            state["exp_avg"] = [torch.zeros(sh, dtype=wt, device=A.device) for sh in shapes]
            state["exp_avg_sq"] = [torch.zeros(sh, dtype=wt, device=A.device) for sh in shapes]
        state["step"] += 1
        t = state["step"]
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        Aw, Bw = A.detach().to(wt), B.detach().to(wt)
        blocks = split_blocks(Aw, Bw, k)
        raw = split_blocks(gA.to(wt), gB.to(wt), k)
        fA, fB = torch.zeros_like(Aw), torch.zeros_like(Bw)
        final = split_blocks(fA, fB, k)
        if full:
            g = torch.zeros(n_out, n_in, dtype=wt, device=A.device)
            for (a, b, rows, cols), (ga, gb, _, _) in zip(blocks, raw, strict=True):  # step 1
                ra, rb = adjusted_grads(a, b, ga, gb, s, ridge, sylvester=False)
                g[rows, cols] = equivalent_grad(a, b, ra, rb, s)
            m, v = state["exp_avg"][0], state["exp_avg_sq"][0]
            m.lerp_(g, 1 - beta1)  # step 2
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            g_hat = (m / bc1) / ((v / bc2).sqrt() + eps)
            for (a, b, rows, cols), (fa, fb, _, _) in zip(blocks, final, strict=True):  # steps 3-4
                h = g_hat[rows, cols]
                na, nb = adjusted_grads(a, b, s * (b.T @ h), s * (h @ a.T), s, ridge)
                fa.copy_(na), fb.copy_(nb)
            updates = [fA, fB]
        else:
            for (a, b, _, _), (ga, gb, _, _), (fa, fb, _, _) in zip(blocks, raw, final, strict=True):
                na, nb = adjusted_grads(a, b, ga, gb, s, ridge)
                fa.copy_(na), fb.copy_(nb)
            updates = []
            for f, m, v in zip((fA, fB), state["exp_avg"], state["exp_avg_sq"], strict=True):
                m.lerp_(f, 1 - beta1)
                v.mul_(beta2).addcmul_(f, f, value=1 - beta2)
                updates.append((m / bc1) / ((v / bc2).sqrt() + eps))
        for p, u in zip((A, B), updates, strict=True):  # step 5, decay from the old values (AdamW's order)
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(u.to(p.dtype), alpha=-lr)

    def _step_adamw(self, group: dict[str, Any]) -> None:
        params, grads, avgs, sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            avgs.append(state["exp_avg"])
            sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            beta1, beta2 = group["betas"]
            adamw(params, grads, avgs, sqs, [], steps, foreach=False, amsgrad=False, beta1=beta1, beta2=beta2,
                  lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)  # fmt: skip
