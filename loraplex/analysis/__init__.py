"""Spectral analysis of weights and adapter updates: pure statistics (:mod:`.spectra`) and a model-wide report."""

from loraplex.linalg import (
    effective_rank,
    energy_rank,
    numerical_rank,
    rank_for_error,
    singular_values,
    stable_rank,
    tail_error,
)

__all__ = [
    "effective_rank",
    "energy_rank",
    "numerical_rank",
    "rank_for_error",
    "singular_values",
    "stable_rank",
    "tail_error",
]
