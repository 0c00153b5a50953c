"""LoRA with AdamW, LoRA+, LoRA-Pro (full and low modes) and full fine-tuning, same data and steps.

Each setup is one ``loraplex finetune`` process on the embedded MiniLM-L6 and data set (so peak
memory is per run); the script gathers test accuracy, macro-F1, ms per step, peak memory and the
per-step losses, prints a table and writes ``results.json``, ``results.md`` and ``losses.png``
(loss curves, a moving average over 10 steps) to ``--out``. Runs already finished there are reused.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/optimizers.py --epochs 1 --out runs/optimizers

Learning rates: LoRA and LoRA+ at LoRA's default (1e-3; LoRA+ gives B 16x that). LoRA-Pro's full
mode applies Adam-normalised full-size updates through the factors, like full fine-tuning, so it
runs at full fine-tuning's rate (2e-5, BERT's range; the LoRA-Pro paper also uses 2e-5); its low
mode normalises in factor coordinates, like LoRA's Adam, so it runs at LoRA's 1e-3.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from loraplex.io import write_figure, write_text

SETUPS: dict[str, list[str]] = {
    "lora (AdamW)": ["--method", "lora", "--rank", "8", "--alpha", "16"],
    "lora+ (ratio 16)": ["--method", "lora", "--rank", "8", "--alpha", "16", "--optimizer", "lora-plus"],
    "lora-pro full": ["--method", "lora", "--rank", "8", "--alpha", "16", "--optimizer", "lora-pro",
                      "--optimizer-option", "mode=full", "--lr", "2e-5"],
    "lora-pro low": ["--method", "lora", "--rank", "8", "--alpha", "16", "--optimizer", "lora-pro",
                     "--optimizer-option", "mode=low", "--lr", "1e-3"],
    "full fine-tuning": ["--method", "full"],
}  # fmt: skip


def run(name: str, args: list[str], out: Path, epochs: float, seed: int) -> dict:
    folder = out / name.split(" (")[0].replace(" ", "-").replace("+", "plus")
    if not (folder / "metrics.json").is_file():
        cmd = [sys.executable, "-m", "loraplex", "finetune", *args, "--epochs", str(epochs), "--seed", str(seed)]
        cmd += ["--no-progress", "--out", str(folder)]
        print(f"--- {name}: {' '.join(cmd[3:])}", flush=True)
        subprocess.run(cmd, check=True)
    return json.loads((folder / "metrics.json").read_text())


def smooth(values: list[float], k: int = 10) -> list[float]:
    return [sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--setups", default=",".join(SETUPS), help="comma-separated names of SETUPS")
    p.add_argument("--out", type=Path, default=Path("runs/optimizers"))
    args = p.parse_args(argv)
    names = [n for n in args.setups.split(",") if n]
    if unknown := [n for n in names if n not in SETUPS]:
        p.error(f"unknown setups {unknown}; known: {list(SETUPS)}")
    results = {n: run(n, SETUPS[n], args.out, args.epochs, args.seed) for n in names}
    lines = ["| setup | trainable | accuracy | macro-F1 | final loss (10-step mean) | ms/step | peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for n, m in results.items():
        lines.append(
            f"| {n} | {m['trainable_params']:,} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} "
            f"| {smooth(m['losses'])[-1]:.4f} | {m['ms_per_step']:.0f} | {m['peak_memory_mib']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    write_text(
        args.out / "results.md", table + f"\n\nMiniLM-L6, embedded data, {args.epochs:g} epoch(s), seed {args.seed}.\n"
    )
    write_text(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, m in results.items():
        ax.plot(smooth(m["losses"]), label=n)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.legend()
    fig.tight_layout()
    write_figure(fig, args.out / "losses.png", dpi=120)


if __name__ == "__main__":
    main()
