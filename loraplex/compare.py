"""``loraplex compare``: several methods, one model and data set, a matched trainable-parameter budget.

For each method the size option (``Adapter.size_option``: LoRA's ``rank``, C3A's ``block_size``,
...) is set to the value whose adapter-parameter count on the targeted layers is closest to the
budget (ties: the smaller value). ``METHOD@ALLOCATOR`` entries (``lora@gora``,
``adalora@adalora``) run with rank allocation, the budget then being the final size;
``METHOD/OPTIMIZER`` entries (``lora/lora-plus``) with another optimizer. Methods with
no size option (a fixed count, e.g. ``circulant``) run as they are. The budget counts adapter
parameters only: the classification head, trained in full by every method, is the same for all
and reported apart. A method adapts the targeted layers it can take with its default options
(square-only methods: the square ones; when that is none, all of them, and the size must fit
each); the table says how many.

Every run is a separate ``loraplex finetune`` process (so that peak memory is per run), whose
``metrics.json`` is read back; a compare re-run skips the runs already finished in ``--out``.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from loraplex.adapter import restoring
from loraplex.adapters import METHODS
from loraplex.files import write_figure, write_json, write_text
from loraplex.inject import Targets, bind_options, layers, resolve

SIZE_RANGE = range(1, 4097)


def parse_budget(text: str) -> int:
    """``"300k"`` -> 300000, ``"1.2M"`` -> 1200000, ``"5000"`` -> 5000.

    >>> parse_budget("300k"), parse_budget("1.5M"), parse_budget("42")
    (300000, 1500000, 42)
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*", text)
    if not m:
        raise ValueError(f"budget={text!r} must be a number with an optional k or M suffix, e.g. 300k")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
    if value < 1:
        raise ValueError(f"budget={text!r} must be at least 1 parameter")
    return round(value)


def fits(method: str, shape: tuple[int, int], options: dict[str, Any]) -> bool:
    """Whether ``method`` with ``options`` can adapt an ``(in, out)`` linear layer."""
    with restoring():  # no data-dependent init, no memory (meta device): only the option checks run
        try:
            METHODS[method](nn.Linear(*shape, device="meta"), **options)
        except ValueError:
            return False
    return True


def count(method: str, shapes: list[tuple[int, int]], options: dict[str, Any]) -> int:
    return sum(METHODS[method].num_params(i, o, **options) for i, o in shapes)


@dataclass
class Plan:
    """One entry's run settings at the budget (``allocator``: the rank allocation run with it, or "none")."""

    method: str
    options: dict[str, Any]
    layers: list[str]
    adapter_params: int
    allocator: str = "none"
    allocator_options: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "adamw"

    @property
    def label(self) -> str:
        label = self.method if self.allocator == "none" else f"{self.method}@{self.allocator}"
        return label if self.optimizer == "adamw" else f"{label}/{self.optimizer}"


def split_entry(entry: str) -> tuple[str, str, str]:
    """``METHOD[@ALLOCATOR][/OPTIMIZER]``: ``"adalora@adalora"`` -> ``("adalora", "adalora", "adamw")``,
    ``"lora/lora-plus"`` -> ``("lora", "none", "lora-plus")``."""
    from loraplex.optim.registry import OPTIMIZERS
    from loraplex.train import allocator_names

    entry, _, optimizer = entry.partition("/")
    if optimizer and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} (in {entry!r}) is not one of: {', '.join(OPTIMIZERS)}")
    method, _, allocator = entry.partition("@")
    if method not in METHODS:
        raise ValueError(f"method {method!r} (in {entry!r}) is not registered: {', '.join(METHODS)}")
    if allocator and allocator not in allocator_names():
        raise ValueError(f"allocator {allocator!r} (in {entry!r}) is not one of: {', '.join(allocator_names())}")
    return method, allocator or "none", optimizer or "adamw"


def plan(entry: str, model: nn.Module, targets: Targets, budget: int) -> Plan:
    """Pick the layers the method can take and the size closest to ``budget`` (see the module docstring).

    ``entry`` is ``METHOD`` or ``METHOD@ALLOCATOR``: with an allocator the budget is the FINAL size,
    and the allocator's ``at_budget`` turns it into the starting options (AdaLoRA starts larger).
    """
    from loraplex.rank import ALLOCATORS

    method, allocator, optimizer = split_entry(entry)
    p = _plan(method, model, targets, budget)
    if allocator in ALLOCATORS:
        p.options, p.allocator_options = ALLOCATORS[allocator].at_budget(p.options)
    p.allocator, p.optimizer = allocator, optimizer
    return p


