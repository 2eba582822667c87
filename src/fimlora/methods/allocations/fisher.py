"""Fisher-guided allocation (ours): ranks ∝ (per-module Fisher score)^tau, water-filled within the budget."""

from __future__ import annotations

from fimlora.methods.allocations._scored import ScoredAllocation, fisher_scores
from fimlora.methods.base import NEEDS_SCORES, MethodContext


class Fisher(ScoredAllocation):
    name = "fisher"
    description = "Ranks ∝ (per-module Fisher score)^tau from a calibration pass on the frozen weights."
    needs = frozenset({NEEDS_SCORES})

    def scores(self, ctx: MethodContext) -> dict[str, float]:
        return fisher_scores(ctx)


RULE = Fisher()
