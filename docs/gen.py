"""Generate the documentation pages that come from the code and the committed results.

Run as a script (``python docs/gen.py``, what ``make docs`` does) or loaded by MkDocs as a hook
(``hooks: [docs/gen.py]`` in ``mkdocs.yml``): ``on_config`` writes the pages and fills the "Methods"
section of the navigation, so a plain ``mkdocs build`` / ``mkdocs serve`` works too.

Everything is written under ``docs/generated/`` (git-ignored), and a file is rewritten only when its
content changes (``mkdocs serve`` would otherwise rebuild forever):

* ``methods/index.md`` and one ``methods/<name>.md`` per entry of ``loraplex.METHODS``: paper, update,
  shapes, trainable-parameter formula, options with defaults, default learning rate, PEFT equivalent,
  the docstring's decisions ("not pinned down", "decided"), the figures measured on the embedded data,
  a runnable example and the class's API entry;
* ``cli.md``: each sub-command's ``--help``, from ``loraplex.cli.parser()`` itself;
* ``choosing.md`` and ``accuracy_vs_params.png``: the committed ``loraplex compare`` and speed results.

Sources of the figures (committed files only, never ``runs/``, which is git-ignored):
``benchmarks/results/*.md`` tables written by ``loraplex compare`` (recognised by their header) and
``benchmarks/results/speed_all_cpu_32x32.json`` (``benchmarks/speed.py``). A method without a figure
says "not measured".
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OUT = DOCS / "generated"
RESULTS = ROOT / "benchmarks" / "results"
SPEED_FILE = RESULTS / "speed_all_cpu_32x32.json"
BUDGET = 300_000
PLOT = "accuracy_vs_params.png"
EXAMPLE_WIDTH = 256  # the example layers: square, divisible by every default block / factor size

# Every method page has these sections (tests/test_docs_site.py checks them).
REQUIRED_SECTIONS = (
    "## Paper",
    "## Update",
    "## Trainable parameters",
    "## Options",
    "## Learning rate",
    "## PEFT equivalent",
    "## Decisions",
    "## Measured",
    "## Example",
    "## API",
)
COMPARE_HEADER = "| method | size | layers | adapter params |"

if str(ROOT) not in sys.path:  # a MkDocs hook runs from anywhere
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class CompareRow:
    """One row of a committed ``loraplex compare`` table (``results.md``)."""

    method: str
    size: str
    params: int
    accuracy: str
    macro_f1: str
    ms_step: str
    budget: int
    seeds: int
    source: str


def parse_compare(text: str, source: str) -> list[CompareRow]:
    """The rows of a ``loraplex compare`` markdown table, or ``[]`` when ``text`` is not one.

    The table's footer line ``Budget N adapter parameters, E epoch(s), S seed(s)`` gives the budget.

    >>> t = "| method | size | layers | adapter params | x budget | accuracy | macro-F1 | ms/step | peak MiB |\\n"
    >>> t += "|---|---|---:|---:|---:|---:|---:|---:|---:|\\n"
    >>> t += "| lora | rank=7 | 37 | 295,680 | 0.99 | 0.6259 | 0.5733 | 363 | 884 |\\n"
    >>> t += "\\nBudget 300,000 adapter parameters, 1 epoch(s), 1 seed(s); model m."
    >>> [(r.method, r.params, r.accuracy, r.budget) for r in parse_compare(t, "x.md")]
    [('lora', 295680, '0.6259', 300000)]
    """
    if not text.startswith(COMPARE_HEADER):
        return []
    foot = re.search(r"^Budget ([\d,]+) adapter parameters, .*?(\d+) seed", text, flags=re.M)
    budget, seeds = (int(foot.group(1).replace(",", "")), int(foot.group(2))) if foot else (0, 1)
    rows = []
    for line in text.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append(
            CompareRow(
                method=cells[0],
                size=cells[1],
                params=int(cells[3].replace(",", "")),
                accuracy=cells[5],
                macro_f1=cells[6],
                ms_step=cells[7],
                budget=budget,
                seeds=seeds,
                source=source,
            )
        )
    return rows


def compare_results() -> list[CompareRow]:
    """Every row of every committed compare table in ``benchmarks/results/``."""
    rows: list[CompareRow] = []
    for path in sorted(RESULTS.glob("*.md")):
        rows += parse_compare(path.read_text(encoding="utf-8"), f"benchmarks/results/{path.name}")
    return rows


def at_budget(rows: list[CompareRow], budget: int = BUDGET) -> dict[str, CompareRow]:
    """Method -> its row in the compare tables at ``budget`` (the last file wins)."""
    return {r.method: r for r in rows if r.budget == budget}


def speed_results(path: Path = SPEED_FILE) -> dict[str, dict[str, Any]]:
    """Method -> its training row (``setup == "ours-<method>"``) of ``benchmarks/speed.py``'s JSON."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    out = {}
    for row in data["results"]:
        setup = row["setup"]
        if row.get("kind") == "train" and setup.startswith("ours-") and "@" not in setup:
            out[setup.removeprefix("ours-")] = row
    return out


