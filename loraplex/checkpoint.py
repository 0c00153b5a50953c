"""Training checkpoints for ``--resume``: model adapters, optimizer, scheduler, allocator and random state.

Nothing is pickled. A checkpoint folder holds the adapter (``io.save``: ``adapter.safetensors`` +
``adapter.json``), ``state.safetensors`` (every tensor of the optimizer state and torch's random
state) and ``state.json`` (everything else: step, optimizer hyper-parameters, scheduler state,
Python's and NumPy's random state, the allocator's state). The folder is written under a temporary
name and swapped in by renames, so a run killed while saving keeps its previous checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from loraplex.io import read_json, read_tensors, save, write_json, write_tensors

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"


def split_state(state: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """A nested state (dicts, lists, tensors, numbers) as JSON plus tensors keyed by their path.

    Tensors are replaced by ``{"__tensor__": key}``; int dict keys (optimizer state is keyed by
    parameter index) are kept as ``{"__int_keys__": {...}}`` so that they come back as ints.
    """
    tensors: dict[str, Tensor] = {}

    def walk(v: Any, path: str) -> Any:
        if isinstance(v, Tensor):
            tensors[path] = v
            return {"__tensor__": path}
        if isinstance(v, dict):
            ints = bool(v) and all(isinstance(k, int) for k in v)
            body = {str(k): walk(x, f"{path}/{k}") for k, x in v.items()}
            return {"__int_keys__": body} if ints else body
        if isinstance(v, list | tuple):
            return [walk(x, f"{path}/{i}") for i, x in enumerate(v)]
        if v is None or isinstance(v, bool | int | float | str):
            return v
        raise ValueError(f"checkpoint state at {path!r} has a {type(v).__name__}, which is not JSON or a tensor")

    return walk(state, prefix), tensors


def join_state(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of ``split_state``."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__int_keys__"}:
            return {int(k): join_state(v, tensors) for k, v in obj["__int_keys__"].items()}
        return {k: join_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_state(v, tensors) for v in obj]
    return obj


def random_state() -> tuple[dict[str, Any], dict[str, Tensor]]:
    version, keys, gauss = random.getstate()
    kind, words, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    text = {"python": [version, list(keys), gauss], "numpy": [kind, np.asarray(words).tolist(), pos, has_gauss, cached]}
    return text, {"torch": torch.get_rng_state()}


def set_random_state(text: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    version, keys, gauss = text["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, words, pos, has_gauss, cached = text["numpy"]
    np.random.set_state((kind, np.array(words, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    allocator: Any = None,
) -> Path:
    """Write the checkpoint to ``directory`` (replaced whole, by renames)."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save(model, tmp)
    rng_text, rng_tensors = random_state()
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "allocator": allocator.state_dict() if allocator is not None else None,
    }
    text, tensors = split_state(state)
    write_tensors(tmp / STATE_TENSORS, tensors | {f"rng/{k}": v for k, v in rng_tensors.items()})
    write_json(tmp / STATE_JSON, {"state": text, "random": rng_text})
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    directory: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    allocator: Any = None,
) -> int:
    """Restore optimizer, scheduler, allocator and random state; returns the step to resume at.

    The model's side is ``io.load(base_model, directory)`` on the fresh base model, done by the
    caller *before* it builds the optimizer over the loaded adapters (same parameter order as the
    saved run, since the spec re-creates the same modules in the same order).
    """
    directory = Path(directory)
    meta = read_json(directory / STATE_JSON)
    tensors = read_tensors(directory / STATE_TENSORS)
    state = join_state(meta["state"], tensors)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:
        raise ValueError(f"checkpoint {directory}: the optimizer state does not fit this run: {e}") from e
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if allocator is not None and state["allocator"] is not None:
        allocator.load_state_dict(state["allocator"])
    set_random_state(meta["random"], {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("rng/")})
    return int(state["step"])


__all__ = ["join_state", "load_checkpoint", "save_checkpoint", "split_state"]