def _plan(method: str, model: nn.Module, targets: Targets, budget: int) -> Plan:
    cls = METHODS[method]
    defaults = bind_options(method, {})
    found = layers(model)
    targeted = resolve(model, targets)
    # the layers it takes with its defaults (square-only methods: the square ones), else all (then a size must fit)
    names = [n for n in targeted if fits(method, _shape(found[n]), defaults)] or targeted
    shapes = [_shape(found[n]) for n in names]
    unique = sorted(set(shapes))
    option = cls.size_option
    if option is None:
        return Plan(method, {}, names, count(method, shapes, defaults))
    ranked = sorted(SIZE_RANGE, key=lambda v: (abs(count(method, shapes, defaults | {option: v}) - budget), v))
    for v in ranked:
        opts = defaults | {option: v}
        if all(fits(method, s, opts) for s in unique):
            return Plan(method, {option: v}, names, count(method, shapes, opts))
    raise ValueError(f"method {method!r}: no value of {option} in 1..{SIZE_RANGE[-1]} fits every targeted layer")


def _shape(layer: nn.Module) -> tuple[int, int]:
    from loraplex.adapter import linear_sizes

    return linear_sizes(layer)


@dataclass
class CompareConfig:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    budget: str | None = None
    budget_like: str | None = None
    model: str | None = None
    data: str | None = None
    test_data: str | None = None
    targets: Targets = "all-linear"
    epochs: float = 1.0
    batch_size: int = 32
    max_length: int = 64
    seeds: int = 1
    out: str | None = None


def resolve_budget(cfg: CompareConfig, model: nn.Module) -> int:
    if cfg.budget is not None:
        return parse_budget(cfg.budget)
    text = cfg.budget_like or "lora:8"
    method, sep, size = text.partition(":")
    if method not in METHODS or not sep or not size.isdigit():
        raise ValueError(f"budget_like={text!r} must look like METHOD:SIZE with a registered method, e.g. lora:8")
    option = METHODS[method].size_option
    if option is None:
        raise ValueError(f"budget_like={text!r}: method {method!r} has no size option")
    shapes = [_shape(layers(model)[n]) for n in resolve(model, cfg.targets)]
    return count(method, shapes, bind_options(method, {option: int(size)}))


def run_one(cfg: CompareConfig, p: Plan, seed: int, out: Path) -> dict[str, Any]:
    """One ``loraplex finetune`` process; its ``metrics.json`` (reused when already there)."""
    done = out / "metrics.json"
    if not done.is_file():
        cmd = [sys.executable, "-m", "loraplex", "finetune", "--method", p.method, "--no-progress"]
        cmd += ["--targets", ",".join(p.layers), "--epochs", str(cfg.epochs), "--seed", str(seed)]
        cmd += ["--batch-size", str(cfg.batch_size), "--max-length", str(cfg.max_length), "--out", str(out)]
        for flag, value in (("--model", cfg.model), ("--data", cfg.data), ("--test-data", cfg.test_data)):
            if value:
                cmd += [flag, value]
        for k, v in p.options.items():
            cmd += ["--option", f"{k}={json.dumps(v)}"]
        if p.optimizer != "adamw":
            cmd += ["--optimizer", p.optimizer]
        if p.allocator != "none":
            cmd += ["--allocator", p.allocator]
            cmd += [x for k, v in p.allocator_options.items() for x in ("--allocator-option", f"{k}={json.dumps(v)}")]
        print(f"--- {p.label} {p.options} {p.allocator_options} seed {seed}", flush=True)
        result = subprocess.run(cmd, check=False)
        if result.returncode != 0 or not done.is_file():
            raise ValueError(f"the {p.label} run (seed {seed}) failed with exit code {result.returncode}: {cmd}")
    return json.loads(done.read_text())


