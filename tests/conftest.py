"""Fixtures over the property matrix (models and cases live in matrix.py)."""

from __future__ import annotations

import pytest
from matrix import CASES, MODELS, Case, Model


@pytest.fixture(params=CASES, ids=str)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


@pytest.fixture(params=MODELS, ids=lambda m: m.name)
def model_spec(request: pytest.FixtureRequest) -> Model:
    return request.param
