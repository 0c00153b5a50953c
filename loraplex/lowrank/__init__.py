"""Low-rank training: TRP (periodic truncation + nuclear-norm sub-gradient), Cuttlefish (stable-rank tracking,
switch to factorised layers, Frobenius decay) and LoRAE (a nuclear-norm-penalised latent layer)."""

from loraplex.lowrank.cuttlefish import Cuttlefish, stable_rank
from loraplex.lowrank.lorae import Autoencoder, LowRankLatent, nuclear_penalty
from loraplex.lowrank.trp import TRP, energy_rank, value_rank  # energy_rank, value_rank: loraplex.linalg's

__all__ = [
    "TRP",
    "Autoencoder",
    "Cuttlefish",
    "LowRankLatent",
    "energy_rank",
    "nuclear_penalty",
    "stable_rank",
    "value_rank",
]
