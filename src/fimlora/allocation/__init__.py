"""Fisher-guided LoRA rank allocation under a budget of trainable parameters."""

from fimlora.allocation.allocate import STRATEGIES, allocate_ranks, uniform_rank_budget
from fimlora.allocation.allocation import Allocation
from fimlora.allocation.spectral import SPECTRAL_STRATEGIES, allocate_spectral, marginal_gains

__all__ = [
    "SPECTRAL_STRATEGIES",
    "STRATEGIES",
    "Allocation",
    "allocate_ranks",
    "allocate_spectral",
    "marginal_gains",
    "uniform_rank_budget",
]
