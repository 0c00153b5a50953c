"""The ``loraplex`` command line: one sub-command, one library call."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from loraplex._version import __version__
from loraplex.adapters import METHODS
from loraplex.compression.lord import COMPRESSION_METHODS, SOLVERS
from loraplex.optim.registry import OPTIMIZERS
from loraplex.rank import ALLOCATORS
from loraplex.train import allocator_names


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


def cmd_methods(args: argparse.Namespace) -> int:
    """Each method's paper, formula and declared options (``declared_options``: default, valid values, meaning),
    then each allocator's."""
    for name, cls in METHODS.items():
        print(f"{name:10s} {cls.__name__}  {cls.paper}")
        print(f"{'':10s} trainable parameters per layer: {cls.formula}")
        print(f"{'':10s} options:")
        for key, option in cls.declared_options.items():
            print(f"{'':12s} {f'{key}={option.default!r}':24s} {option.describe()}")
    for name, allocator in ALLOCATORS.items():
        print(f"{name:10s} allocator {allocator.__name__} (--allocator {name} --allocator-option KEY=VALUE)")
        for key, option in allocator.declared_options.items():
            print(f"{'':12s} {f'{key}={option.default!r}':24s} {option.describe()}")
    return 0


def options_epilog() -> str:
    """``finetune --help``'s list of every method's and allocator's declared options, with their defaults."""

    def line(name: str, table: dict[str, Any]) -> str:
        return f"  {name}: " + (", ".join(f"{k}={o.default!r}" for k, o in table.items()) or "(none)")

    out = ["method options (--option KEY=VALUE; `loraplex methods` gives each one's valid values and meaning):"]
    out += [line(name, cls.declared_options) for name, cls in METHODS.items()]
    out += ["allocator options (--allocator-option KEY=VALUE):"]
    out += [line(name, cls.declared_options) for name, cls in ALLOCATORS.items()]
    return "\n".join(out)


def _targets(text: str) -> Any:
    return [t for t in text.split(",") if t] if "," in text else text


