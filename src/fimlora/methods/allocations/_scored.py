"""Rules that turn one importance score per module into ranks (:func:`fimlora.allocation.allocate_ranks`)."""

from __future__ import annotations

from collections.abc import Mapping

from fimlora.allocation import Allocation, allocate_ranks
from fimlora.methods.base import AllocationRule, MethodContext


class ScoredAllocation(AllocationRule):
    """Water-filling allocation on per-module scores; subclasses say where the scores come from."""

    strategy = "proportional"

    def scores(self, ctx: MethodContext) -> Mapping[str, float] | None:
        raise NotImplementedError

    def allocate(
        self,
        ctx: MethodContext,
        shapes: Mapping[str, tuple[int, int]],
        budget: int,
        rank_costs: Mapping[str, int] | None = None,
    ) -> Allocation:
        settings = ctx.config.allocation
        return allocate_ranks(
            self.scores(ctx),
            shapes,
            budget=budget,
            strategy=self.strategy,
            r_min=settings.r_min,
            r_max=settings.r_max,
            tau=settings.tau,
            seed=ctx.seed,
            rank_costs=rank_costs,
        )


def fisher_scores(ctx: MethodContext) -> dict[str, float]:
    if ctx.fisher is None:
        raise RuntimeError(f"method {ctx.spec.name!r} needs the Fisher, but none was computed")
    return ctx.fisher.scores(ctx.config.fisher.aggregation)
