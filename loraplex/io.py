"""Checkpoints: adapter tensors in safetensors, the spec in JSON, both written atomically.

A checkpoint directory holds ``adapter.safetensors`` (every adapter's own parameters and buffers,
and the full state of the modules named in ``train``) and ``adapter.json``::

    {"format": "loraplex.adapter", "format_version": 1, "loraplex_version": "0.1.0",
     "adapters": [{"name": "default", "method": "lora", "options": {...}, "layers": [...],
                   "sizes": [[in_features, out_features], ...]}],
     "train": ["classifier"]}

Nothing is ever unpickled: JSON is parsed with ``json`` and tensors read with safetensors.
Each file is written to a temporary name in the same folder, flushed, then renamed over the old
one, so a save killed at any point leaves every previous file intact. The tensors are renamed
into place before the spec.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from loraplex._version import __version__
from loraplex.adapter import Adapter, linear_sizes, restoring
from loraplex.adapters import METHODS
from loraplex.inject import adapters, add_trained, bind_options, build, layers, trained_modules

FORMAT = "loraplex.adapter"
FORMAT_VERSION = 1
SPEC_FILE = "adapter.json"
TENSOR_FILE = "adapter.safetensors"
SPEC_KEYS = {"format", "format_version", "loraplex_version", "adapters", "train"}
ENTRY_KEYS = {"name", "method", "options", "layers", "sizes"}


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` over ``path``: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(path, write)


def write_tensors(path: str | os.PathLike[str], tensors: dict[str, Tensor]) -> None:
    # clone: safetensors refuses tensors that share storage (tied weights)
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata={"format": "pt"}))


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Tensors of a safetensors file; anything else (a pickle, a truncated file) is a ``ValueError``."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def spec_of(model: nn.Module) -> dict[str, Any]:
    """The JSON spec that re-creates the model's adapters on a fresh base model."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    first: dict[tuple[str, str, str], int] = {}
    for layer, a in adapters(model):
        key = (a.name, a.method, json.dumps(a.options, sort_keys=True))
        entry = groups.setdefault(
            key, {"name": a.name, "method": a.method, "options": a.options, "layers": [], "sizes": []}
        )
        entry["layers"].append(layer)
        entry["sizes"].append([a.in_features, a.out_features])
        first[key] = min(first.get(key, a.serial), a.serial)
    ordered = sorted(groups, key=first.__getitem__)  # creation order keeps stacks in the same order
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "loraplex_version": __version__,
        "adapters": [groups[k] for k in ordered],
        "train": trained_modules(model),
    }


def tensors_of(model: nn.Module) -> dict[str, Tensor]:
    out = {}
    for layer, a in adapters(model):
        for k, v in a.own_state_dict().items():
            out[f"adapter.{a.name}.{layer}.{k}"] = v
    for t in trained_modules(model):
        for k, v in model.get_submodule(t).state_dict().items():
            out[f"train.{t}.{k}"] = v
    return out


def save(model: nn.Module, directory: str | os.PathLike[str], tensors: dict[str, Tensor] | None = None) -> Path:
    """Save the model's adapters (and ``train`` modules) to ``directory``; returns its path.

    ``tensors``: ``tensors_of(model)`` computed by the caller (FSDP gathers shards on every
    process first, then one process saves).

    Example:
        >>> import loraplex, tempfile
        >>> model = loraplex.adapt(nn.Sequential(nn.Linear(8, 8)), "lora", rank=2)
        >>> path = loraplex.save(model, tempfile.mkdtemp())
        >>> sorted(p.name for p in path.iterdir())
        ['adapter.json', 'adapter.safetensors']
    """
    spec = spec_of(model)
    if not spec["adapters"] and not spec["train"]:
        raise ValueError("the model has no adapter and no trained module to save")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_tensors(d / TENSOR_FILE, tensors_of(model) if tensors is None else tensors)
    write_json(d / SPEC_FILE, spec)
    return d


def _str_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings, not {value!r}")
    return value


