"""A model-wide spectral report: one row per weight layer, and one per adapter update ΔW.

Rows (plain dicts, in module order):

* ``name``: the layer's module name; ``kind``: ``linear`` (``nn.Linear`` / transformers'
  ``Conv1D``), ``conv`` (``nn.Conv2d``, its kernel viewed as ``(N, C*kh*kw)``), ``low-rank`` (a
  :data:`~loraplex.compression.layers.LOW_RANK_LAYERS` layer: its ``dense_weight()``; its inner
  ``down`` / ``up`` are not reported apart) or ``adapter`` (``delta_weight()`` of an adapter).
  An adapted layer gives two rows (our design): its frozen root weight (``kind`` of the root) and
  then one ``adapter`` row per adapter of its stack, innermost first, with the same ``name`` and
  ``method`` / ``adapter`` (the adapter's name) filled in (None in other rows).
* ``shape``: ``(out, in)``; ``params``: the layer's parameters (an adapter row: the adapter's own);
  ``r``: the nominal rank (factorised layers, adapters with a ``rank``), else None;
  ``full_rank``: ``min(out, in)``; ``rank``: the numerical rank;
  ``stable_rank``, ``effective_rank``, ``energy_rank`` (at ``energy``, also in the row): see :mod:`.spectra`;
  ``spectrum``: the singular values (float64 tensor; drop it before writing JSON).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraplex.adapter import Adapter, is_linear, root_layer, weight_of
from loraplex.compression.layers import LOW_RANK_LAYERS
from loraplex.files import write_figure
from loraplex.inject import Targets, _head_names, adapters, match
from loraplex.linalg import (
    check_energy,
    effective_rank,
    energy_rank,
    singular_values,
    stable_rank,
)
from loraplex.spec import AdapterSpec

Row = dict[str, Any]
_BLOCK = re.compile(r"\.(\d+)\.")  # "encoder.layer.3.attention" -> block 3


def weight_layers(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Reportable layers by name, as ``(kind, module)``; adapter stacks and factorised layers count once."""
    found: dict[str, tuple[str, nn.Module]] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if inside and name.startswith(inside[-1]):
            continue
        if isinstance(module, LOW_RANK_LAYERS):
            found[name] = ("low-rank", module)
        elif isinstance(module, Adapter) or is_linear(module):
            found[name] = ("linear", module)
        elif isinstance(module, nn.Conv2d):
            found[name] = ("conv", module)
        else:
            continue
        inside.append(name + "." if name else "")  # skip what it wraps
    return found


def _row(name: str, kind: str, w: torch.Tensor, params: int, r: int | None, energy: float) -> Row:
    s = singular_values(w)
    return {
        "name": name,
        "kind": kind,
        "shape": (w.shape[0], math.prod(w.shape[1:])),
        "params": params,
        "r": r,
        "full_rank": s.numel(),
        "rank": int((s > 0).sum()),
        "stable_rank": stable_rank(s),
        "effective_rank": effective_rank(s),
        "energy_rank": energy_rank(s, energy),
        "energy": energy,
        "method": None,
        "adapter": None,
        "spectrum": s,
    }


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def layer_report(model: nn.Module, targets: Targets = "all-linear", *, energy: float = 0.9) -> list[Row]:
    """Spectral statistics of every selected layer (and of every adapter's ΔW on it).

    Args:
        model: any ``nn.Module``.
        targets: ``"all-linear"`` (every weight layer except output heads, as in ``loraplex.adapt``),
            a regex (full match) or a list of names (exact or dotted suffix) of layers.
        energy: the energy threshold of the ``energy_rank`` column (TRP's 0.9 by default).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.ones(6, 4))
        >>> [(r["name"], r["shape"], r["rank"], r["stable_rank"]) for r in layer_report(model, ["0"])]
        [('0', (6, 4), 1, 1.0)]
    """
    energy = check_energy(energy)
    found = weight_layers(model)
    if targets == "all-linear":
        heads = _head_names(model)
        names = [n for n in found if n not in heads]
    else:
        names = match(found, targets)
    if not names:
        sample = ", ".join(list(found)[:8]) or "(none)"
        raise ValueError(f"targets={targets!r} matched no layer; the model's weight layers include: {sample}")
    deltas = [(n, a) for n, a in adapters(model) if a.weight_update]
    rows: list[Row] = []
    for name in names:
        kind, layer = found[name]
        if isinstance(layer, LOW_RANK_LAYERS):
            rows.append(_row(name, kind, layer.dense_weight(), _numel(layer), layer.rank, energy))
        elif isinstance(layer, nn.Conv2d):
            rows.append(_row(name, kind, layer.weight, _numel(layer), None, energy))
        else:
            root = root_layer(layer)
            rows.append(_row(name, kind, weight_of(root), _numel(root), None, energy))
        for where, a in deltas:
            if where == name or where.startswith(name + "."):  # also adapters inside a factorised layer
                params = sum(p.numel() for _, p in a.own_parameters())
                rank = getattr(a, "rank", None)
                row = _row(where, "adapter", a.delta_weight(), params, rank if isinstance(rank, int) else None, energy)
                rows.append(row | {"method": a.method, "adapter": a.name})
    return rows


