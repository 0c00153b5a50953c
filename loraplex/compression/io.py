"""Saving and loading compressed models: ``compression.json`` + ``model.safetensors``, never a pickle.

A compressed folder holds:

* ``model.safetensors``: the whole ``state_dict`` of the compressed model (factorised layers as
  ``<name>.down.weight`` / ``<name>.up.weight`` / ``<name>.up.bias``);
* ``compression.json``: the format tag, the model class name, the dtype, and every compressed layer
  with its shape and rank (``{"kind": "lowrank", "in": .., "out": .., "rank": .., "bias": ..}``) or,
  for the Kronecker / Hadamard layers, its options (``{"kind": "kronecker", ..., "options": {..}}``);
  a typed record, :class:`CompressionSpec` (its ``from_json`` is the one place the JSON is checked);
* for a HuggingFace model, its ``config.json`` (and whatever the caller adds, e.g. the tokenizer).

Every file is written atomically (temporary file in the folder, fsync, rename), the JSON last, so a
folder with a ``compression.json`` is complete; the JSON holds the SHA-256 of the tensors
(``tensors_sha256``, see :mod:`loraplex.files` and :mod:`loraplex.io`), so tensors and JSON from two
different saves are refused. ``save_compressed`` writes ``config.json`` itself; a caller adding files
(the tokenizer's ``save_pretrained``) should do so before calling it, or accept that those files are
not covered.

Loading checks everything (JSON, tensors against the rebuilt layers: names, shapes, dtypes) before
the model given is touched: on any error it is left unchanged. Dtypes must equal the saved ``dtype``
exactly (floating tensors) or the model's own dtype (integer buffers); nothing is cast.

Loading: ``load_compressed(directory)`` rebuilds a HuggingFace model from ``config.json`` and the
class name (looked up in ``transformers``, never imported from a path); ``load_compressed(directory,
model)`` puts the layers into a model you built (any ``nn.Module`` with the original architecture).
When ``model`` is a wrapper around the saved class (``BertForSequenceClassification`` around a
saved ``BertModel``), the structure and tensors go into that inner module, so a compressed encoder
can be fine-tuned with a new head.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraplex.compression.layers import LowRankLinear
from loraplex.files import read_json, write_json, write_tensors, write_text
from loraplex.io import check_header, check_tensors, read_matching_tensors

FORMAT = "loraplex-compressed"
FORMAT_VERSION = 1
SPEC_KEYS = {"format", "format_version", "model_class", "dtype", "layers", "tensors_sha256"}
SPEC_FILE = "compression.json"
TENSOR_FILE = "model.safetensors"


def is_compressed(directory: str | os.PathLike[str]) -> bool:
    return (Path(directory) / SPEC_FILE).is_file()


def _structured() -> dict[str, type[nn.Module]]:
    from loraplex.decompose.layers import LAYERS

    return {"lowrank": LowRankLinear, **LAYERS}


@dataclass(frozen=True)
class CompressedLayer:
    """One compressed layer of ``compression.json``: ``kind``, sizes, bias, and ``rank`` (``lowrank``) or ``options``.

    ``options`` (the Kronecker / Hadamard layers' integer shape options) stay a dict, passed to the
    layer's constructor on load (which refuses options that do not fit).
    """

    kind: str
    in_features: int
    out_features: int
    bias: bool
    rank: int | None = None
    options: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        head = {"kind": self.kind, "in": self.in_features, "out": self.out_features}
        if self.kind == "lowrank":
            return head | {"rank": self.rank, "bias": self.bias}
        return head | {"bias": self.bias, "options": self.options}

    @classmethod
    def from_json(cls, entry: Any, name: str, where: Path) -> CompressedLayer:
        kinds = _structured()
        ok = isinstance(entry, dict) and entry.get("kind") in kinds
        low = ok and entry["kind"] == "lowrank"
        sizes = ("in", "out", "rank") if low else ("in", "out")
        ok = ok and all(
            isinstance(entry.get(k), int) and not isinstance(entry[k], bool) and entry[k] > 0 for k in sizes
        )
        if ok and not low:
            opts = entry.get("options")
            ok = isinstance(opts, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in opts.values())
        if not ok or not isinstance(entry.get("bias"), bool):
            kind = entry.get("kind") if isinstance(entry, dict) else None
            hint = f" (kind={kind!r} is not one of {', '.join(kinds)})" if kind not in kinds else ""
            raise ValueError(f"{where}: layer {name!r} has a malformed entry {entry!r}{hint}")
        if extra := sorted(set(entry) - {"kind", "in", "out", "rank", "bias", "options"}):
            warnings.warn(f"{where}: ignoring unknown keys {extra} in layer {name!r}", stacklevel=4)
        e = entry
        return cls(e["kind"], e["in"], e["out"], e["bias"], e["rank"] if low else None, None if low else e["options"])


@dataclass(frozen=True)
class CompressionSpec:
    """``compression.json`` as a typed record; :meth:`from_json` is the one place it is checked.

    :meth:`to_json` writes format version 1 with the keys in the order loraplex always wrote them.
    """

    model_class: str
    dtype: str
    layers: dict[str, CompressedLayer]
    tensors_sha256: str | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "format_version": self.format_version}
        out |= {"model_class": self.model_class, "dtype": self.dtype}
        out["layers"] = {name: e.to_json() for name, e in self.layers.items()}
        return out if self.tensors_sha256 is None else out | {"tensors_sha256": self.tensors_sha256}

    @classmethod
    def from_json(cls, obj: Any, where: Path) -> CompressionSpec:
        spec = check_header(obj, where, FORMAT, FORMAT_VERSION, SPEC_KEYS, "a compressed model")
        layers = spec.get("layers")
        if not isinstance(layers, dict):
            raise ValueError(f"{where}: 'layers' must be an object")
        entries = {name: CompressedLayer.from_json(e, name, where) for name, e in layers.items()}
        model_class, dtype, digest = spec.get("model_class"), spec.get("dtype"), spec.get("tensors_sha256", "")
        if not isinstance(model_class, str) or not isinstance(dtype, str):
            raise ValueError(f"{where}: 'model_class' and 'dtype' must be strings")
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"{where}: dtype={dtype!r} is not a torch dtype")
        if not isinstance(digest, str):
            raise ValueError(f"{where}: tensors_sha256 must be a string")
        return cls(model_class, dtype, entries, spec.get("tensors_sha256"), spec["format_version"])


def structure(model: nn.Module) -> dict[str, CompressedLayer]:
    """The compressed layers of ``model``: ``{name: CompressedLayer}``."""
    kinds = {cls: kind for kind, cls in _structured().items()}
    out: dict[str, CompressedLayer] = {}
    for name, m in model.named_modules():
        kind = kinds.get(type(m))
        if kind == "lowrank":
            out[name] = CompressedLayer(kind, m.in_features, m.out_features, m.up.bias is not None, rank=m.rank)
        elif kind is not None:
            out[name] = CompressedLayer(kind, m.in_features, m.out_features, m.bias is not None, options=m.options())
    return out


def save_compressed(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write ``model`` (compressed by :func:`loraplex.compress`) to ``directory``; returns its path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    params = list(model.parameters())
    dtype = str(params[0].dtype).removeprefix("torch.") if params else "float32"
    spec = CompressionSpec(type(model).__name__, dtype, structure(model))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        write_text(d / "config.json", config.to_json_string())
    spec = replace(spec, tensors_sha256=write_tensors(d / TENSOR_FILE, model.state_dict()))
    write_json(d / SPEC_FILE, spec.to_json())  # last: the folder is loadable only once everything is in place
    return d


def read_compression_spec(directory: str | os.PathLike[str]) -> CompressionSpec:
    """The validated ``compression.json`` of ``directory`` (:meth:`CompressionSpec.from_json`)."""
    where = Path(directory) / SPEC_FILE
    return CompressionSpec.from_json(read_json(where), where)


def _hf_model(directory: Path, class_name: str) -> nn.Module:
    try:
        import transformers
    except ImportError as e:
        raise ValueError(f"{directory} holds a {class_name}: loading it needs transformers") from e
    cls = getattr(transformers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(
            f"{directory}: model_class={class_name!r} is not a transformers model class; "
            "pass the model to load_compressed(directory, model)"
        )
    config = transformers.AutoConfig.from_pretrained(directory)
    return cls(config)


def _host(model: nn.Module, class_name: str) -> nn.Module:
    if type(model).__name__ == class_name:
        return model
    for _, m in model.named_modules():
        if type(m).__name__ == class_name:
            return m
    return model


def _empty_layer(e: CompressedLayer, device: torch.device, dtype: torch.dtype) -> nn.Module:
    if e.rank is not None:
        return LowRankLinear(e.in_features, e.out_features, e.rank, bias=e.bias, device=device, dtype=dtype)
    cls: Any = _structured()[e.kind]
    try:
        return cls(e.in_features, e.out_features, e.bias, **(e.options or {}), device=device, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"options {e.options!r} do not fit a {e.kind} layer: {err}") from err


def _expected(host: nn.Module, new: dict[str, nn.Module], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state_dict ``host`` will have once the ``new`` layers replace its own, cast to ``dtype``."""
    out = {}
    for k, v in host.state_dict().items():
        if not any(k.startswith(name + ".") for name in new):
            out[k] = v.to("meta", dtype) if v.is_floating_point() else v.to("meta")
    for name, layer in new.items():
        out.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    return out


def load_compressed(directory: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """The compressed model saved in ``directory`` (built from its config, or put into ``model``)."""
    d = Path(directory)
    spec = read_compression_spec(d)
    dtype = getattr(torch, spec.dtype)
    tensors = read_matching_tensors(spec.tensors_sha256, d / SPEC_FILE, d / TENSOR_FILE)
    if model is None:
        model = _hf_model(d, spec.model_class)
    host = _host(model, spec.model_class)
    new: dict[str, nn.Module] = {}
    for name, e in spec.layers.items():
        try:
            old = host.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"{d}: layer {name!r} is not in the {type(host).__name__} given") from err
        w = getattr(old, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"{d}: layer {name!r} of the model given is a {type(old).__name__}, not a linear layer")
        shape = tuple(w.shape) if isinstance(old, nn.Linear) else tuple(w.shape[::-1])
        if shape != (e.out_features, e.in_features):
            raise ValueError(
                f"{d}: layer {name!r} has weight shape {shape}, the file has {(e.out_features, e.in_features)}"
            )
        try:
            new[name] = _empty_layer(e, w.device, dtype).train(old.training)
        except ValueError as err:
            raise ValueError(f"{d}: layer {name!r}: {err}") from err
    check_tensors(tensors, _expected(host, new, dtype), d / TENSOR_FILE)
    # every check passed: only now is the model changed
    host.to(dtype)
    for name, layer in new.items():
        host.set_submodule(name, layer)
    try:
        host.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{d / TENSOR_FILE} does not fit the {type(host).__name__}: {err}") from err
    return model
