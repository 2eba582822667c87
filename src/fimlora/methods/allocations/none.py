"""No allocation: for adapters that train without ranks (full fine-tuning)."""

from __future__ import annotations

from collections.abc import Mapping

from fimlora.allocation import Allocation
from fimlora.methods.base import AllocationRule, MethodContext


class NoAllocation(AllocationRule):
    name = "none"
    description = "No rank allocation (full fine-tuning)."
    adapters = frozenset({"full"})

    def allocate(
        self,
        ctx: MethodContext,
        shapes: Mapping[str, tuple[int, int]],
        budget: int,
        rank_costs: Mapping[str, int] | None = None,
    ) -> Allocation:
        raise RuntimeError("the 'none' allocation has no ranks")


RULE = NoAllocation()
