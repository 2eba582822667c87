"""Allocation *solvers*: per-module scores → integer ranks under a budget of trainable parameters.

Proportional water-filling (``allocate_ranks``: ranks ∝ score^tau within [r_min, r_max]) and the spectral
knapsack (``allocate_spectral``; ``allocate_hindsight`` runs it on a finished run's trained updates).
They know nothing of methods: which scores to use, and when, is decided by the allocation *rules* in
:mod:`fimlora.methods.allocations`.
"""

from fimlora.allocation.allocate import STRATEGIES, allocate_ranks, uniform_rank_budget
from fimlora.allocation.allocation import Allocation
from fimlora.allocation.spectral import (
    HINDSIGHT_STRATEGY,
    SPECTRAL_STRATEGIES,
    allocate_hindsight,
    allocate_hindsight_gains,
    allocate_spectral,
    marginal_gains,
)

__all__ = [
    "HINDSIGHT_STRATEGY",
    "SPECTRAL_STRATEGIES",
    "STRATEGIES",
    "Allocation",
    "allocate_hindsight",
    "allocate_hindsight_gains",
    "allocate_ranks",
    "allocate_spectral",
    "marginal_gains",
    "uniform_rank_budget",
]
