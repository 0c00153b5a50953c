"""The ``loraplex`` command line: one sub-command, one library call."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Sequence
from typing import Any

from loraplex._version import __version__
from loraplex.adapters import METHODS


def _value(text: str) -> Any:
    """``--option key=value`` values: JSON when it parses (numbers, true/false), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option {pair!r} must look like key=value")
        out[key] = _value(val)
    return out


def method_options(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters.values()  # type: ignore[misc]
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def cmd_methods(args: argparse.Namespace) -> int:
    for name, cls in METHODS.items():
        opts = ", ".join(f"{k}={v!r}" for k, v in method_options(cls).items())
        print(f"{name:10s} {cls.__name__}  {cls.paper}")
        print(f"{'':10s} options: {opts}")
        print(f"{'':10s} trainable parameters per layer: {cls.formula}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from loraplex.train import FinetuneConfig, finetune

    options = _options(args.option)
    for key in ("rank", "alpha"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    targets: Any = args.targets
    if "," in targets:
        targets = [t for t in targets.split(",") if t]
    cfg = FinetuneConfig(
        model=args.model,
        data=args.data,
        test_data=args.test_data,
        method=args.method,
        options=options,
        targets=targets,
        train=[t for t in args.train.split(",") if t],
        epochs=args.epochs,
        lr=args.lr,
        head_lr=args.head_lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        out=args.out,
    )
    try:
        finetune(cfg)
    except ValueError as e:
        print(f"loraplex finetune: error: {e}", file=sys.stderr)
        return 2
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplex", description="Low-rank adaptation and compression workbench.")
    p.add_argument("--version", action="version", version=f"loraplex {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("methods", help="list every method with its paper, options and parameter formula")
    m.set_defaults(func=cmd_methods)

    f = sub.add_parser("finetune", help="fine-tune a local HuggingFace model for text classification")
    f.add_argument("--model", help="local HuggingFace model directory (default: the embedded MiniLM-L6)")
    f.add_argument("--data", help="CSV or JSONL with text,label[,split] (default: the embedded Debian sections)")
    f.add_argument("--test-data", help="separate test file (default: rows with split == test)")
    f.add_argument("--method", default="lora", choices=sorted(METHODS))
    f.add_argument("--rank", type=int)
    f.add_argument("--alpha", type=float)
    f.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="any method option")
    f.add_argument("--targets", default="all-linear", help="all-linear, a regex, or comma-separated names")
    f.add_argument("--train", default="classifier", help="comma-separated modules trained in full")
    f.add_argument("--epochs", type=float, default=3.0)
    f.add_argument("--lr", type=float, help="learning rate (default: the method's)")
    f.add_argument("--head-lr", type=float, help="learning rate of the --train modules (default: --lr)")
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--max-length", type=int, default=64)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", help="output folder (default: a new folder under runs/)")
    f.set_defaults(func=cmd_finetune)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))
