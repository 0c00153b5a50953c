"""Text-classification data: CSV or JSONL with ``text`` (or ``text_a`` / ``text_b``) and ``label``.

The embedded default is ``debian-sections.csv``: one-line descriptions of Debian 12 packages
labelled with their archive section (14 classes, 4,958 rows, ``split`` column train / test).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

Text = str | tuple[str, str]


def default_data_path() -> Path:
    return Path(str(resources.files("loraplex") / "_data" / "debian-sections.csv"))


@dataclass(frozen=True)
class Split:
    """One split: ``texts[i]`` (a string or a pair) has label index ``labels[i]``."""

    texts: list[Text]
    labels: list[int]


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a ``.csv`` or ``.jsonl`` file as dicts."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i} is not valid JSON: {e}") from e
        return rows
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"data file {path} must end in .csv or .jsonl")


def _text(row: dict[str, Any], where: str) -> Text:
    if "text" in row:
        return str(row["text"])
    if "text_a" in row and "text_b" in row:
        return (str(row["text_a"]), str(row["text_b"]))
    raise ValueError(f"{where}: a row needs a 'text' column (or 'text_a' and 'text_b'); it has {sorted(row)}")


def load_splits(
    data: str | os.PathLike[str] | None = None, test_data: str | os.PathLike[str] | None = None
) -> tuple[Split, Split, list[str]]:
    """``(train, test, label names)``: the test split is ``test_data`` or the ``split == "test"`` rows."""
    path = Path(data) if data is not None else default_data_path()
    rows = read_rows(path)
    if test_data is not None:
        train_rows, test_rows = rows, read_rows(test_data)
    else:
        if rows and "split" not in rows[0]:
            raise ValueError(f"{path} has no 'split' column: pass a separate test file")
        train_rows = [r for r in rows if r["split"] == "train"]
        test_rows = [r for r in rows if r["split"] == "test"]
    if not train_rows or not test_rows:
        raise ValueError(f"{path}: need both train and test rows, got {len(train_rows)} and {len(test_rows)}")
    for r in train_rows + test_rows:
        if "label" not in r:
            raise ValueError(f"{path}: a row needs a 'label' column; it has {sorted(r)}")
    names = sorted({str(r["label"]) for r in train_rows})
    index = {n: i for i, n in enumerate(names)}
    unseen = sorted({str(r["label"]) for r in test_rows} - set(index))
    if unseen:
        raise ValueError(f"{path}: test labels {unseen[:5]} never occur in the training rows")

    def split(rs: list[dict[str, Any]]) -> Split:
        return Split([_text(r, str(path)) for r in rs], [index[str(r["label"])] for r in rs])

    return split(train_rows), split(test_rows), names
