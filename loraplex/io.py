"""Checkpoints: adapter tensors in safetensors, the spec in JSON, both written atomically.

A checkpoint directory holds ``adapter.safetensors`` (every adapter's own parameters and buffers,
and the full state of the modules named in ``train``) and ``adapter.json``::

    {"format": "loraplex.adapter", "format_version": 1, "loraplex_version": "0.1.0",
     "adapters": [{"name": "default", "method": "lora", "options": {...}, "layers": [...],
                   "sizes": [[in_features, out_features], ...]}],
     "train": ["classifier"]}

Nothing is ever unpickled: JSON is parsed with ``json`` and tensors read with safetensors.
Both files are written atomically (:mod:`loraplex.files`), the tensors renamed into place before the
spec, so a save killed at any point leaves every previous file intact.

Integrity: the tensors file carries a SHA-256 of its tensors (:func:`loraplex.files.write_tensors`),
and the adapter spec repeats it (``tensors_sha256``), so a folder whose tensors and spec come from
two different saves (a save killed between the two renames, or files copied by hand) is refused
instead of mixing versions (:func:`read_matching_tensors`). Files without the digest (written by
another tool, or edited by hand) are read without this check; shapes, dtypes and names are still
checked against the model.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from loraplex._version import __version__
from loraplex.adapter import Adapter, linear_sizes, restoring
from loraplex.adapters import METHODS
from loraplex.files import read_json, read_tensors, tensor_digest, write_json, write_tensors
from loraplex.files import save_pretrained as save_pretrained  # re-exported: tests and benchmarks import these here
from loraplex.files import write_figure as write_figure
from loraplex.files import write_text as write_text
from loraplex.inject import NAME_RE, adapters, add_trained, bind_options, build, layers, trained_modules

FORMAT = "loraplex.adapter"
FORMAT_VERSION = 1
SPEC_FILE = "adapter.json"
TENSOR_FILE = "adapter.safetensors"
SPEC_KEYS = {"format", "format_version", "loraplex_version", "adapters", "train", "tensors_sha256"}
ENTRY_KEYS = {"name", "method", "options", "layers", "sizes"}


def read_matching_tensors(spec: dict[str, Any], spec_path: Path, tensor_path: Path) -> dict[str, Tensor]:
    """The tensors of ``tensor_path``, refused unless they are the ones ``spec`` was saved with.

    A two-file save (tensors, then the spec naming their ``tensors_sha256``) killed between its two
    renames leaves new tensors beside an old spec: that pair is a ``ValueError``, never a silent mix.
    Files without digests (written by hand or another tool) are read as they are.
    """
    tensors = read_tensors(tensor_path)
    want, got = spec.get("tensors_sha256"), tensor_digest(tensor_path)
    if want is not None and got is not None and got != want:
        raise ValueError(
            f"{tensor_path.parent}: {tensor_path.name} and {spec_path.name} come from different saves (the spec "
            f"expects tensors with SHA-256 {str(want)[:12]}...); was a save interrupted or a file copied over?"
        )
    return tensors


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


def saved_names(spec: dict[str, Any]) -> list[str]:
    """The adapter names a spec holds, sorted."""
    return sorted({e.get("name", "default") for e in spec["adapters"]})


def only(spec: dict[str, Any], tensors: dict[str, Tensor], name: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The spec and tensors of the adapter ``name`` alone (no other adapter, no ``train`` module)."""
    if name not in saved_names(spec):
        raise ValueError(f"name={name!r} is not an adapter of the model; its adapters are {saved_names(spec)}")
    entries = [e for e in spec["adapters"] if e.get("name", "default") == name]
    prefix = f"adapter.{name}."  # names have no dot: the prefix is unambiguous
    return {**spec, "adapters": entries, "train": []}, {k: v for k, v in tensors.items() if k.startswith(prefix)}


def pick_saved(spec: dict[str, Any], name: str, where: Path, source: str | None = None) -> str:
    """Which saved adapter ``load(..., name=name)`` / ``hotswap(..., name=name, source=source)`` reads.

    ``source`` when given (it must be saved), else the saved adapter called ``name``, else the only one saved.
    """
    saved = saved_names(spec)
    if source is not None:
        if source not in saved:
            raise ValueError(f"{where}: source={source!r} is not a saved adapter; it holds {saved}")
        return source
    if name in saved:
        return name
    if len(saved) == 1:
        return saved[0]
    raise ValueError(f"{where} holds adapters {saved} and none is called name={name!r}: pass source=")


