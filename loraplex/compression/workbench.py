"""``loraplex compress``: compress a local HuggingFace encoder, save it, and measure what it kept.

The report (printed, and written to ``report.json`` / ``report.md`` in the output folder) gives the
parameters before and after (whole model and targeted layers), the seconds the decomposition took,
the mean cosine between the original and compressed sentence embeddings on the test texts, and the
test accuracy of a logistic-regression head fitted on each model's train embeddings
(:mod:`loraplex.compression.quality`). The folder loads back with
``loraplex.load_compressed(out)`` and holds the tokenizer, so
``loraplex finetune --model out`` fine-tunes the compressed encoder (LoRD followed by LoRA).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraplex.compression.io import is_compressed, load_compressed, save_compressed
from loraplex.compression.lord import plan
from loraplex.compression.quality import embed, head_accuracy, mean_cosine
from loraplex.data import load_splits
from loraplex.files import save_pretrained, write_json, write_text
from loraplex.models import model_path


def load_encoder(path: Path) -> nn.Module:
    """A HuggingFace base model (``AutoModel``) from a folder, compressed or not."""
    from transformers import AutoModel

    model = load_compressed(path) if is_compressed(path) else AutoModel.from_pretrained(path)
    return model.eval()


@dataclass
class CompressConfig:
    model: str | None = None
    out: str = "runs/compressed"
    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None
    method: str = "svd"
    solver: str = "auto"
    allocation: str = "error"
    targets: Any = "all-linear"
    data: str | None = None
    test_data: str | None = None
    calibration_rows: int = 256
    eval_rows: int | None = None  # train rows embedded for the head fit (None: all)
    max_length: int = 64
    batch_size: int = 64


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def calibration_batches(tokenizer: Any, texts: list[str], size: int, max_length: int) -> list[dict[str, Any]]:
    """Tokenised batches for ``method="activation"``, sorted by length to keep padding small."""
    texts = sorted(texts, key=len)
    return [
        dict(tokenizer(texts[i : i + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        for i in range(0, len(texts), size)
    ]


def run(cfg: CompressConfig) -> dict[str, Any]:
    """Compress, save to ``cfg.out``, evaluate; returns the report."""
    from transformers import AutoTokenizer

    src = model_path(cfg.model)
    train, test, names = load_splits(cfg.data, cfg.test_data)
    texts = [t if isinstance(t, str) else f"{t[0]} {t[1]}" for t in train.texts]
    test_texts = [t if isinstance(t, str) else f"{t[0]} {t[1]}" for t in test.texts]
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = load_encoder(src)
    original = copy.deepcopy(model)
    calib = None
    if cfg.method == "activation":
        calib = calibration_batches(tokenizer, texts[: cfg.calibration_rows], 32, cfg.max_length)
    start = time.perf_counter()
    with torch.no_grad():
        choices = plan(
            model,
            targets=cfg.targets,
            rank=cfg.rank,
            energy=cfg.energy,
            ratio=cfg.ratio,
            method=cfg.method,
            calibration=calib,
            solver=cfg.solver,
            allocation=cfg.allocation,
        )
    seconds = time.perf_counter() - start
    out = Path(cfg.out)
    save_pretrained(tokenizer, out)  # each file renamed into place; before compression.json, which marks it complete
    save_compressed(model, out)

    rows = texts if cfg.eval_rows is None else texts[: cfg.eval_rows]
    labels = torch.tensor(train.labels[: len(rows)])
    test_labels = torch.tensor(test.labels)
    quality: dict[str, dict[str, Any]] = {}
    for key, m in (("original", original), ("compressed", model)):
        tr = embed(m, tokenizer, rows, cfg.batch_size, cfg.max_length)
        te = embed(m, tokenizer, test_texts, cfg.batch_size, cfg.max_length)
        quality[key] = {"test": te, "accuracy": head_accuracy(tr, labels, te, test_labels, len(names))}
    report = {
        "model": str(src),
        "method": cfg.method,
        "allocation": cfg.allocation,
        "selection": {k: v for k, v in (("rank", cfg.rank), ("energy", cfg.energy), ("ratio", cfg.ratio)) if v},
        "params_before": _count(original),
        "params_after": _count(model),
        "target_params_before": sum(c.params_before for c in choices),
        "target_params_after": sum(c.params_after for c in choices),
        "layers_targeted": len(choices),
        "layers_factorised": sum(c.kind != "dense" for c in choices),
        "seconds": seconds,
        "cosine": mean_cosine(quality["original"]["test"], quality["compressed"]["test"]),
        "accuracy_original": quality["original"]["accuracy"],
        "accuracy_compressed": quality["compressed"]["accuracy"],
        "layers": [c.__dict__ for c in choices],
    }
    write_json(out / "report.json", report)
    write_text(out / "report.md", summary(report) + "\n")
    return report


def summary(r: dict[str, Any]) -> str:
    """A markdown summary of a :func:`run` report."""
    kept = r["target_params_after"] / r["target_params_before"]
    lines = [
        "| model | method | selection | parameters | targeted kept | factorised | seconds | cosine | accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {Path(r['model']).name} | {r['method']} | {r['selection']} | {r['params_before']:,} → "
        f"{r['params_after']:,} | {kept:.3f} | {r['layers_factorised']}/{r['layers_targeted']} | "
        f"{r['seconds']:.1f} | {r['cosine']:.4f} | {r['accuracy_original']:.4f} → {r['accuracy_compressed']:.4f} |",
    ]
    return "\n".join(lines)