def summary(rows: list[Row]) -> str:
    """One line: layers, their parameters, mean stable rank (and the same for adapter rows)."""
    base = [r for r in rows if r["kind"] != "adapter"]
    delta = [r for r in rows if r["kind"] == "adapter"]
    mean = sum(r["stable_rank"] for r in base) / max(1, len(base))
    text = f"{len(base)} layers, {sum(r['params'] for r in base):,} parameters, mean stable rank {mean:.2f}"
    if delta:
        dmean = sum(r["stable_rank"] for r in delta) / len(delta)
        params = sum(r["params"] for r in delta)
        text += f"; {len(delta)} adapters, {params:,} parameters, mean ΔW stable rank {dmean:.2f}"
    return text


def _kind(row: Row) -> str:
    return f"ΔW {row['method']}" if row["kind"] == "adapter" else row["kind"]


def markdown(rows: list[Row]) -> str:
    """A Markdown table of the rows (without the spectra).

    >>> print(markdown(layer_report(nn.Sequential(nn.Linear(3, 2)))))  # doctest: +ELLIPSIS
    | layer | kind | shape (out, in) | params | r | rank | full | stable | effective | energy-90 |
    |---|---|---|---:|---:|---:|---:|---:|---:|---:|
    | 0 | linear | 2 x 3 | 8 | - | 2 | 2 | ... | ... | ... |
    """
    energy = f"energy-{100 * rows[0]['energy']:g}" if rows else "energy"
    head = f"| layer | kind | shape (out, in) | params | r | rank | full | stable | effective | {energy} |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        nominal = "-" if r["r"] is None else str(r["r"])
        lines.append(
            f"| {r['name']} | {_kind(r)} | {r['shape'][0]} x {r['shape'][1]} | {r['params']:,} | {nominal} "
            f"| {r['rank']} | {r['full_rank']} | {r['stable_rank']:.2f} | {r['effective_rank']:.1f} "
            f"| {r['energy_rank']} |"
        )
    return "\n".join(lines)


def _labels(rows: list[Row]) -> list[str]:
    """Row names without their common dotted prefix; adapter rows get a ``ΔW`` suffix."""
    names = [r["name"] for r in rows]
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind(".") + 1] if len(set(names)) > 1 else ""
    return [
        n[len(prefix) :] + (f" ΔW {r['method']}" if r["kind"] == "adapter" else "")
        for n, r in zip(names, rows, strict=True)
    ]


def _group(name: str) -> str:
    """The module type a layer name stands for: the part after its block number, or the name."""
    parts = _BLOCK.split(name, maxsplit=1)
    return parts[-1] if len(parts) == 3 else name


