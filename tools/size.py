"""The package's size budget (issue 19; after tinygrad's `sz.py`): stdlib only, run by `make lint`.

Per module of `loraplex/` it counts *code* lines (non-blank, non-comment, docstrings apart) and
*code-and-docstring* lines (non-blank, non-comment), prints them sorted by size with totals, and with
`--check` fails (exit 1) when

- the total code lines exceed `BUDGET`, or
- a method file has more than `METHOD_LIMIT` code-and-docstring lines and no line `# size: <reason>`.

Method files are the public modules (name not starting with `_`) of `adapters/` (one registered method
each), `rank/` (allocators), `optim/` (optimizers) and `lowrank/` (factorisations), less the shared
infrastructure listed in `NOT_METHODS`. The folders are read from disk, not imported, so the script
needs no torch.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

BUDGET = 9300  # total code lines of the package: 8,436 when set, about 10% headroom
METHOD_LIMIT = 250  # code-and-docstring lines of a method file before it needs a `# size:` reason
METHOD_DIRS = ("adapters", "rank", "optim", "lowrank")
NOT_METHODS = {"__init__.py", "rank/base.py", "rank/report.py", "optim/registry.py"}
REASON = re.compile(r"^\s*# size: \S")
PACKAGE = Path(__file__).resolve().parent.parent / "loraplex"

_NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
_NOT_CODE |= {tokenize.ENCODING, tokenize.ENDMARKER}


@dataclass(frozen=True)
class Count:
    path: str  # relative to the package's parent, e.g. "loraplex/adapters/lora.py"
    code: int  # non-blank, non-comment lines outside docstrings
    code_and_doc: int  # non-blank, non-comment lines
    reason: str | None  # the text after `# size:`, if the file has such a line


def docstring_lines(source: str) -> set[int]:
    """The line numbers (1-based) of the docstrings of the module, its classes and its functions."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return lines


def count_source(source: str, path: str = "<string>") -> Count:
    """Count one file's lines: a line is counted when a token other than a comment touches it."""
    touched: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in _NOT_CODE:
            touched.update(range(tok.start[0], tok.end[0] + 1))
    # a multi-line string's blank lines are blank lines all the same
    text = source.splitlines()
    touched = {n for n in touched if n <= len(text) and text[n - 1].strip()}
    reasons = [line.split("# size:", 1)[1].strip() for line in text if REASON.match(line)]
    code = len(touched - docstring_lines(source))
    return Count(path, code, len(touched), reasons[0] if reasons else None)


def count_package(package: Path = PACKAGE) -> list[Count]:
    """Every module of the package, largest (in code lines) first."""
    counts = [
        count_source(p.read_text(encoding="utf-8"), p.relative_to(package.parent).as_posix())
        for p in sorted(package.rglob("*.py"))
    ]
    return sorted(counts, key=lambda c: (-c.code, c.path))


def is_method_file(rel: str) -> bool:
    """`rel` is relative to the package, e.g. "adapters/lora.py"."""
    parts = rel.split("/")
    return (
        len(parts) == 2
        and parts[0] in METHOD_DIRS
        and not parts[1].startswith("_")
        and rel not in NOT_METHODS
        and parts[1] not in NOT_METHODS
    )


def check(package: Path = PACKAGE, budget: int = BUDGET, limit: int = METHOD_LIMIT) -> list[str]:
    """The budget's failures, one sentence each; empty when the package is within it."""
    counts = count_package(package)
    failures = []
    total = sum(c.code for c in counts)
    if total > budget:
        failures.append(f"{package.name}: {total} code lines, over the budget of {budget} (tools/size.py BUDGET)")
    for c in counts:
        rel = c.path.split("/", 1)[1]
        if is_method_file(rel) and c.code_and_doc > limit and c.reason is None:
            failures.append(
                f"{c.path}: {c.code_and_doc} code-and-docstring lines, over the method limit of {limit}, "
                "and no `# size: <reason>` line in the file"
            )
    return failures


def table(counts: list[Count], budget: int = BUDGET, top: int | None = None) -> str:
    width = max([len(c.path) for c in counts] + [len("module")])
    rows = [f"{'module':<{width}}  {'code':>5}  {'+doc':>5}  method  reason", "-" * (width + 40)]
    for c in counts[:top]:
        method = "yes" if is_method_file(c.path.split("/", 1)[1]) else ""
        rows.append(f"{c.path:<{width}}  {c.code:>5}  {c.code_and_doc:>5}  {method:<6}  {c.reason or ''}".rstrip())
    if top is not None and len(counts) > top:
        rows.append(f"... {len(counts) - top} more modules")
    rows.append("-" * (width + 40))
    code, both = sum(c.code for c in counts), sum(c.code_and_doc for c in counts)
    rows.append(f"{'total (' + str(len(counts)) + ' modules)':<{width}}  {code:>5}  {both:>5}")
    rows.append(f"budget: {code} of {budget} code lines ({budget - code} left)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 when the budget or a method limit is broken")
    parser.add_argument("--top", type=int, default=None, help="print only the N largest modules")
    args = parser.parse_args(argv)
    print(table(count_package(), top=args.top))
    if not args.check:
        return 0
    failures = check()
    for failure in failures:
        print(f"size: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
