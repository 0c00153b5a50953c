"""SVD vs Kronecker (sum of terms) vs Hadamard compression of MiniLM-L6 weights at equal parameter budgets.

For each weight (blocks 0 and 5: attention query, intermediate, output; or all 36 with --all) and budget
ρ (fraction of the layer's ``in · out`` weights), each method takes its largest option set within ``ρ in out``:
SVD the rank ``⌊ρ in out / (in + out)⌋`` (error by Eckart–Young from the singular values), Kronecker and
Hadamard the largest of ``loraplex.decompose.candidates`` (the compressor's rule). Printed: the relative
Frobenius error ``‖W - Ŵ‖ / ‖W‖``, the weights actually used (as a fraction of ``in · out``) and the
seconds per decomposition (CPU, fp32 weights, computed in float64).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/decompositions.py [--all] [--iters 15]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from loraplex.decompose import HadamardLinear, KroneckerLinear, candidates

BUDGETS = (0.10, 0.25, 0.50)


def largest(method: str, d_in: int, d_out: int, budget: float) -> dict[str, int] | None:
    layer = KroneckerLinear if method == "kronecker" else HadamardLinear
    fits = [o for o in candidates(method, d_in, d_out) if layer.num_params(d_in, d_out, **o) <= budget]
    return fits[-1] if fits else None


def rel(W: torch.Tensor, approx: torch.Tensor) -> float:
    return float((W.double() - approx.double()).norm() / W.double().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="all 36 encoder linears, not 6")
    parser.add_argument("--iters", type=int, default=15, help="Hadamard ALS iterations (default 15)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    from loraplex.train import default_model_path

    model = AutoModel.from_pretrained(default_model_path())
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and "encoder" in n
        and (
            args.all
            or any(
                f"layer.{b}.{k}" in n for b in (0, 5) for k in ("attention.self.query", "intermediate", "output.dense")
            )
        )
        and (args.all or "attention.output" not in n)
    ]
    modules = dict(model.named_modules())
    print("| layer | out x in | ρ | SVD err (rank) | Kronecker err (split, terms) | Hadamard err (r1, r2) | "
          "params / in·out (SVD, Kron, Had) | s (SVD, Kron, Had) |")  # fmt: skip
    print("|---|---|---:|---|---|---|---|---|")
    for name in names:
        linear = modules[name]
        assert isinstance(linear, nn.Linear)
        W = linear.weight.detach()
        d_out, d_in = W.shape
        t = time.perf_counter()
        s = torch.linalg.svdvals(W.double())
        t_svd = time.perf_counter() - t
        for rho in BUDGETS:
            budget = rho * d_in * d_out
            r = int(budget // (d_in + d_out))
            e_svd = float(s[r:].norm() / s.norm())
            ko, ho = largest("kronecker", d_in, d_out, budget), largest("hadamard", d_in, d_out, budget)
            assert ko is not None and ho is not None
            t = time.perf_counter()
            k_layer = KroneckerLinear.from_linear(linear, **ko)
            t_k = time.perf_counter() - t
            e_k = rel(W, k_layer.dense_weight().detach())
            t = time.perf_counter()
            h_layer = HadamardLinear.from_linear(linear, **ho, max_iter=args.iters)
            t_h = time.perf_counter() - t
            e_h = rel(W, h_layer.dense_weight().detach())
            full = d_in * d_out
            p = (r * (d_in + d_out) / full, KroneckerLinear.num_params(d_in, d_out, **ko) / full,
                 HadamardLinear.num_params(d_in, d_out, **ho) / full)  # fmt: skip
            short = name.replace("encoder.layer.", "L").replace("attention.self.", "")
            print(
                f"| {short} | {d_out}x{d_in} | {rho:.2f} | {e_svd:.3f} ({r}) | {e_k:.3f} "
                f"({ko['a_rows']}x{ko['a_cols']}, {ko['terms']}) | {e_h:.3f} ({ho['rank1']}, {ho['rank2']}) | "
                f"{p[0]:.3f}, {p[1]:.3f}, {p[2]:.3f} | {t_svd:.2f}, {t_k:.2f}, {t_h:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
