"""Control: the Fisher allocation's rank histogram, randomly permuted among modules of equal shape.

Same budget, same spread of ranks, no Fisher signal: if Fisher-guided allocation beats this, the scores
carry information; if it only beats uniform LoRA, non-uniformity alone may explain the gain.
"""

from __future__ import annotations

from fimlora.methods.allocations._scored import ScoredAllocation, fisher_scores
from fimlora.methods.base import NEEDS_SCORES, MethodContext


class RandomRank(ScoredAllocation):
    name = "random"
    description = "Fisher allocation's ranks shuffled among same-shape modules (same budget and histogram)."
    needs = frozenset({NEEDS_SCORES})
    strategy = "random"

    def scores(self, ctx: MethodContext) -> dict[str, float]:
        return fisher_scores(ctx)


RULE = RandomRank()