def plot(rows: list[Row], path: str | os.PathLike[str], title: str = "singular-value spectra") -> Path:
    """A PNG: normalised spectra ``σ_i / σ_1`` (one line per row, coloured by module type) and bars of ranks.

    Left: spectra on a log scale, one colour per module type (``query``, ``key``, ...: the part of the
    name after its block number), so 36+ layers stay readable through a short legend. Right: one bar
    group per row, full rank (light), energy rank and stable rank. Needs matplotlib (imported here).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("rows is empty: nothing to plot")
    labels = _labels(rows)
    groups = list(dict.fromkeys(_group(r["name"]) + (" ΔW" if r["kind"] == "adapter" else "") for r in rows))
    colours = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    height = max(4.0, 0.22 * len(rows) + 1.5)
    fig, (ax_s, ax_b) = plt.subplots(1, 2, figsize=(15, height), gridspec_kw={"width_ratios": [1, 1]})
    seen: set[str] = set()
    for r in rows:
        s = r["spectrum"]
        if s.numel() == 0 or s[0] == 0:
            continue
        g = _group(r["name"]) + (" ΔW" if r["kind"] == "adapter" else "")
        nz = s[s > 0]
        ax_s.plot(
            range(1, nz.numel() + 1),
            (nz / s[0]).numpy(),
            color=colours(groups.index(g) % colours.N),
            alpha=0.6,
            lw=1.0,
            label=None if g in seen else g,
        )
        seen.add(g)
    ax_s.set(yscale="log", xlabel="index i", ylabel="σ_i / σ_1", title=title)
    ax_s.grid(alpha=0.3)
    ax_s.legend(fontsize=8, loc="lower left")
    y = list(range(len(rows)))
    ax_b.barh(y, [r["full_rank"] for r in rows], color="0.88", label="full rank min(out, in)")
    ax_b.barh([i - 0.2 for i in y], [r["energy_rank"] for r in rows], height=0.4, label="energy rank")
    ax_b.barh([i + 0.2 for i in y], [r["stable_rank"] for r in rows], height=0.4, label="stable rank")
    ax_b.set_yticks(y, labels, fontsize=7 if len(rows) > 20 else 9)
    ax_b.invert_yaxis()
    ax_b.set(xlabel="rank", title="ranks by layer")
    ax_b.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = Path(path)
    write_figure(fig, out, dpi=110)  # atomic (issue 10)
    plt.close(fig)
    return out


def load_model(path: str | os.PathLike[str], adapter: str | os.PathLike[str] | None = None) -> nn.Module:
    """A local HuggingFace model (``transformers.AutoModel``), never downloaded, with an adapter folder on it.

    ``path``: a model directory, or ``minilm`` / ``default`` for the embedded MiniLM-L6.
    ``adapter``: a folder of ``loraplex.save`` / ``loraplex finetune --out``. Its layer names decide
    the model class: ``AutoModel`` when they all exist there, else ``AutoModelForSequenceClassification``
    (what ``finetune`` trains), with ``num_labels`` read off the saved head's tensors.
    Missing or unreadable folders are a ``ValueError``.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from loraplex.compression.io import is_compressed, load_compressed
    from loraplex.files import read_tensors
    from loraplex.io import TENSOR_FILE, load, read_spec
    from loraplex.models import model_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_dir = model_path(path)

    def pretrained(cls: Any, **kw: Any) -> nn.Module:
        if is_compressed(model_dir):  # a LoRD folder: its factorised layers, in a plain or classifier model
            if cls is AutoModel:
                return load_compressed(model_dir).eval()
            config = AutoConfig.from_pretrained(str(model_dir), **kw)
            return load_compressed(model_dir, cls.from_config(config)).eval()
        try:
            return cls.from_pretrained(str(model_dir), local_files_only=True, **kw).eval()
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the model in {model_dir}: {e}") from e

    if adapter is None:
        return pretrained(AutoModel)
    spec = read_spec(adapter)  # fails early on a bad folder
    tensors = read_tensors(Path(adapter) / TENSOR_FILE)
    model = pretrained(AutoModel)
    if not _fits(model, spec, tensors):
        model = pretrained(AutoModelForSequenceClassification)
        labels = _num_labels(model, list(spec.train), tensors)
        if labels is not None:
            model = pretrained(AutoModelForSequenceClassification, num_labels=labels)
    return load(model, adapter).eval()


def _fits(model: nn.Module, spec: AdapterSpec, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the spec's layers and trained modules (with their exact tensor names) exist in ``model``."""
    modules = dict(model.named_modules())
    if any(n not in modules for e in spec.adapters for n in e.layers):
        return False
    for t in spec.train:  # "" is the whole model (finetune --method full)
        saved = {k for k in tensors if k.startswith(f"train.{t}.")}
        if t not in modules or saved != {f"train.{t}.{k}" for k in modules[t].state_dict()}:
            return False
    return True


def _num_labels(model: nn.Module, train: list[str], tensors: dict[str, torch.Tensor]) -> int | None:
    """The saved head's output size where it differs from the model's ``num_labels`` (else None)."""
    n = model.config.num_labels  # type: ignore[union-attr]
    modules = dict(model.named_modules())
    for t in train:
        if t not in modules:
            continue
        for k, v in modules[t].state_dict().items():
            got = tensors.get(f"train.{t}.{k}")
            if got is not None and got.ndim >= 1 and got.shape != v.shape and v.shape[0] == n:
                return int(got.shape[0])
    return None