def summarise(p: Plan, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(key: str) -> tuple[float, float]:
        values = [r[key] for r in runs]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    acc, acc_sd = stats("accuracy")
    f1, f1_sd = stats("macro_f1")
    return {
        **asdict(p),
        "method": p.label,
        "layers": len(p.layers),
        "trainable_params": runs[0]["trainable_params"],
        "accuracy": acc,
        "accuracy_sd": acc_sd,
        "macro_f1": f1,
        "macro_f1_sd": f1_sd,
        "ms_per_step": statistics.median(r["ms_per_step"] for r in runs),
        "peak_memory_mib": max(r["peak_memory_mib"] for r in runs),
        "peak_memory_kind": runs[0].get("peak_memory_kind"),
        "seeds": len(runs),
        "runs": [{k: r[k] for k in ("accuracy", "macro_f1", "ms_per_step", "peak_memory_mib")} for r in runs],
    }


def table(rows: list[dict[str, Any]], budget: int) -> str:
    """The Markdown table of a compare."""
    spread = any(r["seeds"] > 1 for r in rows)

    def pm(mean: float, sd: float) -> str:
        return f"{mean:.4f} ± {sd:.4f}" if spread else f"{mean:.4f}"

    head = "| method | size | layers | adapter params | x budget | accuracy | macro-F1 | ms/step | peak MiB |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = ", ".join(f"{k}={v}" for k, v in (r["options"] | r["allocator_options"]).items()) or "(fixed)"
        lines.append(
            f"| {r['method']} | {size} | {r['layers']} | {r['adapter_params']:,} | {r['adapter_params'] / budget:.2f} "
            f"| {pm(r['accuracy'], r['accuracy_sd'])} | {pm(r['macro_f1'], r['macro_f1_sd'])} "
            f"| {r['ms_per_step']:.0f} | {r['peak_memory_mib']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], budget: int, path: Path) -> bool:
    """Accuracy against adapter parameters, one point per method (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'loraplex[demo]')", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.errorbar(r["adapter_params"], r["accuracy"], yerr=r["accuracy_sd"] or None, fmt="o", capsize=3)
        ax.annotate(r["method"], (r["adapter_params"], r["accuracy"]), textcoords="offset points", xytext=(4, 4))
    ax.axvline(budget, color="grey", linestyle=":", label=f"budget {budget:,}")
    ax.set_xscale("log")
    ax.set_xlabel("adapter parameters")
    ax.set_ylabel("test accuracy")
    ax.legend(loc="best")
    fig.tight_layout()
    write_figure(fig, path, dpi=120)
    plt.close(fig)
    return True


def compare(cfg: CompareConfig) -> list[dict[str, Any]]:
    """Run every method at the budget; write ``results.json``, ``results.md`` and ``plot.png`` to ``cfg.out``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from loraplex.compression.io import is_compressed
    from loraplex.data import load_splits
    from loraplex.models import default_model_path
    from loraplex.train import classifier

    for entry in cfg.methods:
        split_entry(entry)
    if cfg.seeds < 1:
        raise ValueError(f"seeds={cfg.seeds} must be >= 1")
    _, _, names = load_splits(cfg.data, cfg.test_data)
    model_dir = str(cfg.model or default_model_path())
    if is_compressed(model_dir):  # the factorised layers' shapes come from the folder
        model = classifier(model_dir, len(names))
    else:
        config = AutoConfig.from_pretrained(model_dir, num_labels=len(names))
        model = AutoModelForSequenceClassification.from_config(config)  # shapes only: random weights are fine
    budget = resolve_budget(cfg, model)
    plans = [plan(m, model, cfg.targets, budget) for m in cfg.methods]
    out = Path(cfg.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S-compare"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"budget {budget:,} adapter parameters; " + "; ".join(f"{p.label} {p.options}" for p in plans))
    rows = []
    for p in plans:
        folder = p.label.replace("@", "-at-").replace("/", "-with-")
        runs = [run_one(cfg, p, seed, out / f"{folder}-seed{seed}") for seed in range(cfg.seeds)]
        rows.append(summarise(p, runs))
    md = table(rows, budget)
    note = f"\n\nBudget {budget:,} adapter parameters, {cfg.epochs:g} epoch(s), {cfg.seeds} seed(s)"
    note += f"; model {model_dir}.\n"
    write_text(out / "results.md", md + note)
    write_json(out / "results.json", {"budget": budget, "config": asdict(cfg), "results": rows})
    plotted = plot(rows, budget, out / "plot.png")
    print(md)
    print(f"results in {out} ({'results.json, results.md, plot.png' if plotted else 'results.json, results.md'})")
    return rows
