"""Final ranks per layer: a JSON-able dict, a Markdown grid (blocks x module types) and a heatmap PNG."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from loraplex.files import write_figure
from loraplex.inject import adapters

_BLOCK = re.compile(r"^(.*?\.\d+)\.(.+)$")  # "bert.encoder.layer.3" + "attention.self.query"


def adapter_ranks(model: nn.Module) -> dict[str, int]:
    """The rank of every adapter that has one (``rank`` attribute), by layer name."""
    out = {}
    for layer, a in adapters(model):
        rank = getattr(a, "rank", None)
        if isinstance(rank, int):
            out[layer] = rank
    return out


def grid(ranks: dict[str, int]) -> tuple[list[str], list[str], dict[tuple[str, str], int]]:
    """Rows (blocks, in order of appearance), columns (module types) and cells of a rank table.

    A layer name splits at its last numbered component: ``bert.encoder.layer.3.attention.self.query``
    is row ``bert.encoder.layer.3``, column ``attention.self.query``; names without a number go to
    row ``(other)``.

    >>> rows, cols, cells = grid({"enc.0.q": 4, "enc.0.v": 2, "enc.1.q": 8, "pooler.dense": 3})
    >>> rows, cols, cells["enc.1", "q"], cells["(other)", "pooler.dense"]
    (['enc.0', 'enc.1', '(other)'], ['q', 'v', 'pooler.dense'], 8, 3)
    """
    rows: list[str] = []
    cols: list[str] = []
    cells: dict[tuple[str, str], int] = {}
    for name, r in ranks.items():
        m = _BLOCK.match(name)
        row, col = (m.group(1), m.group(2)) if m else ("(other)", name)
        if row not in rows:
            rows.append(row)
        if col not in cols:
            cols.append(col)
        cells[row, col] = r
    if "(other)" in rows:  # keep it last
        rows.remove("(other)")
        rows.append("(other)")
    return rows, cols, cells


def table(ranks: dict[str, int]) -> str:
    """A Markdown grid of ranks; ``-`` where a block has no such module."""
    rows, cols, cells = grid(ranks)
    lines = ["| block | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(str(cells.get((row, c), "-")) for c in cols) + " |")
    return "\n".join(lines)


def heatmap(ranks: dict[str, int], path: str | Path, title: str = "final ranks") -> bool:
    """A blocks x module types heatmap PNG (needs matplotlib; returns False without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return False
    rows, cols, cells = grid(ranks)
    data = np.full((len(rows), len(cols)), np.nan)
    for (r, c), v in cells.items():
        data[rows.index(r), cols.index(c)] = v
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols), 1.0 + 0.45 * len(rows)))
    im = ax.imshow(data, cmap="viridis", aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{int(data[i, j])}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(len(cols)), [c.replace(".", "\n") for c in cols], fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="rank")
    fig.tight_layout()
    write_figure(fig, path, dpi=110)
    plt.close(fig)
    return True
