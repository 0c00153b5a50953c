"""Decompositions of Jun Lu's survey (https://arxiv.org/abs/2408.05883), all built on alternating least squares.

Masked low-rank ALS (``als``), Hadamard products (``hadamard_als``), nearest Kronecker products
(``nearest_kronecker``, ``kronecker_als``, ``kronecker_ranked``) and Khatri–Rao products; their uses as
initialisations of LoHa / LoKr / LoKH (``fit_adapter``, ``init_from_weight``, ``init_from_gradient``) and as
compressed layers (``KroneckerLinear``, ``HadamardLinear``, ``candidates``).
"""

from loraplex.decompose.als import Fit, als
from loraplex.decompose.hadamard import hadamard_als
from loraplex.decompose.init import fit_adapter, init_from_gradient, init_from_weight
from loraplex.decompose.khatri_rao import face_splitting, face_splitting_factors, khatri_rao, khatri_rao_factors
from loraplex.decompose.kronecker import (
    kron_shapes,
    kron_sum,
    kronecker_als,
    kronecker_ranked,
    nearest_kronecker,
    rearrange,
    unrearrange,
)
from loraplex.decompose.layers import LAYERS, HadamardLinear, KroneckerLinear, candidates

__all__ = [
    "LAYERS",
    "Fit",
    "HadamardLinear",
    "KroneckerLinear",
    "als",
    "candidates",
    "face_splitting",
    "face_splitting_factors",
    "fit_adapter",
    "hadamard_als",
    "init_from_gradient",
    "init_from_weight",
    "khatri_rao",
    "khatri_rao_factors",
    "kron_shapes",
    "kron_sum",
    "kronecker_als",
    "kronecker_ranked",
    "nearest_kronecker",
    "rearrange",
    "unrearrange",
]