def speed_config(path: Path = SPEED_FILE) -> str:
    """One line describing the speed run (model suite, batch, device)."""
    if not path.exists():
        return ""
    c = json.loads(path.read_text(encoding="utf-8"))["config"]
    torch = c["versions"]["torch"]
    return f"MiniLM-L6, batch {c['batch']} x {c['seq_len']} tokens, {c['dtype']}, {c['device']}, torch {torch}"


# --------------------------------------------------------------------------- docstrings


def paragraphs(doc: str) -> list[str]:
    """The blank-line separated paragraphs of a docstring, ``Args:`` and ``Example:`` left out."""
    out = []
    for p in doc.split("\n\n"):
        if p.startswith(("Args:", "Example:", "Examples:", "Returns:", "Raises:")):
            continue
        out.append(p)
    return out


def decisions(doc: str) -> list[str]:
    """The docstring's paragraphs recording a choice where the reference is silent or unclear."""
    pattern = re.compile(r"not pinned down|decid|decision|our design|our definition", re.I)
    paras = paragraphs(doc)
    out: list[str] = []
    for i, p in enumerate(paras):
        if pattern.search(p):
            out.append(p)
            # a paragraph announcing a list ("decided:") brings the list and literal blocks after it
            j = i + 1
            while p.rstrip().endswith(":") and j < len(paras) and paras[j].startswith(("* ", "- ", "    ")):
                if paras[j] not in out:
                    out.append(paras[j])
                j += 1
    return out


def module_decisions(cls: type) -> dict[str, list[str]]:
    """Decisions recorded in the docstrings of the functions defined in ``cls``'s own module."""
    module = sys.modules[cls.__module__]
    out = {}
    for name, func in inspect.getmembers(module, inspect.isfunction):
        if func.__module__ == module.__name__ and (found := decisions(inspect.getdoc(func) or "")):
            out[name] = found
    return out


def markdown_of(paragraph: str) -> str:
    """A docstring paragraph as Markdown: reST's ``::`` literal marker becomes ``:``."""
    return re.sub(r"::$", ":", paragraph, flags=re.M)


def readme_peft_column() -> dict[str, str]:
    """Method -> the "HuggingFace PEFT" cell of the README's methods table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    out = {}
    for m in re.finditer(r"^\| `([a-z0-9_]+)` \|.*\| ([^|]+) \|$", text, flags=re.M):
        out[m.group(1)] = m.group(2).strip()
    return out


def options_cell(cls: type) -> str:
    """The README methods table's options cell: the declared option names, in declaration order."""
    return ", ".join(f"`{key}`" for key in cls.declared_options)  # type: ignore[attr-defined]


def readme_with_options(text: str) -> str:
    """The README ``text`` with each methods-table row's options cell generated from the declarations.

    A registered method without a row gets one after the last: its class name linked to its paper, the
    options, its formula and no PEFT twin (edit the paper and PEFT cells by hand if they say more).
    """
    from loraplex import METHODS

    def row(m: re.Match[str]) -> str:
        if m.group(1) not in METHODS:
            return m.group(0)
        cells = m.group(0).split(" | ")
        cells[2] = options_cell(METHODS[m.group(1)])
        return " | ".join(cells)

    rows = list(re.finditer(r"^\| `([a-z0-9_]+)` \|.*$", text, flags=re.M))
    missing = [n for n in METHODS if n not in {m.group(1) for m in rows}]
    if missing and rows:
        new = [
            f"| `{n}` | [{c.__name__}]({c.paper}) | {options_cell(c)} | `{c.formula}` | – |"
            for n, c in METHODS.items()
            if n in missing
        ]
        end = rows[-1].end()
        text = text[:end] + "\n" + "\n".join(new) + text[end:]
    return re.sub(r"^\| `([a-z0-9_]+)` \|.*$", row, text, flags=re.M)


