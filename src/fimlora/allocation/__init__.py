"""Fisher-guided LoRA rank allocation under a budget of trainable parameters."""

from fimlora.allocation.allocate import STRATEGIES, allocate_ranks, uniform_rank_budget
from fimlora.allocation.allocation import Allocation

__all__ = ["STRATEGIES", "Allocation", "allocate_ranks", "uniform_rank_budget"]