def select(
    spec: dict[str, Any], tensors: dict[str, Tensor], name: str, where: Path
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """For ``load(..., name=name)``: the saved adapter called ``name``, else the only one saved, renamed ``name``.

    The ``train`` modules of the checkpoint are kept (they are the model's, not an adapter's).
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"name={name!r} must be letters, digits, '_' or '-'")
    source = pick_saved(spec, name, where)
    entries = [{**e, "name": name} for e in spec["adapters"] if e.get("name", "default") == source]
    prefix = f"adapter.{source}."
    kept = {f"adapter.{name}.{k[len(prefix) :]}": v for k, v in tensors.items() if k.startswith(prefix)}
    kept.update({k: v for k, v in tensors.items() if k.startswith("train.")})
    return {**spec, "adapters": entries}, kept


def save(
    model: nn.Module,
    directory: str | os.PathLike[str],
    tensors: dict[str, Tensor] | None = None,
    *,
    name: str | None = None,
) -> Path:
    """Save the model's adapters (and ``train`` modules) to ``directory``; returns its path.

    ``tensors``: ``tensors_of(model)`` computed by the caller (FSDP gathers shards on every
    process first, then one process saves). ``name``: save only the adapter called ``name`` (its
    spec entries and tensors; no other adapter and no ``train`` module); an unknown name is a
    ``ValueError`` listing the model's adapters.

    Example:
        >>> import loraplex, tempfile
        >>> model = loraplex.adapt(nn.Sequential(nn.Linear(8, 8)), "lora", rank=2)
        >>> path = loraplex.save(model, tempfile.mkdtemp())
        >>> sorted(p.name for p in path.iterdir())
        ['adapter.json', 'adapter.safetensors']
    """
    spec = spec_of(model)
    if tensors is None:
        tensors = tensors_of(model)
    if name is not None:
        spec, tensors = only(spec, tensors, name)
    if not spec["adapters"] and not spec["train"]:
        raise ValueError("the model has no adapter and no trained module to save")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    spec["tensors_sha256"] = write_tensors(d / TENSOR_FILE, tensors)
    write_json(d / SPEC_FILE, spec)  # last: a folder is loadable only once both files are in place
    return d


def _str_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings, not {value!r}")
    return value


def check_header(
    spec: Any, path: Path, fmt: str, version: int, keys: set[str] | frozenset[str], what: str
) -> dict[str, Any]:
    """A spec JSON's ``format`` and ``format_version`` checked; unknown top-level keys warned about.

    ``format`` must equal ``fmt``; ``format_version`` must be an integer in ``[1, version]`` (a newer
    one asks for an upgrade). Keys outside ``keys`` are tolerated with a warning naming them.
    """
    if not isinstance(spec, dict) or spec.get("format") != fmt:
        raise ValueError(f"{path} is not {what} of loraplex (format must be {fmt!r})")
    found = spec.get("format_version")
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise ValueError(f"{path}: format_version={found!r} must be a positive integer")
    if found > version:
        raise ValueError(
            f"{path}: format_version={found} is newer than this loraplex reads ({version}); upgrade loraplex"
        )
    if extra := sorted(set(spec) - set(keys)):
        warnings.warn(f"{path}: ignoring unknown keys {extra}", stacklevel=4)
    return spec


def read_spec(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and validate a checkpoint's ``adapter.json``; unknown keys only warn."""
    path = Path(directory) / SPEC_FILE
    spec = check_header(read_json(path), path, FORMAT, FORMAT_VERSION, SPEC_KEYS, "an adapter spec")
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
    if not isinstance(spec.get("tensors_sha256", ""), str):
        raise ValueError(f"{path}: tensors_sha256 must be a string, not {spec['tensors_sha256']!r}")
    return spec


def check_tensors(found: dict[str, Tensor], expected: dict[str, Tensor], where: Path) -> None:
    """``found`` must hold exactly the names of ``expected``, each with its shape and dtype (nothing is cast)."""
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


def load(model: nn.Module, directory: str | os.PathLike[str], name: str | None = None) -> nn.Module:
    """Re-apply a saved spec to a base ``model`` and load its tensors, in place.

    The model may already carry adapters: the loaded ones are stacked on top (by name; a name the
    model already has on one of the layers is a ``ValueError``). ``name`` (decided, as ``hotswap``'s
    source): load only the saved adapter called ``name``; if none is, and the checkpoint holds a single
    adapter, that one renamed ``name`` (so one checkpoint can be loaded twice under two names); the
    checkpoint's ``train`` modules are loaded in every case. ``None``: every saved adapter, with its name.

    Every check (spec, layer names, tensor names, shapes, dtypes) runs before the model is touched:
    on any error the model is left unchanged.
    """
    d = Path(directory)
    spec = read_spec(d)
    tensors = read_matching_tensors(spec, d / SPEC_FILE, d / TENSOR_FILE)
    if name is not None:
        spec, tensors = select(spec, tensors, name, d)
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
    check_tensors(tensors, expected, d / TENSOR_FILE)

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
