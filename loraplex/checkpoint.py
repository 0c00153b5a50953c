"""Training checkpoints for ``--resume``: model adapters, optimizer, scheduler, allocator and random state.

Nothing is pickled. A checkpoint folder holds the adapter (``io.save``: ``adapter.safetensors`` +
``adapter.json``), ``state.safetensors`` (every tensor of the optimizer state and torch's random
state) and ``state.json`` (everything else: step, optimizer hyper-parameters, scheduler state,
Python's and NumPy's random state, the allocator's state). The folder is written under a temporary
name and swapped in by renames, so a run killed while saving keeps its previous checkpoint.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from loraplex.files import read_json, read_tensors, write_json, write_tensors
from loraplex.io import save

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


def recover(directory: str | os.PathLike[str]) -> Path:
    """Put the previous checkpoint back if a save was killed between its two renames; returns the path.

    ``save_checkpoint`` renames the old folder to ``<name>.old`` then the new one to ``<name>``: a kill
    in between leaves only ``<name>.old``, which is complete (issue 10: saves are atomic).
    """
    final = Path(directory)
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.is_dir():
        try:
            old.rename(final)
        except OSError:  # under torchrun every process resumes: another one may have put it back first
            if not final.is_dir():
                raise
    return final


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    allocator: Any = None,
) -> Path:
    """Write the checkpoint to ``directory`` (replaced whole, by renames)."""
    final = recover(directory)  # never delete the only complete copy below
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


# torch optimizers whose per-parameter state tensors (but ``step``) have the parameter's shape
ELEMENTWISE = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad, torch.optim.RMSprop,
    torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adadelta, torch.optim.Rprop,
)  # fmt: skip


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any, where: Path) -> None:
    """Refuse a saved optimizer state that torch would load silently and fail on (or compute garbage) later.

    Every state tensor but ``step`` must be floating (an int or bool tensor is refused; a float16
    one is cast by torch's ``load_state_dict`` to the parameter's dtype: decision, same kind only);
    for the element-wise optimizers in ``ELEMENTWISE`` every such tensor with a dimension must have
    its parameter's shape. (Other optimizers, e.g. LoRA-Pro, keep other shapes: only dtypes are checked.)
    """
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise ValueError(f"{where}: the optimizer state is malformed")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, st in saved["state"].items():
        if not isinstance(idx, int) or not 0 <= idx < len(params) or not isinstance(st, dict):
            raise ValueError(f"{where}: optimizer state for parameter {idx!r} does not fit {len(params)} parameters")
        for k, v in st.items():
            for t in v if isinstance(v, list) else [v]:
                if not isinstance(t, Tensor) or k == "step":
                    continue
                name = f"/optimizer/state/{idx}/{k}"
                if not t.dtype.is_floating_point:
                    raise ValueError(f"{where}: tensor {name!r} has dtype {t.dtype}, the optimizer needs a float")
                if isinstance(optimizer, ELEMENTWISE) and t.dim() and t.shape != params[idx].shape:
                    raise ValueError(
                        f"{where}: tensor {name!r} has shape {tuple(t.shape)}, "
                        f"but parameter {idx} has shape {tuple(params[idx].shape)}"
                    )


@contextmanager
def all_or_nothing(directory: Path, *objects: Any) -> Iterator[None]:
    """Restore ``objects`` (anything with ``state_dict`` / ``load_state_dict``) and the random state on error.

    Any error inside becomes a ``ValueError`` naming the checkpoint: a bad checkpoint leaves the run as it was.
    """
    kept = [(o, copy.deepcopy(o.state_dict())) for o in objects if o is not None]
    rng = random_state()
    try:
        yield
    except (KeyError, TypeError, IndexError, ValueError, RuntimeError, AttributeError) as e:
        for o, state in kept:
            o.load_state_dict(state)
        set_random_state(*rng)
        raise ValueError(f"checkpoint {directory} does not fit this run: {e}") from e


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
    directory = recover(directory)
    meta = read_json(directory / STATE_JSON)
    if not (isinstance(meta, dict) and isinstance(meta.get("state"), dict) and isinstance(meta.get("random"), dict)):
        raise ValueError(f"{directory / STATE_JSON} is not a training state (an object with 'state' and 'random')")
    tensors = read_tensors(directory / STATE_TENSORS)
    with all_or_nothing(directory, optimizer, scheduler, allocator):  # issue 10: a bad file changes nothing
        state = join_state(meta["state"], tensors)
        check_optimizer_state(optimizer, state["optimizer"], directory / STATE_TENSORS)
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            if set(state["scheduler"]) != set(scheduler.state_dict()):
                raise ValueError(f"the scheduler state has keys {sorted(state['scheduler'])}")
            scheduler.load_state_dict(state["scheduler"])
        if allocator is not None and state["allocator"] is not None:
            allocator.load_state_dict(state["allocator"])
        set_random_state(meta["random"], {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("rng/")})
        return int(state["step"])


__all__ = ["join_state", "load_checkpoint", "recover", "save_checkpoint", "split_state"]