# --------------------------------------------------------------------------- pages


def method_page_names() -> dict[str, str]:
    """Method -> its page, relative to ``docs/``: one per entry of ``loraplex.METHODS``."""
    from loraplex import METHODS

    return {name: f"generated/methods/{name}.md" for name in METHODS}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _num(n: float) -> str:
    return f"{n:,.0f}"


def method_page(name: str, compare: dict[str, CompareRow], others: list[CompareRow], speed: dict[str, Any]) -> str:
    """The Markdown page of method ``name``."""
    from loraplex import METHODS

    cls = METHODS[name]
    doc = inspect.getdoc(cls) or ""
    paras = paragraphs(doc)
    summary = paras[0].replace("\n", " ") if paras else cls.__name__
    update = paras[1] if len(paras) > 1 else "(not in the docstring)"
    shapes = [p for p in paras if p.startswith("Shapes:")]
    declared = cls.declared_options
    options = {key: option.default for key, option in declared.items()}
    peft_cell = readme_peft_column().get(name, "–")
    lines = [f"# `{name}`: {cls.__name__}", "", markdown_of(summary), ""]

    lines += ["## Paper", "", f"<{cls.paper}>", ""]

    lines += ["## Update", "", markdown_of(update), ""]
    lines += [markdown_of(s) for s in shapes] + [""]
    if not cls.weight_update:
        lines += ["Not a weight update: `delta_weight()` raises and `loraplex.merge` refuses it.", ""]

    lines += ["## Trainable parameters", "", f"Per adapted layer: `{cls.formula}`.", ""]
    try:
        n = cls.num_params(384, 384, **options)
        lines += [f"With the default options, on a 384 x 384 layer (MiniLM-L6's attention): {_num(n)}.", ""]
    except (TypeError, ValueError) as err:  # a default that needs the layer (None sizes) is fine
        lines += [f"(No count with the defaults alone: {err}.)", ""]
    if cls.size_option:
        lines += [f"`loraplex compare` sets `{cls.size_option}` to meet a parameter budget.", ""]

    lines += ["## Options", "", "| option | default | valid values | meaning |", "|---|---|---|---|"]
    for key, option in declared.items():
        valid = option.must() + (" or None" if option.optional else "")
        size = " (the size option)" if option.size else ""
        lines.append(f"| `{key}` | `{option.default!r}` | {_cell(valid)} | {_cell(option.help)}{size} |")
    lines += [
        "",
        f"Generated from the method's declarations (`loraplex.METHODS[{name!r}].declared_options`, "
        "checked against the constructor's signature by the tests); where each default comes from is "
        f"written in the class docstring (below). Set them with `loraplex.adapt(model, {name!r}, key=value)` "
        f"or `loraplex finetune --method {name} --option key=value`.",
        "",
    ]

    lines += [
        "## Learning rate",
        "",
        f"`default_lr = {cls.default_lr:g}`: the AdamW learning rate `loraplex finetune` uses without `--lr`.",
        "",
    ]

    lines += ["## PEFT equivalent", ""]
    if cls.peft_type:
        lines += [
            f"HuggingFace PEFT: {peft_cell} (`peft_type = {cls.peft_type!r}`); "
            "`loraplex.export_peft` / `loraplex.import_peft` convert checkpoints both ways.",
            "",
        ]
    else:
        lines += [f"None in HuggingFace PEFT ({peft_cell}): no `peft_type`, no PEFT export.", ""]

    lines += ["## Decisions", ""]
    found = decisions(doc)
    helpers = module_decisions(cls)
    if found or helpers:
        lines += ["Where the paper or the reference code is silent or unclear, loraplex decided:", ""]
        for p in found:
            lines += [markdown_of(p), ""]
        for func, paras in helpers.items():
            lines += [f"In `{cls.__module__}.{func}`:", ""]
            lines += [line for p in paras for line in (markdown_of(p), "")]
    else:
        lines += ["No decision beyond the paper and its reference implementation is recorded in the docstring.", ""]

    lines += ["## Measured", ""]
    row = compare.get(name)
    if row:
        lines += [
            f"Accuracy at the {_num(BUDGET)} budget (`loraplex compare`, embedded MiniLM-L6 and data, "
            f"{row.seeds} seed(s)): **{row.accuracy}** (macro-F1 {row.macro_f1}) with `{row.size}`, "
            f"{_num(row.params)} adapter parameters, {row.ms_step} ms per step; source `{row.source}`.",
            "",
        ]
    else:
        lines += [f"Accuracy at the {_num(BUDGET)} budget: not measured.", ""]
        for other in others:
            if other.method.split("@")[0] == name:
                lines += [
                    f"At a budget of {_num(other.budget)} (`{other.method}`, {other.seeds} seed(s)): accuracy "
                    f"{other.accuracy}, macro-F1 {other.macro_f1} with `{other.size}`; source `{other.source}`.",
                    "",
                ]
    if speed:
        x_peft = f", x {speed['x_peft']:.2f} PEFT's" if speed.get("x_peft") else ""
        lines += [
            f"Speed with the default options on every linear layer ({speed_config()}): "
            f"{speed['median_ms']:.1f} ms per training step, x {speed['x_ours_lora']:.2f} our LoRA{x_peft}, "
            f"{_num(speed['trainable_params'])} trainable parameters; source "
            f"`benchmarks/results/{SPEED_FILE.name}`.",
            "",
        ]
    else:
        lines += ["Speed: not measured.", ""]

    w = EXAMPLE_WIDTH
    finish = "loraplex.merge(model)  # plain nn.Linear layers again" if cls.weight_update else "loraplex.unload(model)"
    lines += [
        "## Example",
        "",
        "```python",
        "import torch",
        "import loraplex",
        "",
        f"model = torch.nn.Sequential(torch.nn.Linear({w}, {w}), torch.nn.ReLU(), torch.nn.Linear({w}, {w}))",
        f'model = loraplex.adapt(model, "{name}")  # every linear layer, default options',
        "x = torch.randn(4, " + str(w) + ")",
        "model(x).sum().backward()  # only the adapters get gradients",
        "print(sum(p.numel() for p in model.parameters() if p.requires_grad), 'trainable parameters')",
        finish,
        "```",
        "",
    ]

    lines += ["## API", "", f"::: {cls.__module__}.{cls.__name__}", "    options:", "      members: false", ""]
    return "\n".join(lines)


