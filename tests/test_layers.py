"""Layers that only point down: every ``loraplex`` import goes to the same room or a lower one.

The rooms, lowest first, are written out in :data:`ROOMS`; a module belongs to the room of the
longest prefix listed there. The test imports every module of the package (found with
``pkgutil.walk_packages``), reads each module's ``loraplex`` imports with ``ast`` (module-level and
inside functions alike, ``from . import x`` resolved), and fails naming the importing module, the
imported module and both rooms when an import points up. A module that no room claims fails too, so a
new module has to be placed in the order. Rooms with no import between them (``rank`` and ``optim``,
say) are in a fixed, arbitrary order; what the test keeps is that no import climbs.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from collections import Counter
from pathlib import Path

import loraplex

# (room, module prefixes), lowest first.
ROOMS: list[tuple[str, tuple[str, ...]]] = [
    # pure helpers: linear algebra, where data and models come from, file writing; nothing from loraplex
    ("ground", ("loraplex.linalg", "loraplex.models", "loraplex.data", "loraplex.files", "loraplex._version")),
    ("adapter", ("loraplex.adapter", "loraplex.options")),  # the Adapter base class, the option declarations and checks
    ("adapters", ("loraplex.adapters",)),  # the methods
    ("inject", ("loraplex.inject",)),  # adapt / targets
    ("io", ("loraplex.spec", "loraplex.io", "loraplex.checkpoint", "loraplex.peft_io")),  # saving and loading
    ("named", ("loraplex.named",)),  # named adapters: activate, remove, merge, mixed batches, hot-swap
    ("rank", ("loraplex.rank",)),  # rank allocators
    ("optim", ("loraplex.optim",)),  # optimisers and the --optimizer registry
    ("convert", ("loraplex.convert", "loraplex.combine")),  # adapters to adapters
    ("decompose", ("loraplex.decompose",)),  # a weight into adapter-shaped factors
    ("compression", ("loraplex.compression",)),  # LoRD and its workbench
    ("lowrank", ("loraplex.lowrank",)),  # low-rank training (TRP, Cuttlefish, LoRA-E)
    ("analysis", ("loraplex.analysis",)),  # spectra re-exports and the model report
    ("hf", ("loraplex.hf",)),  # the HuggingFace Trainer callback
    ("api", ("loraplex",)),  # the package's own namespace (``import loraplex``): only the module ``loraplex``
    ("train", ("loraplex.train",)),  # loraplex finetune
    ("compare", ("loraplex.compare",)),  # loraplex compare
    ("cli", ("loraplex.cli", "loraplex.__main__")),
]
RANK = {name: i for i, (name, _) in enumerate(ROOMS)}
NOT_IMPORTED = {"loraplex.__main__"}  # runs the CLI when imported


def room_of(module: str) -> str | None:
    """The room of the longest listed prefix of ``module`` (``loraplex`` itself only for the package)."""
    best: tuple[int, str] | None = None
    for name, prefixes in ROOMS:
        for p in prefixes:
            if p == "loraplex" and module != "loraplex":
                continue
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[0]):
                best = (len(p), name)
    return best[1] if best else None


def modules() -> list[str]:
    return ["loraplex", *sorted(m.name for m in pkgutil.walk_packages(loraplex.__path__, "loraplex."))]


def imports(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The ``loraplex`` modules ``source`` imports anywhere (``from a import b`` gives ``a.b`` when a module)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "loraplex"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "loraplex":
                continue
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return found - {module}


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """``module (room) imports other (room)`` for each import that points to a higher room."""
    known = set(sources)
    out = []
    for module, (source, is_package) in sorted(sources.items()):
        here = room_of(module)
        for other in sorted(imports(module, source, is_package, known)):
            there = room_of(other)
            if here is not None and there is not None and RANK[there] > RANK[here]:
                out.append(f"{module} (room {here!r}) imports {other} (room {there!r}, higher)")
    return out


def package_sources() -> dict[str, tuple[str, bool]]:
    sources = {}
    for module in modules():
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None, module
        sources[module] = (Path(spec.origin).read_text(encoding="utf-8"), spec.submodule_search_locations is not None)
    return sources


def test_every_module_imports() -> None:
    for module in modules():
        if module not in NOT_IMPORTED:
            importlib.import_module(module)


def test_every_module_has_a_room() -> None:
    assert [m for m in modules() if room_of(m) is None] == []


def test_imports_only_point_down() -> None:
    sources = package_sources()
    counts = Counter(room_of(m) for m in sources)
    edges = Counter(room_of(m) for m, (src, pkg) in sources.items() for _ in imports(m, src, pkg, set(sources)))
    print(f"\nlayers, lowest first: {len(ROOMS)} rooms, {len(sources)} modules, {sum(edges.values())} loraplex imports")
    for i, (name, prefixes) in enumerate(ROOMS):
        print(f"  {i:2d} {name:<12} {counts[name]:3d} modules {edges[name]:4d} imports  {', '.join(prefixes)}")
    bad = violations(sources)
    print(f"imports pointing up: {len(bad)}")
    assert bad == [], "imports that point up a layer:\n" + "\n".join(bad)


def test_an_upward_import_is_caught() -> None:
    """The import this layering removed (the LoRD workbench reached up into ``train`` for ``model_path``)."""
    sources = {
        "loraplex.compression.workbench": ("from loraplex.train import model_path\n", False),
        "loraplex.decompose.als": ("def f():\n    from ..compression.layers import split_factors\n", False),
        "loraplex.train": ("from loraplex.models import model_path\n", False),
        "loraplex.compression.layers": ("", False),
        "loraplex.models": ("", False),
    }
    assert violations(sources) == [
        "loraplex.compression.workbench (room 'compression') imports loraplex.train (room 'train', higher)",
        "loraplex.decompose.als (room 'decompose') imports loraplex.compression.layers (room 'compression', higher)",
    ]
