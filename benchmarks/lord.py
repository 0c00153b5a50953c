"""LoRD on MiniLM-L6: parameters, seconds, embedding cosine and head accuracy kept, per ratio and method.

Also times the two SVD solvers (full LAPACK vs randomized) on MiniLM's weights at equal rank and
prints their relative errors, which is what ``solver="auto"`` is based on.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lord.py --markdown benchmarks/results/lord.md

The original model's embeddings are computed once; every configuration is compressed from a fresh
copy of the original, and its embeddings and fitted head are measured the same way.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from loraplex.compression.layers import split_factors, svd
from loraplex.compression.lord import plan, randomized_factors
from loraplex.compression.quality import embed, head_accuracy, mean_cosine
from loraplex.compression.workbench import calibration_batches
from loraplex.data import load_splits
from loraplex.io import write_text
from loraplex.train import default_model_path


def solvers(model: torch.nn.Module, ranks: list[int], repeats: int) -> list[str]:
    layers = {
        "query (384x384)": model.encoder.layer[0].attention.self.query.weight,
        "intermediate (1536x384)": model.encoder.layer[0].intermediate.dense.weight,
    }
    rows = [
        "| layer | rank | full SVD ms | randomized ms | speed-up | error full | error randomized |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, w in layers.items():
        w = w.detach()
        norm = float(torch.linalg.norm(w.double()))
        for r in ranks:
            full_t, rand_t = [], []
            for _ in range(repeats):  # interleaved
                t = time.perf_counter()
                up, down = split_factors(*svd(w), r)
                full_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                rup, rdown = randomized_factors(w, r)
                rand_t.append(time.perf_counter() - t)
            e_full = float(torch.linalg.norm(w.double() - up @ down)) / norm
            e_rand = float(torch.linalg.norm(w.double() - rup @ rdown)) / norm
            f, q = statistics.median(full_t) * 1e3, statistics.median(rand_t) * 1e3
            rows.append(f"| {name} | {r} | {f:.1f} | {q:.1f} | {f / q:.2f}x | {e_full:.6f} | {e_rand:.6f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--runs",
        default="svd:0.9,svd:0.7,svd:0.5,activation:0.9,activation:0.7,activation:0.5,kronecker:0.5,hadamard:0.5",
        help="METHOD:RATIO[:uniform] (default allocation: error)",
    )
    p.add_argument("--solver-ranks", default="8,32,96")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--markdown", help="write the tables here too")
    args = p.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    src = default_model_path()
    tok = AutoTokenizer.from_pretrained(src)
    original = AutoModel.from_pretrained(src).eval()
    train, test, names = load_splits()
    texts = [str(t) for t in train.texts]
    test_texts = [str(t) for t in test.texts]
    labels, test_labels = torch.tensor(train.labels), torch.tensor(test.labels)
    base_tr, base_te = embed(original, tok, texts), embed(original, tok, test_texts)
    base_acc = head_accuracy(base_tr, labels, base_te, test_labels, len(names))
    n0 = sum(p.numel() for p in original.parameters())
    out = [
        f"MiniLM-L6 ({n0:,} parameters), embedded data: {len(texts)} train / {len(test_texts)} test texts; "
        f"original head accuracy {base_acc:.4f}",
        "",
        "| method | ratio, allocation | parameters | targeted kept | factorised | seconds | cosine | accuracy "
        "| Δ accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    calib = calibration_batches(tok, texts[:256], 32, 64)
    for run in args.runs.split(","):
        method, ratio, *alloc = run.split(":")
        ratio, allocation = float(ratio), (alloc or ["error"])[0]
        if True:
            model = copy.deepcopy(original)
            t = time.perf_counter()
            with torch.no_grad():
                choices = plan(
                    model,
                    ratio=ratio,
                    method=method,
                    allocation=allocation,
                    calibration=calib if method == "activation" else None,
                )
            sec = time.perf_counter() - t
            tr, te = embed(model, tok, texts), embed(model, tok, test_texts)
            acc = head_accuracy(tr, labels, te, test_labels, len(names))
            n1 = sum(p.numel() for p in model.parameters())
            kept = sum(c.params_after for c in choices) / sum(c.params_before for c in choices)
            fact = sum(c.kind != "dense" for c in choices)
            line = (
                f"| {method} | {ratio} {allocation} | {n0:,} → {n1:,} | {kept:.3f} | {fact}/{len(choices)} | "
                f"{sec:.1f} | {mean_cosine(base_te, te):.4f} | {acc:.4f} | {acc - base_acc:+.4f} |"
            )
            print(line, flush=True)
            out.append(line)
    out += ["", "SVD solvers (median of interleaved repeats):", ""]
    out += solvers(original, [int(r) for r in args.solver_ranks.split(",")], args.repeats)
    text = "\n".join(out)
    print(text)
    if args.markdown:
        write_text(args.markdown, text + "\n")


if __name__ == "__main__":
    main()
