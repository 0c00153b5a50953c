"""Fixtures over the property matrix (models and cases live in matrix.py)."""

from __future__ import annotations

import pytest
from matrix import CASES


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``case`` runs over every case; with ``model_spec`` too, over the models each case fits."""
    names = metafunc.fixturenames
    if "case" in names and "model_spec" in names:
        pairs = [(c, m) for c in CASES for m in c.specs]
        metafunc.parametrize(("case", "model_spec"), pairs, ids=[f"{c}-{m.name}" for c, m in pairs])
    elif "case" in names:
        metafunc.parametrize("case", CASES, ids=str)
