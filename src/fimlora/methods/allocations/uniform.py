"""Uniform LoRA (Hu et al., 2021): the same rank on every target module, as far as the budget allows."""

from __future__ import annotations

from fimlora.methods.allocations._scored import ScoredAllocation
from fimlora.methods.base import MethodContext


class Uniform(ScoredAllocation):
    name = "uniform"
    description = "The same rank on every module (mixed r and r+1 only where the budget is not a multiple)."
    strategy = "uniform"

    def scores(self, ctx: MethodContext) -> None:
        return None


RULE = Uniform()
