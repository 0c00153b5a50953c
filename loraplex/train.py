"""Fine-tune a local HuggingFace model for text classification with any registered adapter.

One loop for one CPU, one GPU or many processes (``torchrun``: DistributedDataParallel, or
FullyShardedDataParallel with ``fsdp``). Every step's batch is a pure function of
``(seed, epoch, step in epoch)``, so a run resumed from a checkpoint sees the same batches, and
the saved random state makes dropout continue where it stopped: ``--resume`` gives the weights of
the uninterrupted run (tested).
"""

from __future__ import annotations

import math
import os
import random
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loraplex.adapters import METHODS
from loraplex.checkpoint import load_checkpoint, recover, save_checkpoint
from loraplex.data import Split, load_splits
from loraplex.files import write_json, write_text
from loraplex.inject import Targets, adapt, add_trained, advance, count_trainable
from loraplex.io import load, save, tensors_of
from loraplex.models import default_model_path
from loraplex.optim.registry import OPTIMIZERS
from loraplex.rank import ALLOCATORS, INITIALISERS
from loraplex.rank.base import Allocator
from loraplex.rank.report import adapter_ranks, heatmap
from loraplex.rank.report import table as rank_table

CHECKPOINT = "checkpoint"
FULL = "full"  # --method full: full fine-tuning, the reference the low-rank methods are compared with
FULL_LR = 2e-5  # BERT's fine-tuning range (Devlin et al.: 2e-5..5e-5)
DIST_TIMEOUT = 600.0  # seconds; PyTorch's default is 30 min for gloo (10 min for NCCL)
DIST_TIMEOUT_ENV = "LORAPLEX_DIST_TIMEOUT"


@dataclass
class FinetuneConfig:
    """Everything a run depends on; saved next to its results.

    ``batch_size`` is the global batch: with N processes each takes ``batch_size / N`` rows.
    ``stop_after``: leave after this many steps of this invocation, with a checkpoint (resume later
    with ``resume=True``); ``checkpoint_every``: steps between checkpoints (default: once per epoch).
    ``dist_timeout``: seconds a process waits for the others (joining, each collective) under
    ``torchrun`` before it fails; default ``$LORAPLEX_DIST_TIMEOUT``, else 600 (see ``dist_timeout``).
    """

    model: str | None = None
    data: str | None = None
    test_data: str | None = None
    method: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)
    targets: Targets = "all-linear"
    train: list[str] = field(default_factory=lambda: ["classifier"])
    optimizer: str = "adamw"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    allocator: str = "none"
    allocator_options: dict[str, Any] = field(default_factory=dict)
    epochs: float = 3.0
    lr: float | None = None
    head_lr: float | None = None
    batch_size: int = 32
    max_length: int = 64
    warmup: float = 0.06
    weight_decay: float = 0.0
    seed: int = 0
    out: str | None = None
    log_every: int = 20
    resume: bool = False
    stop_after: int | None = None
    checkpoint_every: int | None = None
    fsdp: bool = False
    progress: bool = True
    dist_timeout: float | None = None