def methods_index(compare: dict[str, CompareRow]) -> str:
    from loraplex import METHODS

    peft = readme_peft_column()
    lines = [
        "# Methods",
        "",
        "One page per registered method (`loraplex.METHODS`), generated from the registry, the class "
        "docstrings and the committed results.",
        "",
        "| method | paper | trainable parameters per layer | HuggingFace PEFT | accuracy at 300k |",
        "|---|---|---|---|---:|",
    ]
    for name, cls in METHODS.items():
        acc = compare[name].accuracy if name in compare else "not measured"
        lines.append(
            f"| [`{name}`]({name}.md) | <{cls.paper}> | `{_cell(cls.formula)}` | {_cell(peft.get(name, '–'))} | {acc} |"
        )
    return "\n".join(lines) + "\n"


def cli_page() -> str:
    """The CLI reference: the top-level and each sub-command's ``--help``, from the parser itself."""
    import argparse

    from loraplex.cli import parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"  # argparse wraps at the terminal width: fix it
    try:
        p = parser()
        lines = ["# Command line", "", "Generated from `loraplex.cli.parser()`: the `--help` of each command.", ""]
        lines += ["## `loraplex`", "", "```text", p.format_help().rstrip(), "```", ""]
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        for action in subs:
            for name, sub in action.choices.items():
                lines += [f"## `loraplex {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(lines)


def plot_png(rows: list[CompareRow]) -> bytes | None:
    """Accuracy against adapter parameters (log scale) of the compare rows, as PNG bytes."""
    if not rows:
        return None
    import io

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in rows:
        acc = float(r.accuracy.split()[0])
        ax.scatter(r.params, acc, s=22)
        ax.annotate(r.method, (r.params, acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # overlapping 3x10^4, 4x10^4 labels
    ax.set_xlabel("adapter parameters")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"loraplex compare, budget {_num(rows[0].budget)}, MiniLM-L6, embedded data")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def choosing_page(compare: dict[str, CompareRow], speed: dict[str, dict[str, Any]], plotted: bool) -> str:
    from loraplex import METHODS

    lines = [
        "# Choosing a method",
        "",
        "Built from the committed results: `loraplex compare --budget 300k` on the embedded MiniLM-L6 and "
        "data (one epoch) and `benchmarks/speed.py` (default options, every linear layer). Small data, one "
        "epoch, few seeds: differences of a few points are within noise; run `loraplex compare --seeds 3` "
        "on your own data before deciding.",
        "",
        "| method | size at 300k | adapter params | accuracy | macro-F1 | ms/step (speed run) | x our LoRA | PEFT |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    ranked = sorted(METHODS, key=lambda m: -float(compare[m].accuracy.split()[0]) if m in compare else 1.0)
    for name in ranked:
        r = compare.get(name)
        s = speed.get(name)
        size, params = (f"`{r.size}`", _num(r.params)) if r else ("–", "–")
        acc, f1 = (r.accuracy, r.macro_f1) if r else ("not measured", "–")
        ms, ratio = (f"{s['median_ms']:.1f}", f"{s['x_ours_lora']:.2f}") if s else ("not measured", "–")
        peft = "yes" if METHODS[name].peft_type else "no"
        lines.append(f"| [`{name}`](methods/{name}.md) | {size} | {params} | {acc} | {f1} | {ms} | {ratio} | {peft} |")
    sources = sorted({r.source for r in compare.values()})
    top = ", ".join(f"`{m}` ({compare[m].accuracy})" for m in ranked[:3] if m in compare) or "not measured"
    lines += ["", f"Sources: {', '.join(f'`{s}`' for s in sources) or 'none'}, `benchmarks/results/{SPEED_FILE.name}`."]
    lines += [""]
    if plotted:
        lines += ["![accuracy against adapter parameters](accuracy_vs_params.png)", ""]
    else:
        lines += ["No committed compare results: no plot.", ""]
    lines += [
        "Rules of thumb from these numbers and the method pages:",
        "",
        f"* Highest accuracy at this budget on this data: {top}.",
        "* `lora` is the fast, mergeable, PEFT-compatible baseline; `dora` / `bora` add magnitudes at a speed cost.",
        "* Very small budgets: the structured methods (`circulant`, `toeplitz`, `kronecker`, `lokr`, `loldu`) "
        "train one to two orders of magnitude fewer parameters.",
        "* Need PEFT or LoRA-only serving? Methods with a PEFT equivalent export directly; any weight-update "
        "method converts with `loraplex.to_lora`.",
        "",
    ]
    return "\n".join(lines)


def pages() -> dict[str, str | bytes]:
    """Every generated file: path relative to ``docs/`` -> content."""
    from loraplex import METHODS

    rows = compare_results()
    compare = at_budget(rows)
    others = [r for r in rows if r.budget != BUDGET]
    speed = speed_results()
    out: dict[str, str | bytes] = {}
    for name, path in method_page_names().items():
        out[path] = method_page(name, compare, others, speed.get(name, {}))
    out["generated/methods/index.md"] = methods_index(compare)
    out["generated/cli.md"] = cli_page()
    png = plot_png([compare[m] for m in METHODS if m in compare])
    if png is not None:
        out[f"generated/{PLOT}"] = png
    out["generated/choosing.md"] = choosing_page(compare, speed, png is not None)
    return out


def write(docs: Path = DOCS) -> list[Path]:
    """Write :func:`pages` under ``docs``; only changed files are touched. Returns the files written."""
    written = []
    for rel, content in pages().items():
        path = docs / rel
        data = content.encode("utf-8") if isinstance(content, str) else content
        if path.exists() and path.read_bytes() == data:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written


def nav_methods() -> list[Any]:
    """The navigation entries of the "Methods" section."""
    from loraplex import METHODS

    return ["generated/methods/index.md"] + [
        {f"{name} ({METHODS[name].__name__})": path} for name, path in method_page_names().items()
    ]


# --------------------------------------------------------------------------- MkDocs hook


def on_config(config: Any) -> Any:
    """MkDocs hook: generate the pages, then expand the ``Methods`` navigation entry."""
    write()
    nav = config.get("nav") or []
    for i, entry in enumerate(nav):
        if isinstance(entry, dict) and "Methods" in entry:
            nav[i] = {"Methods": nav_methods()}
    return config


def main() -> int:
    if sys.argv[1:] == ["--readme"]:  # regenerate the README methods table's options cells
        readme = ROOT / "README.md"
        readme.write_text(readme_with_options(readme.read_text(encoding="utf-8")), encoding="utf-8")
        return 0
    written = write()
    print(f"docs/gen.py: {len(pages())} generated files, {len(written)} changed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
