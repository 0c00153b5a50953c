"""Checkpoints: adapter tensors in safetensors, the spec in JSON, both written atomically.

A checkpoint directory holds ``adapter.safetensors`` (every adapter's own parameters and buffers,
and the full state of the modules named in ``train``) and ``adapter.json``, the typed, versioned
record :class:`loraplex.spec.AdapterSpec` (its layout, and the one place the JSON is checked: see
:mod:`loraplex.spec`).

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
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from loraplex._version import __version__
from loraplex.adapter import Adapter, linear_sizes, restoring
from loraplex.files import read_json, read_tensors, tensor_digest, write_json, write_tensors
from loraplex.files import save_pretrained as save_pretrained  # re-exported: tests and benchmarks import these here
from loraplex.files import write_figure as write_figure
from loraplex.files import write_text as write_text
from loraplex.inject import NAME_RE, adapters, add_trained, bind_options, build, layers, trained_modules
from loraplex.spec import AdapterSpec, SpecEntry
from loraplex.spec import check_header as check_header  # re-exported: compression.io and tests use it here

SPEC_FILE = "adapter.json"
TENSOR_FILE = "adapter.safetensors"


def read_matching_tensors(want: str | None, spec_path: Path, tensor_path: Path) -> dict[str, Tensor]:
    """The tensors of ``tensor_path``, refused unless their digest is ``want`` (the spec's ``tensors_sha256``).

    A two-file save (tensors, then the spec naming their ``tensors_sha256``) killed between its two
    renames leaves new tensors beside an old spec: that pair is a ``ValueError``, never a silent mix.
    Files without digests (written by hand or another tool) are read as they are.
    """
    tensors = read_tensors(tensor_path)
    got = tensor_digest(tensor_path)
    if want is not None and got is not None and got != want:
        raise ValueError(
            f"{tensor_path.parent}: {tensor_path.name} and {spec_path.name} come from different saves (the spec "
            f"expects tensors with SHA-256 {str(want)[:12]}...); was a save interrupted or a file copied over?"
        )
    return tensors


def spec_of(model: nn.Module) -> AdapterSpec:
    """The spec that re-creates the model's adapters on a fresh base model (no ``tensors_sha256`` yet)."""
    groups: dict[tuple[str, str, str], list[tuple[str, Adapter]]] = {}
    for layer, a in adapters(model):
        groups.setdefault((a.name, a.method, json.dumps(a.options, sort_keys=True)), []).append((layer, a))
    ordered = sorted(groups.values(), key=lambda g: min(a.serial for _, a in g))  # creation order keeps stacks
    entries = tuple(
        SpecEntry(
            g[0][1].method,
            tuple(n for n, _ in g),
            dict(g[0][1].options),
            g[0][1].name,
            tuple((a.in_features, a.out_features) for _, a in g),
        )  # fmt: skip
        for g in ordered
    )
    return AdapterSpec(entries, tuple(trained_modules(model)), __version__)


def tensors_of(model: nn.Module) -> dict[str, Tensor]:
    out = {}
    for layer, a in adapters(model):
        for k, v in a.own_state_dict().items():
            out[f"adapter.{a.name}.{layer}.{k}"] = v
    for t in trained_modules(model):
        for k, v in model.get_submodule(t).state_dict().items():
            out[f"train.{t}.{k}"] = v
    return out


def only(spec: AdapterSpec, tensors: dict[str, Tensor], name: str) -> tuple[AdapterSpec, dict[str, Tensor]]:
    """The spec and tensors of the adapter ``name`` alone (no other adapter, no ``train`` module)."""
    if name not in spec.names():
        raise ValueError(f"name={name!r} is not an adapter of the model; its adapters are {spec.names()}")
    entries = tuple(e for e in spec.adapters if e.name == name)
    prefix = f"adapter.{name}."  # names have no dot: the prefix is unambiguous
    return replace(spec, adapters=entries, train=()), {k: v for k, v in tensors.items() if k.startswith(prefix)}


def pick_saved(spec: AdapterSpec, name: str, where: Path, source: str | None = None) -> str:
    """Which saved adapter ``load(..., name=name)`` / ``hotswap(..., name=name, source=source)`` reads.

    ``source`` when given (it must be saved), else the saved adapter called ``name``, else the only one saved.
    """
    saved = spec.names()
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
    spec: AdapterSpec, tensors: dict[str, Tensor], name: str, where: Path
) -> tuple[AdapterSpec, dict[str, Tensor]]:
    """For ``load(..., name=name)``: the saved adapter called ``name``, else the only one saved, renamed ``name``.

    The ``train`` modules of the checkpoint are kept (they are the model's, not an adapter's).
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"name={name!r} must be letters, digits, '_' or '-'")
    source = pick_saved(spec, name, where)
    entries = tuple(replace(e, name=name) for e in spec.adapters if e.name == source)
    prefix = f"adapter.{source}."
    kept = {f"adapter.{name}.{k[len(prefix) :]}": v for k, v in tensors.items() if k.startswith(prefix)}
    kept.update({k: v for k, v in tensors.items() if k.startswith("train.")})
    return replace(spec, adapters=entries), kept


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
    if not spec.adapters and not spec.train:
        raise ValueError("the model has no adapter and no trained module to save")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    spec = replace(spec, tensors_sha256=write_tensors(d / TENSOR_FILE, tensors))
    write_json(d / SPEC_FILE, spec.to_json())  # last: a folder is loadable only once both files are in place
    return d


def read_spec(directory: str | os.PathLike[str]) -> AdapterSpec:
    """Parse and validate a checkpoint's ``adapter.json`` (:meth:`AdapterSpec.from_json`); unknown keys only warn."""
    path = Path(directory) / SPEC_FILE
    return AdapterSpec.from_json(read_json(path), path)


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
    tensors = read_matching_tensors(spec.tensors_sha256, d / SPEC_FILE, d / TENSOR_FILE)
    if name is not None:
        spec, tensors = select(spec, tensors, name, d)
    current = layers(model)
    plan: list[tuple[str, Adapter]] = []
    with restoring():
        for entry in spec.adapters:
            name, method = entry.name, entry.method
            options = bind_options(method, entry.options)
            sizes = entry.sizes or [None] * len(entry.layers)
            for layer, size in zip(entry.layers, sizes, strict=True):
                if layer not in current:
                    some = ", ".join(list(current)[:8])
                    raise ValueError(
                        f"{d}: the spec adapts layer {layer!r}, which the model lacks or which is not a "
                        f"linear layer; the model's linear layers include: {some}"
                    )
                if size is not None and tuple(linear_sizes(current[layer])) != size:
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
    train = spec.train
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
