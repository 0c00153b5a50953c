"""The adapter spec (``adapter.json``) as a typed, versioned record (issue 19).

:class:`AdapterSpec` (the file) holds :class:`SpecEntry` records (one per adapter name, method and
options). :meth:`AdapterSpec.from_json` is the one place where the parsed JSON is checked; every
error names the file, the field and the constraint. :meth:`AdapterSpec.to_json` writes format
version 1 byte for byte as before (same keys, same order), so files saved earlier still load and a
model saves the same JSON as it always did. Reading never unpickles: the JSON is parsed by
:func:`loraplex.files.read_json` and only these records are built from it.

Version 1 layout::

    {"format": "loraplex.adapter", "format_version": 1, "loraplex_version": "0.1.0",
     "adapters": [{"name": "default", "method": "lora", "options": {...}, "layers": [...],
                   "sizes": [[in_features, out_features], ...]}],
     "train": ["classifier"], "tensors_sha256": "..."}

Optional in a file: ``loraplex_version``, ``tensors_sha256`` (a string when present), ``adapters``
and ``train`` (empty), an entry's ``name`` (``"default"``), ``options`` (``{}``) and ``sizes``.
Unknown keys are ignored with a warning naming them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.adapters import METHODS

FORMAT = "loraplex.adapter"
FORMAT_VERSION = 1
SPEC_KEYS = frozenset({"format", "format_version", "loraplex_version", "adapters", "train", "tensors_sha256"})
ENTRY_KEYS = frozenset({"name", "method", "options", "layers", "sizes"})


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


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings, not {value!r}")
    return tuple(value)


def _optional_str(obj: dict[str, Any], key: str, path: Path) -> str | None:
    if key in obj and not isinstance(obj[key], str):
        raise ValueError(f"{path}: {key} must be a string, not {obj[key]!r}")
    return obj.get(key)


def _is_size(s: Any) -> bool:
    return isinstance(s, list) and len(s) == 2 and all(isinstance(n, int) and not isinstance(n, bool) for n in s)


@dataclass(frozen=True)
class SpecEntry:
    """One adapter entry: the adapter ``name`` of ``method`` with ``options`` on ``layers``.

    ``options`` stays a dict: the options as saved (not bound; :func:`loraplex.inject.bind_options`
    fills in defaults at load). Their *names* are checked at read time against
    ``METHODS[method].declared_options`` (an unknown name is a ``ValueError`` naming the file and the
    entry); their *values* are checked by the method's declared options when the adapter is built.
    ``sizes``: ``(in_features, out_features)`` per layer, compared with the model on load; ``None``
    in files that omit them.
    """

    method: str
    layers: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    name: str = "default"
    sizes: tuple[tuple[int, int], ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "method": self.method, "options": self.options}
        out["layers"] = list(self.layers)
        if self.sizes is not None:
            out["sizes"] = [list(s) for s in self.sizes]
        return out

    @classmethod
    def from_json(cls, obj: Any, path: Path) -> SpecEntry:
        """One checked entry of ``adapters`` (``path``: the file, for the messages)."""
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: each adapter entry must be an object, not {obj!r}")
        if extra := sorted(set(obj) - ENTRY_KEYS):
            warnings.warn(f"{path}: ignoring unknown keys {extra} in an adapter entry", stacklevel=4)
        method, name, options = obj.get("method"), obj.get("name", "default"), obj.get("options", {})
        if method not in METHODS:
            raise ValueError(f"{path}: method={method!r} is not one of the registered methods: {', '.join(METHODS)}")
        if not isinstance(name, str):
            raise ValueError(f"{path}: name must be a string, not {name!r}")
        if not isinstance(options, dict):
            raise ValueError(f"{path}: options must be an object, not {options!r}")
        declared = METHODS[method].declared_options
        if unknown := sorted(set(options) - set(declared)):
            raise ValueError(
                f"{path}: adapter {name!r} has options {unknown} that method {method!r} does not declare; "
                f"its options are: {', '.join(declared)}"
            )
        layers = _str_list(obj.get("layers"), f"{path}: adapter {name!r}: layers")
        sizes = obj.get("sizes")
        ok = isinstance(sizes, list) and len(sizes) == len(layers) and all(map(_is_size, sizes))
        if sizes is not None and not ok:
            raise ValueError(
                f"{path}: adapter {name!r}: sizes must list [in_features, out_features] (two integers) for each "
                f"of its {len(layers)} layers, not {sizes!r}"
            )
        return cls(method, layers, options, name, None if sizes is None else tuple((s[0], s[1]) for s in sizes))


@dataclass(frozen=True)
class AdapterSpec:
    """A checkpoint's ``adapter.json``: its adapter entries, the ``train`` modules and the tensors' digest."""

    adapters: tuple[SpecEntry, ...] = ()
    train: tuple[str, ...] = ()
    loraplex_version: str | None = None
    tensors_sha256: str | None = None
    format_version: int = FORMAT_VERSION

    def names(self) -> list[str]:
        """The adapter names the spec holds, sorted."""
        return sorted({e.name for e in self.adapters})

    def to_json(self) -> dict[str, Any]:
        """The JSON object of format version 1 (keys in the order loraplex always wrote them)."""
        out: dict[str, Any] = {"format": FORMAT, "format_version": self.format_version}
        if self.loraplex_version is not None:
            out["loraplex_version"] = self.loraplex_version
        out |= {"adapters": [e.to_json() for e in self.adapters], "train": list(self.train)}
        if self.tensors_sha256 is not None:
            out["tensors_sha256"] = self.tensors_sha256
        return out

    @classmethod
    def from_json(cls, obj: Any, path: Path) -> AdapterSpec:
        """The checked spec of the parsed JSON ``obj`` read from ``path``; any violation is a ``ValueError``."""
        spec = check_header(obj, path, FORMAT, FORMAT_VERSION, SPEC_KEYS, "an adapter spec")
        entries = spec.get("adapters", [])
        if not isinstance(entries, list):
            raise ValueError(f"{path}: adapters must be a list, not {entries!r}")
        return cls(
            adapters=tuple(SpecEntry.from_json(e, path) for e in entries),
            train=_str_list(spec.get("train", []), f"{path}: train"),
            loraplex_version=_optional_str(spec, "loraplex_version", path),
            tensors_sha256=_optional_str(spec, "tensors_sha256", path),
            format_version=spec["format_version"],
        )
