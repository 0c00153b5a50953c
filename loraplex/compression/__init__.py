"""Low-rank compression: factorised layers, one-shot decomposition (LoRD), saving and loading."""

from loraplex.compression.io import is_compressed, load_compressed, save_compressed
from loraplex.compression.layers import LowRankConv2d, LowRankLinear, factorize, svd_factors
from loraplex.compression.lord import Choice, compress, plan

__all__ = [
    "Choice",
    "LowRankConv2d",
    "LowRankLinear",
    "compress",
    "factorize",
    "is_compressed",
    "load_compressed",
    "plan",
    "save_compressed",
    "svd_factors",
]
