"""The two compute paths of the SURM LoRA adapters (circulant, toeplitz, ldr): FFT products vs merged weight.

Each adapter picks its path per call with ``fusable(x)``: below a row threshold it adds the FFT
product to the base output, above it runs the base GEMM with ``W0 + ΔW``. The thresholds in
``loraplex/adapters/{circulant,toeplitz,ldr}.py`` come from this script on CPU; rerun it to re-tune
them on other hardware. Prints, per row count, the forward + backward time of the plain layer and
each adapter's two paths as multiples of it (best of ``--repeats``, setups interleaved).

    .venv/bin/python benchmarks/surm_paths.py --width 384 --rows 128,256,384,512,1024 --threads 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from loraplex.adapters import circulant, ldr, toeplitz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--rows", default="128,256,384,512,1024")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, device = args.width, torch.device(args.device)
    layer = nn.Linear(d, d, device=device).requires_grad_(False)
    modules = {"circulant": circulant, "toeplitz": toeplitz, "ldr R=1": ldr, "ldr R=2": ldr}
    adapters = {
        "circulant": circulant.Circulant(layer),
        "toeplitz": toeplitz.Toeplitz(layer),
        "ldr R=1": ldr.LDR(layer),
        "ldr R=2": ldr.LDR(layer, displacement_rank=2),
    }
    with torch.no_grad():
        for a in adapters.values():
            for _, p in a.own_parameters():
                p.normal_()  # off the init, so no path is trivially zero
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, d, device=device, requires_grad=True)
        gy = torch.randn(rows, d, device=device)
        setups: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"base": layer}
        for name, a in adapters.items():
            for path, threshold in (("fft", float("inf")), ("merged", 0.0)):

                def run(
                    x: torch.Tensor, a: nn.Module = a, module=modules[name], threshold: float = threshold
                ) -> torch.Tensor:
                    saved, module.FUSE_ROWS_PER_FEATURE = module.FUSE_ROWS_PER_FEATURE, threshold
                    try:
                        return a(x)
                    finally:
                        module.FUSE_ROWS_PER_FEATURE = saved

                setups[f"{name} {path}"] = run
        best = dict.fromkeys(setups, float("inf"))
        for _ in range(args.repeats):
            for name, f in setups.items():
                sync()
                t = time.perf_counter()
                f(x).backward(gy)
                sync()
                best[name] = min(best[name], time.perf_counter() - t)
        base = best.pop("base")
        print(f"rows={rows} base={base * 1e3:.2f} ms " + " ".join(f"{k}={v / base:.2f}x" for k, v in best.items()))


if __name__ == "__main__":
    main()
