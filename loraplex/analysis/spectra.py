"""Spectral statistics of a weight matrix: re-exported from their one home, :mod:`loraplex.linalg`.

``stable_rank``, ``floored_stable_rank`` / ``floor_rank``, ``effective_rank``, ``energy_rank``,
``tail_error``, ``rank_for_error``, ``numerical_rank`` and ``singular_values`` (with its tolerance,
``default_rtol``) are defined, documented and doctested in :mod:`loraplex.linalg`, the ground floor
of the package; this module keeps the old import path ``loraplex.analysis.spectra`` working.
"""

from __future__ import annotations

from loraplex.linalg import (
    FLOOR_RTOL,
    RTOL_FACTOR,
    check_energy,
    default_rtol,
    effective_rank,
    energy_rank,
    floor_rank,
    floored_stable_rank,
    numerical_rank,
    rank_for_error,
    singular_values,
    stable_rank,
    tail_error,
)

__all__ = [
    "FLOOR_RTOL",
    "RTOL_FACTOR",
    "check_energy",
    "default_rtol",
    "effective_rank",
    "energy_rank",
    "floor_rank",
    "floored_stable_rank",
    "numerical_rank",
    "rank_for_error",
    "singular_values",
    "stable_rank",
    "tail_error",
]