def cmd_finetune(args: argparse.Namespace) -> int:
    from loraplex.train import FinetuneConfig, finetune

    options = _options(args.option)
    for key in ("rank", "alpha"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    cfg = FinetuneConfig(
        model=args.model,
        data=args.data,
        test_data=args.test_data,
        method=args.method,
        options=options,
        targets=_targets(args.targets),
        train=[t for t in args.train.split(",") if t],
        optimizer=args.optimizer,
        optimizer_options=_options(args.optimizer_option),
        allocator=args.allocator,
        allocator_options=_options(args.allocator_option),
        epochs=args.epochs,
        lr=args.lr,
        head_lr=args.head_lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        seed=args.seed,
        out=args.out,
        resume=args.resume,
        stop_after=args.stop_after,
        checkpoint_every=args.checkpoint_every,
        fsdp=args.fsdp,
        progress=not args.no_progress,
        dist_timeout=args.dist_timeout,
    )
    try:
        finetune(cfg)
    except ValueError as e:
        print(f"loraplex finetune: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # NonFiniteError: a NaN / inf loss, the last good checkpoint kept
        print(f"loraplex finetune: error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from loraplex.compare import CompareConfig, compare

    cfg = CompareConfig(
        methods=[m for m in args.methods.split(",") if m] if args.methods else list(METHODS),
        budget=args.budget,
        budget_like=args.budget_like,
        model=args.model,
        data=args.data,
        test_data=args.test_data,
        targets=_targets(args.targets),
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seeds=args.seeds,
        out=args.out,
    )
    try:
        compare(cfg)
    except ValueError as e:
        print(f"loraplex compare: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from loraplex.analysis.report import layer_report, load_model, markdown, plot, summary

    try:
        model = load_model(args.model, adapter=args.adapter)
        rows = layer_report(model, _targets(args.targets), energy=args.energy)
    except ValueError as e:
        print(f"loraplex inspect: error: {e}", file=sys.stderr)
        return 2
    print(markdown(rows))
    print(summary(rows))
    if args.plot:
        print(f"plot: {plot(rows, args.plot, title=f'singular-value spectra of {args.model}')}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from loraplex.compression.workbench import CompressConfig, run, summary

    cfg = CompressConfig(
        model=args.model,
        out=args.out,
        rank=args.rank,
        energy=args.energy,
        ratio=args.ratio,
        method=args.method,
        solver=args.solver,
        allocation=args.allocation,
        targets=_targets(args.targets),
        data=args.data,
        test_data=args.test_data,
        calibration_rows=args.calibration_rows,
        eval_rows=args.eval_rows,
        max_length=args.max_length,
    )
    try:
        report = run(cfg)
    except ValueError as e:
        print(f"loraplex compress: error: {e}", file=sys.stderr)
        return 2
    print(summary(report))
    print(f"saved to {cfg.out}: load with loraplex.load_compressed({cfg.out!r})")
    return 0


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local HuggingFace model directory (default: the embedded MiniLM-L6)")
    p.add_argument("--data", help="CSV or JSONL with text (or text_a, text_b), label[, split] (default: embedded)")
    p.add_argument("--test-data", help="separate test file (default: rows with split == test)")
    p.add_argument("--targets", default="all-linear", help="all-linear, a regex, or comma-separated names")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (split over torchrun processes)")
    p.add_argument("--max-length", type=int, default=64)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplex", description="Low-rank adaptation and compression workbench.")
    p.add_argument("--version", action="version", version=f"loraplex {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("methods", help="list every method with its paper, options and parameter formula")
    m.set_defaults(func=cmd_methods)

    f = sub.add_parser(
        "finetune",
        help="fine-tune a local HuggingFace model for text classification",
        epilog=options_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _data_args(f)
    f.add_argument("--method", default="lora", choices=[*sorted(METHODS), "full"], help="full: full fine-tuning")
    f.add_argument("--rank", type=int)
    f.add_argument("--alpha", type=float)
    f.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="any method option")
    f.add_argument("--train", default="classifier", help="comma-separated modules trained in full")
    f.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS))
    f.add_argument("--optimizer-option", action="append", default=[], metavar="KEY=VALUE", help="e.g. ratio=16")
    f.add_argument("--allocator", default="none", choices=allocator_names(), help="rank allocation")
    f.add_argument("--allocator-option", action="append", default=[], metavar="KEY=VALUE", help="allocator option")
    f.add_argument("--epochs", type=float, default=3.0)
    f.add_argument("--lr", type=float, help="learning rate (default: the method's, from its paper)")
    f.add_argument("--head-lr", type=float, help="learning rate of the --train modules (default: --lr)")
    f.add_argument("--warmup", type=float, default=0.06, help="fraction of steps of linear warm-up")
    f.add_argument("--weight-decay", type=float, default=0.0)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", help="output folder (default: a new folder under runs/)")
    f.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")
    f.add_argument("--stop-after", type=int, help="leave after N steps of this invocation, with a checkpoint")
    f.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: one per epoch)")
    f.add_argument("--fsdp", action="store_true", help="FullyShardedDataParallel (under torchrun)")
    f.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    f.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help="under torchrun: wait this long for the other processes, then fail "
                   "(default: $LORAPLEX_DIST_TIMEOUT, else 600)")  # fmt: skip
    f.set_defaults(func=cmd_finetune)

    c = sub.add_parser("compare", help="several methods on one model and data set at a matched parameter budget")
    _data_args(c)
    c.add_argument("--methods", help="comma-separated (default: every method)")
    budget = c.add_mutually_exclusive_group()
    budget.add_argument("--budget", help="adapter parameters per method, e.g. 300k or 1.2M")
    budget.add_argument("--budget-like", help="the adapter parameters of METHOD:SIZE, e.g. lora:8")
    c.add_argument("--epochs", type=float, default=1.0)
    c.add_argument("--seeds", type=int, default=1, help="runs per method (mean and spread reported)")
    c.add_argument("--out", help="output folder (default: a new folder under runs/)")
    c.set_defaults(func=cmd_compare)

    z = sub.add_parser("compress", help="one-shot low-rank compression (LoRD) of a local HuggingFace encoder")
    z.add_argument("model", nargs="?", default="minilm", help="local model folder, or minilm (the embedded one)")
    z.add_argument("--out", required=True, help="output folder (compression.json, model.safetensors, tokenizer)")
    keep = z.add_mutually_exclusive_group(required=True)
    keep.add_argument("--ratio", type=float, help="fraction of the targeted weight parameters kept")
    keep.add_argument("--energy", type=float, help="fraction of each layer's spectral energy kept")
    keep.add_argument("--rank", type=int, help="the rank of every factorised layer")
    z.add_argument("--method", default="svd", choices=list(COMPRESSION_METHODS),
                   help="; ".join(f"{k}: {m.description}" for k, m in COMPRESSION_METHODS.items()))  # fmt: skip
    z.add_argument("--solver", default="auto", choices=list(SOLVERS))
    z.add_argument("--allocation", default="error", choices=["error", "uniform"],
                   help="--ratio spread by least total error, or the same fraction of every layer")  # fmt: skip
    z.add_argument("--targets", default="all-linear", help="all-linear, a regex, or comma-separated names")
    z.add_argument("--data", help="CSV or JSONL for calibration and evaluation (default: embedded)")
    z.add_argument("--test-data", help="separate test file (default: rows with split == test)")
    z.add_argument("--calibration-rows", type=int, default=256, help="train texts for --method activation")
    z.add_argument("--eval-rows", type=int, help="train texts embedded for the head fit (default: all)")
    z.add_argument("--max-length", type=int, default=64)
    z.set_defaults(func=cmd_compress)

    i = sub.add_parser("inspect", help="spectral report (stable, effective, energy ranks) of a model's layers")
    i.add_argument("model", metavar="MODEL_DIR_OR_NAME", help="local HuggingFace model directory, or minilm")
    i.add_argument("--adapter", help="adapter folder (loraplex.save / loraplex finetune --out): also report ΔW")
    i.add_argument("--targets", default="all-linear", help="all-linear, a regex, or comma-separated names")
    i.add_argument("--energy", type=float, default=0.9, help="energy threshold of the energy-rank column")
    i.add_argument("--plot", metavar="FILE.png", help="write spectra and rank bars to this PNG")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))
