"""Allocation *solvers*: per-module scores → integer ranks under a budget of trainable parameters.

Proportional water-filling (``allocate_ranks``: ranks ∝ score^tau within [r_min, r_max]) and the spectral
knapsack (``allocate_spectral``). They know nothing of methods: which scores to use, and when, is decided
by the allocation *rules* in :mod:`fimlora.methods.allocations`.
"""

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