def macro_f1(pred: np.ndarray, gold: np.ndarray, n_classes: int) -> float:
    """Unweighted mean over classes of F1 (a class absent from both gold and pred counts as 0)."""
    scores = []
    for c in range(n_classes):
        tp = np.sum((pred == c) & (gold == c))
        fp, fn = np.sum((pred == c) & (gold != c)), np.sum((pred != c) & (gold == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dist_timeout(value: float | None = None) -> float:
    """Seconds a process waits for the others under ``torchrun`` before it fails with an error.

    ``value`` (``FinetuneConfig.dist_timeout``, ``--dist-timeout``), else the environment variable
    ``LORAPLEX_DIST_TIMEOUT``, else ``DIST_TIMEOUT`` = 600. It bounds joining the process group and
    every collective (gradient all-reduce, barriers). Decision (PyTorch leaves gloo at 30 min): 10 min,
    PyTorch's NCCL default, is far above the longest wait of a healthy run (rank 0 writing a checkpoint
    or the adapter while the others wait), yet a process whose peer died or hung exits within minutes.
    Under ``torchrun`` a process that raises is seen by the launcher at once, which stops the others
    (tested); the timeout covers what it cannot see (a peer that hangs, other launchers).

    >>> dist_timeout(30)
    30.0
    """
    text = os.environ.get(DIST_TIMEOUT_ENV) if value is None else None
    if text is not None:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{DIST_TIMEOUT_ENV}={text!r} must be a number of seconds > 0") from None
    got = DIST_TIMEOUT if value is None else float(value)
    if not (math.isfinite(got) and got > 0):
        raise ValueError(f"dist_timeout={value!r} must be a number of seconds > 0")
    return got


class NonFiniteError(FloatingPointError):
    """The loss, or a trained weight, became NaN or inf: the run stopped.

    The message names the step, the value and the last good checkpoint (kept, never overwritten with
    non-finite weights), which ``resume=True`` continues from.
    """


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an inf.

    >>> nonfinite({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")]), "n": torch.tensor([3])})
    ['b']
    """
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


@dataclass
class World:
    """This process's place among ``torchrun``'s processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        return cls(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def start(self, device: torch.device, timeout: float = DIST_TIMEOUT) -> None:
        """Join the process group; ``timeout`` seconds bound the join and every later collective."""
        if self.size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout))

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def in_sync(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether every process holds bit-identical adapter (and head) tensors (all-reduced max == min)."""
        if self.size == 1:
            return True
        flat = torch.cat([v.detach().float().flatten() for v in tensors.values()])
        high, low = flat.clone(), flat.clone()
        torch.distributed.all_reduce(high, torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(low, torch.distributed.ReduceOp.MIN)
        return torch.equal(high, low)

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether ``loss`` is finite on every process (a flag all-reduced: every process stops together)."""
        bad = (~torch.isfinite(loss.detach())).sum().reshape(1).float()
        if self.size > 1:
            torch.distributed.all_reduce(bad)
        return not bad.item()


def _encode(tokenizer: Any, split: Split, max_length: int) -> list[dict[str, list[int]]]:
    pairs = isinstance(split.texts[0], tuple)
    a = [t[0] if pairs else t for t in split.texts]
    b = [t[1] for t in split.texts] if pairs else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length)
    return [{k: enc[k][i] for k in enc} for i in range(len(a))]


def _collate(tokenizer: Any, rows: list[dict[str, list[int]]], labels: list[int], idx: list[int], device) -> dict:
    batch = tokenizer.pad([rows[j] for j in idx], return_tensors="pt")
    batch["labels"] = torch.tensor([labels[j] for j in idx])
    return {k: v.to(device) for k, v in batch.items()}


def batch_indices(seed: int, epoch: int, k: int, n: int, size: int, world: World) -> list[int]:
    """This process's rows of step ``k`` of ``epoch``: a pure function, so resumed runs see the same data."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)[k * size : (k + 1) * size].tolist()
    return order[world.rank :: world.size]


@torch.no_grad()
def evaluate(
    model: nn.Module, tokenizer: Any, rows: list, labels: list[int], n_classes: int, size: int, device
) -> dict:
    model.eval()
    preds = []
    for i in range(0, len(rows), size):
        batch = _collate(tokenizer, rows, labels, list(range(i, min(i + size, len(rows)))), device)
        batch.pop("labels")
        preds.append(model(**batch).logits.argmax(-1).cpu())
    pred, gold = torch.cat(preds).numpy(), np.array(labels)
    return {"accuracy": float(np.mean(pred == gold)), "macro_f1": macro_f1(pred, gold, n_classes)}


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FSDP's sharded ``DTensor``s gathered whole (a collective: every process must call it)."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in tensors.items()}


def _progress(total: int, start: int, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, disable=not enabled or None, unit="step", dynamic_ncols=True)


def _wrap(model: nn.Module, world: World, device: torch.device, fsdp: bool) -> nn.Module:
    if world.size == 1 and not fsdp:
        return model
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:  # pragma: no cover - torch < 2.6
            raise ValueError("fsdp=True needs torch.distributed.fsdp.fully_shard (torch >= 2.6)") from e
        if world.size == 1:
            raise ValueError("fsdp=True needs several processes: run under torchrun --nproc-per-node N")
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _schedule(warm: int, total: int) -> Callable[[int], float]:
    def factor(s: int) -> float:
        return (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm))

    return factor


def allocator_names() -> list[str]:
    """``--allocator`` choices: none, the step allocators of ``loraplex.rank.ALLOCATORS``, and its initialisers."""
    return ["none", *sorted(ALLOCATORS), *sorted(INITIALISERS)]


def _label(methods: tuple[str, ...]) -> str:
    return " / ".join(METHODS[m].__name__ for m in methods)


def _initialise(model: nn.Module, cfg: FinetuneConfig, batches: list[dict[str, Any]]) -> None:
    """The initialiser's gradient pre-pass and rank allocation in place of ``adapt`` (ranks fixed afterwards)."""
    spec = INITIALISERS[cfg.allocator]
    keys = spec.options
    opts = {k: v for k, v in cfg.options.items() if k in keys}
    if unknown := sorted(set(cfg.options) - set(keys)):
        raise ValueError(f"allocator={cfg.allocator!r} takes the {_label(spec.methods)} options {keys}, not {unknown}")
    spec.init(model, batches, targets=cfg.targets, train=cfg.train, seed=cfg.seed, **opts, **cfg.allocator_options)


def check_config(cfg: FinetuneConfig) -> None:
    if cfg.method not in METHODS and cfg.method != FULL:
        raise ValueError(f"method={cfg.method!r} is not one of: {', '.join([*METHODS, FULL])}")
    if cfg.method == FULL and (cfg.options or cfg.allocator != "none" or cfg.optimizer != "adamw"):
        raise ValueError("method='full' (full fine-tuning) takes no method options, allocator or LoRA optimizer")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={cfg.optimizer!r} is not one of: {', '.join(OPTIMIZERS)}")
    if cfg.allocator not in allocator_names():
        raise ValueError(f"allocator={cfg.allocator!r} is not one of: {', '.join(allocator_names())}")
    if (init := INITIALISERS.get(cfg.allocator)) is not None and cfg.method not in init.methods:
        raise ValueError(
            f"allocator={cfg.allocator!r} initialises {_label(init.methods)} adapters: method must be "
            f"{' or '.join(map(repr, init.methods))}, not {cfg.method!r}"
        )
    if not cfg.epochs > 0:
        raise ValueError(f"epochs={cfg.epochs!r} must be > 0")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size={cfg.batch_size!r} must be >= 1")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise ValueError(f"stop_after={cfg.stop_after!r} must be >= 1")
    if cfg.checkpoint_every is not None and cfg.checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={cfg.checkpoint_every!r} must be >= 1")
    dist_timeout(cfg.dist_timeout)  # a bad value or $LORAPLEX_DIST_TIMEOUT fails here, before any process waits
    if cfg.fsdp and cfg.allocator in ALLOCATORS and ALLOCATORS[cfg.allocator].resizes:
        raise ValueError(f"allocator={cfg.allocator!r} resizes parameters, which FSDP's shards cannot follow")
    if cfg.fsdp and (cfg.resume or cfg.stop_after or cfg.checkpoint_every):
        # FSDP's optimizer state is sharded per process; one process writing it all is not implemented
        raise ValueError("fsdp=True does not checkpoint mid-run: drop resume / stop_after / checkpoint_every")


def classifier(model_dir: str, num_labels: int) -> nn.Module:
    """A sequence classifier from a HuggingFace folder, or from a compressed one (LoRD, then fine-tuning).

    A compressed folder (``compression.json``) gets a fresh head, as ``from_pretrained`` gives a
    plain encoder; the factorised encoder is loaded into the classifier's base model.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from loraplex.compression.io import is_compressed, load_compressed

    if not is_compressed(model_dir):
        return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    config = AutoConfig.from_pretrained(model_dir, num_labels=num_labels)
    return load_compressed(model_dir, AutoModelForSequenceClassification.from_config(config))


def _kept(ckpt: Path, good: int | None, fsdp: bool = False) -> str:
    """The part of a ``NonFiniteError`` message that says where the last good checkpoint is."""
    if good is None:
        why = "fsdp=True does not checkpoint" if fsdp else "see checkpoint_every / --checkpoint-every"
        return f"no checkpoint was written before it ({why})"
    return f"the last good checkpoint (after step {good}) is kept in {ckpt}: resume=True (--resume) continues from it"


def _check_weights(
    tensors: dict[str, torch.Tensor],
    done: int,
    total: int,
    loss: float,
    ckpt: Path,
    good: int | None,
    fsdp: bool = False,
) -> None:
    """Raise ``NonFiniteError`` before a save if a trained tensor holds NaN / inf (every process: identical weights)."""
    if bad := nonfinite(tensors):
        raise NonFiniteError(
            f"after step {done} of {total} the trained weights {bad[:3]} hold NaN or inf although the loss was "
            f"finite ({loss:.4g}): a gradient or update overflowed; stopping; " + _kept(ckpt, good, fsdp)
        )


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train an adapter, evaluate on the test split, save adapter + ``metrics.json`` to ``cfg.out``.

    Returns the metrics (``{"stopped_at": step}`` only, when ``stop_after`` ended the run early).

    Reliability (issue 10, tested in ``tests/test_reliability_train.py``):

    - Killed at any point after its first checkpoint (``SIGKILL``, also in the middle of writing a
      checkpoint or the adapter), a run continues with ``resume=True`` (``--resume``) and ends with the
      adapter of the uninterrupted run, bit for bit on CPU: batches are a function of (seed, step),
      the checkpoint holds optimizer, scheduler, allocator and random state, and it is swapped in by
      renames (a killed save leaves the previous one). Killed before its first checkpoint, a run has
      nothing to resume: start it again without ``resume``.
    - A NaN or inf loss (on any process) raises ``NonFiniteError`` naming the step, the value and the
      last good checkpoint. The weights from before that step are written as the checkpoint (with the
      random state from before the step, so resuming replays it exactly) unless they are already
      non-finite; no checkpoint is ever written with non-finite weights (checked before each save).
    - Under ``torchrun`` a process that fails makes every process exit with an error: the launcher
      stops the others at once, and every join, all-reduce and barrier is bounded by
      ``cfg.dist_timeout`` (default 600 s, or ``$LORAPLEX_DIST_TIMEOUT``; see ``dist_timeout``). A
      process that lost the others (a timed-out or closed connection) says so, with its rank.
    """
    try:
        return _finetune(cfg)
    except RuntimeError as e:
        world = World.from_env()
        text = str(e).lower()
        if world.size > 1 and ("timed out" in text or "connection closed" in text or "timeout" in text):
            raise RuntimeError(
                f"process {world.rank} of {world.size} lost the other processes: one of them failed or hangs (see "
                f"its error); every wait for them is bounded by dist_timeout={dist_timeout(cfg.dist_timeout):g} s "
                f"(--dist-timeout, ${DIST_TIMEOUT_ENV}). {e}"
            ) from e
        raise


@dataclass
class _Run:
    """What :func:`_build` sets up and :func:`_loop` / :func:`_finish` use (``wrapped`` is re-wrapped in the loop)."""

    cfg: FinetuneConfig
    world: World
    device: torch.device
    out: Path
    ckpt: Path
    tokenizer: Any
    model: nn.Module
    wrapped: nn.Module
    train: Split
    test: Split
    names: list[str]
    rows_train: list[dict[str, list[int]]]
    rows_test: list[dict[str, list[int]]]
    steps_per_epoch: int
    total: int
    trainable: int
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    allocator: Allocator | None
    start_step: int


@dataclass
class _Trained:
    """What :func:`_loop` leaves: the per-step losses, the training time, the last checkpoint's step."""

    losses: list[float]
    train_seconds: float
    good: int | None
    stopped_at: int | None = None  # the step ``stop_after`` ended the run at


def _finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    run = _build(cfg)
    trained = _loop(run)
    if trained.stopped_at is not None:
        return {"stopped_at": trained.stopped_at}
    return _finish(run, trained)


def _build(cfg: FinetuneConfig) -> _Run:
    """Check the config, start the processes, load data and model, adapt it; optimizer, schedule, allocator."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    check_config(cfg)
    world = World.from_env()
    device = world.device()
    if world.size > 1 and cfg.batch_size % world.size:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {world.size} processes")
    world.start(device, dist_timeout(cfg.dist_timeout))
    out = Path(cfg.out or Path("runs") / time.strftime(f"%Y%m%d-%H%M%S-{cfg.method}"))
    ckpt = out / CHECKPOINT
    if cfg.resume and not (recover(ckpt) / "state.json").is_file():
        raise ValueError(f"resume=True but {ckpt} holds no checkpoint")
    seed_everything(cfg.seed)
    train, test, names = load_splits(cfg.data, cfg.test_data)
    model_dir = str(cfg.model or default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = classifier(model_dir, len(names))
    model.to(device)
    rows_train = _encode(tokenizer, train, cfg.max_length)
    rows_test = _encode(tokenizer, test, cfg.max_length)
    steps_per_epoch = math.ceil(len(rows_train) / cfg.batch_size)
    if cfg.resume:
        load(model, ckpt)  # the same adapters and head, as saved (no re-init)
    elif (init := INITIALISERS.get(cfg.allocator)) is not None:  # the first n epoch-0 batches feed the pre-pass
        n = min(int(cfg.allocator_options.get(init.steps_option) or init.default_steps), steps_per_epoch)
        pre = [batch_indices(cfg.seed, 0, k, len(rows_train), cfg.batch_size, world) for k in range(n)]
        _initialise(model, cfg, [_collate(tokenizer, rows_train, train.labels, rows, device) for rows in pre])
    elif cfg.method == FULL:  # every parameter trains; saved as one "train" module, the root
        add_trained(model, [""])
    else:
        adapt(model, cfg.method, targets=cfg.targets, train=cfg.train, **cfg.options)
    model.to(device)
    total = max(1, round(cfg.epochs * steps_per_epoch))
    trainable = count_trainable(model)
    wrapped = _wrap(model, world, device, cfg.fsdp)  # FSDP replaces parameters: build the optimizer after
    lr = cfg.lr if cfg.lr is not None else (FULL_LR if cfg.method == FULL else METHODS[cfg.method].default_lr)
    head = {id(p) for t in cfg.train for p in model.get_submodule(t).parameters()} if cfg.head_lr else set()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in head], "lr": lr}]
    if head:
        groups.append({"params": [p for p in params if id(p) in head], "lr": cfg.head_lr})
    opt = OPTIMIZERS[cfg.optimizer](model, groups, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(int(cfg.warmup * total), total))
    allocator = None
    if cfg.allocator in ALLOCATORS:
        cls = ALLOCATORS[cfg.allocator]
        extra = {"ddp_rewrap": True} if cls.resizes and world.size > 1 else {}  # this loop re-wraps (below)
        allocator = cls(model, total, **cfg.allocator_options, **extra)
    start_step = load_checkpoint(ckpt, opt, sched, allocator) if cfg.resume else 0
    if world.main:
        what = f"{cfg.method} {cfg.options}: {trainable:,} trainable parameters, {total} steps, lr {lr:g}"
        print(what + (f", resumed at step {start_step}" if start_step else ""), flush=True)
    return _Run(
        cfg=cfg,
        world=world,
        device=device,
        out=out,
        ckpt=ckpt,
        tokenizer=tokenizer,
        model=model,
        wrapped=wrapped,
        train=train,
        test=test,
        names=names,
        rows_train=rows_train,
        rows_test=rows_test,
        steps_per_epoch=steps_per_epoch,
        total=total,
        trainable=trainable,
        opt=opt,
        sched=sched,
        allocator=allocator,
        start_step=start_step,
    )


def _loop(run: _Run) -> _Trained:
    """The training steps from ``run.start_step``: checkpoints, the non-finite guard, ``stop_after``."""
    cfg, world, model, ckpt, total = run.cfg, run.world, run.model, run.ckpt, run.total
    opt, sched, allocator, start_step = run.opt, run.sched, run.allocator, run.start_step
    every = cfg.checkpoint_every or run.steps_per_epoch
    good = start_step if cfg.resume else None  # the step of the last checkpoint this run wrote or read
    bar = _progress(total, start_step, cfg.progress and world.main)
    losses: list[float] = []
    clock = time.perf_counter()
    for step in range(start_step, total):
        epoch, k = divmod(step, run.steps_per_epoch)
        run.wrapped.train()
        before = torch.get_rng_state()  # dropout's; nothing in a step draws from Python's or NumPy's generators
        idx = batch_indices(cfg.seed, epoch, k, len(run.rows_train), cfg.batch_size, world)
        loss = run.wrapped(**_collate(run.tokenizer, run.rows_train, run.train.labels, idx, run.device)).loss
        if not world.all_finite(loss):
            if not cfg.fsdp and good != step and not nonfinite(tensors_of(model)):
                torch.set_rng_state(before)  # saved with the weights from before this step: resuming replays it
                if world.main:
                    save_checkpoint(ckpt, model, opt, sched, step, allocator)
                good = step
            world.barrier()  # the others wait for the save before they leave
            value = loss.item()
            shown = f"{value}" if not math.isfinite(value) else f"{value} here but not finite on another process"
            where = f"step {step + 1} of {total} (epoch {epoch + 1}, batch {k + 1})"
            raise NonFiniteError(f"loss is {shown} at {where}: stopping; " + _kept(ckpt, good, cfg.fsdp))
        loss.backward()
        if allocator is not None:
            allocator.before_step()  # regulariser gradients (see loraplex.rank.base)
        opt.step()
        advance(model)  # one optimizer step (SingLoRA's ramp counts these)
        if allocator is not None:
            allocator.step(opt)
            if allocator.resized and world.size > 1:
                run.wrapped = _wrap(model, world, run.device, cfg.fsdp)  # DDP must see the new parameters
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if world.main and (bar is None or bar.disable) and (done % cfg.log_every == 0 or done == total):
            recent = losses[-cfg.log_every :]
            print(f"  step {done}/{total}  loss {sum(recent) / len(recent):.4f}", flush=True)
        stopping = cfg.stop_after is not None and done - start_step >= cfg.stop_after and done < total
        if not cfg.fsdp and (done % every == 0 or stopping):
            _check_weights(tensors_of(model), done, total, losses[-1], ckpt, good)
            if world.main:
                save_checkpoint(ckpt, model, opt, sched, done, allocator)
            good = done
        if stopping:
            world.barrier()
            if bar is not None:
                bar.close()
            return _Trained(losses, time.perf_counter() - clock, good, stopped_at=done)
    if bar is not None:
        bar.close()
    return _Trained(losses, time.perf_counter() - clock, good)


def _finish(run: _Run, trained: _Trained) -> dict[str, Any]:
    """Check and gather the weights, evaluate on the test split; save adapter, ranks, checkpoint, metrics."""
    cfg, world, model, device, total, losses = run.cfg, run.world, run.model, run.device, run.total, trained.losses
    tensors = full_tensors(tensors_of(model))  # FSDP: gathered on every process; else as they are
    _check_weights(tensors, total, total, losses[-1] if losses else math.nan, run.ckpt, trained.good, cfg.fsdp)
    in_sync = world.in_sync(tensors)
    if not in_sync:
        raise RuntimeError("the processes ended with different adapter weights")
    steps_run = max(1, total - run.start_step)
    metrics = evaluate(model, run.tokenizer, run.rows_test, run.test.labels, len(run.names), cfg.batch_size * 2, device)
    metrics.update(
        trainable_params=run.trainable,
        steps=total,
        train_seconds=round(trained.train_seconds, 2),
        ms_per_step=round(1000 * trained.train_seconds / steps_run, 1),
        peak_memory_mib=round(peak_memory_mib(device), 1),
        peak_memory_kind="cuda_max_allocated" if device.type == "cuda" else "cpu_max_rss",
        final_loss=sum(losses[-cfg.log_every :]) / max(1, len(losses[-cfg.log_every :])),
        losses=[round(v, 5) for v in losses],  # per step of this invocation (loss curves)
        processes=world.size,
        ranks_in_sync=in_sync,
        labels=run.names,
        config=asdict(cfg),
    )
    ranks = run.allocator.ranks() if run.allocator is not None else adapter_ranks(model)
    metrics["ranks"] = ranks
    if world.main:
        save(model, run.out, tensors)
        if cfg.allocator != "none" and ranks:
            write_text(run.out / "ranks.md", rank_table(ranks) + "\n")
            heatmap(ranks, run.out / "ranks.png", title=f"{cfg.method} / {cfg.allocator}: final ranks")
            print(rank_table(ranks))
        if not cfg.fsdp:
            save_checkpoint(run.ckpt, model, run.opt, run.sched, total, run.allocator)
        write_json(run.out / "metrics.json", metrics)
        print(f"test accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  (saved to {run.out})")
    world.barrier()
    return metrics


__all__ = ["ALLOCATORS", "OPTIMIZERS", "FinetuneConfig", "NonFiniteError", "World", "dist_timeout", "finetune"]