def read_spec(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and validate a checkpoint's ``adapter.json``; unknown keys only warn."""
    path = Path(directory) / SPEC_FILE
    spec = read_json(path)
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ValueError(f"{path} is not a loraplex adapter spec (format must be {FORMAT!r})")
    version = spec.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: format_version={version!r} must be a positive integer")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version={version} is newer than this loraplex reads ({FORMAT_VERSION}); upgrade loraplex"
        )
    if extra := sorted(set(spec) - SPEC_KEYS):
        warnings.warn(f"{path}: ignoring unknown keys {extra}", stacklevel=3)
    entries = spec.get("adapters", [])
    if not isinstance(entries, list):
        raise ValueError(f"{path}: adapters must be a list, not {entries!r}")
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: each adapter entry must be an object, not {entry!r}")
        if extra := sorted(set(entry) - ENTRY_KEYS):
            warnings.warn(f"{path}: ignoring unknown keys {extra} in an adapter entry", stacklevel=3)
        if entry.get("method") not in METHODS:
            raise ValueError(
                f"{path}: method={entry.get('method')!r} is not one of the registered methods: {', '.join(METHODS)}"
            )
        if not isinstance(entry.get("options", {}), dict):
            raise ValueError(f"{path}: options must be an object, not {entry.get('options')!r}")
        if not isinstance(entry.get("name", "default"), str):
            raise ValueError(f"{path}: name must be a string, not {entry.get('name')!r}")
        _str_list(entry.get("layers"), f"{path}: layers")
        sizes = entry.get("sizes")
        ok = isinstance(sizes, list) and len(sizes) == len(entry["layers"])
        if sizes is not None and not (ok and all(isinstance(s, list) and len(s) == 2 for s in sizes)):
            raise ValueError(f"{path}: sizes must list [in_features, out_features] for each layer, not {sizes!r}")
    _str_list(spec.get("train", []), f"{path}: train")
    return spec


def _check_tensors(found: dict[str, Tensor], expected: dict[str, Tensor], where: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where} does not match the spec: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for k, want in expected.items():
        got = found[k]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(
                f"{where}: tensor {k!r} has shape {tuple(got.shape)} and dtype {got.dtype}, but the model "
                f"expects shape {tuple(want.shape)} and dtype {want.dtype}"
            )


def load(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Re-apply a saved spec to an un-adapted base ``model`` and load its tensors, in place.

    Every check (spec, layer names, tensor names, shapes, dtypes) runs before the model is touched:
    on any error the model is left unchanged.
    """
    d = Path(directory)
    spec = read_spec(d)
    tensors = read_tensors(d / TENSOR_FILE)
    current = layers(model)
    plan: list[tuple[str, Adapter]] = []
    with restoring():
        for entry in spec["adapters"]:
            name, method = entry.get("name", "default"), entry["method"]
            options = bind_options(method, entry.get("options", {}))
            sizes = entry.get("sizes") or [None] * len(entry["layers"])
            for layer, size in zip(entry["layers"], sizes, strict=True):
                if layer not in current:
                    some = ", ".join(list(current)[:8])
                    raise ValueError(
                        f"{d}: the spec adapts layer {layer!r}, which the model lacks or which is not a "
                        f"linear layer; the model's linear layers include: {some}"
                    )
                if size is not None and list(linear_sizes(current[layer])) != size:
                    n_in, n_out = linear_sizes(current[layer])
                    raise ValueError(
                        f"{d}: layer {layer!r} has shape (in={n_in}, out={n_out}) in the model but "
                        f"(in={size[0]}, out={size[1]}) in the checkpoint"
                    )
                if name in {a.name for a in Adapter.stack(current[layer])}:
                    raise ValueError(f"layer {layer!r} already has an adapter named {name!r}")
                adapter = build(method, current[layer], options, name, layer)
                current[layer] = adapter
                plan.append((layer, adapter))
    train = spec.get("train", [])
    modules = dict(model.named_modules())
    if missing := [t for t in train if t not in modules]:
        raise ValueError(f"{d}: the spec trains module {missing[0]!r}, which the model lacks")
    expected = {f"adapter.{a.name}.{layer}.{k}": v for layer, a in plan for k, v in a.own_state_dict().items()}
    for t in train:
        expected.update({f"train.{t}.{k}": v for k, v in modules[t].state_dict().items()})
    _check_tensors(tensors, expected, d / TENSOR_FILE)

    with torch.no_grad():
        for layer, a in plan:
            a.load_state_dict({k: tensors[f"adapter.{a.name}.{layer}.{k}"] for k in a.own_state_dict()}, strict=False)
            a.on_load()
        for t in train:
            modules[t].load_state_dict({k: tensors[f"train.{t}.{k}"] for k in modules[t].state_dict()})
    for layer, top in current.items():
        if isinstance(top, Adapter) and any(top is a for _, a in plan):
            model.set_submodule(layer, top)
    add_trained(model, train)
    return model
