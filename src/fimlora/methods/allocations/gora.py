"""GoRA's rank allocation (He et al., 2025, arXiv 2502.12171; official code ``hhnqqq/MyTransformers``,
``common/lora_modules/gora.py``, ``get_allocated_rank``): parameters in proportion to importance.

Module i's importance is I_i = mean |W_i ⊙ Ḡ_i| (``union_mean``), Ḡ the gradient of the mean training
loss on the calibration subset (:mod:`fimlora.methods.gradients`), normalised to Ĩ_i = I_i / Σ_j I_j. The
budget b (trainable parameters) is split in proportion to Ĩ and turned into ranks at module i's cost per
rank c_i (d_in + d_out for LoRA):

    r_i = clamp(round(b·Ĩ_i) // c_i, r_lo, r_hi_i)

with r_lo = max(allocation.r_min, floor(min_rank_factor·r)) and r_hi_i = min(floor(max_rank_factor·r),
d_in, d_out, allocation.r_max), r the budget's reference rank (the official experiments: r/2 and 4r).
The floor division leaves up to one rank per module unspent and the clamp can overspend, so the result is
made budget-exact by a stated rule: while Σ r_i c_i > b, take a rank from the module furthest above its
target t_i = b·Ĩ_i / c_i (never below r_lo); then, while some module below its cap has a rank that fits in
what is left, give one to the module furthest below its target (ties: higher importance, then name).
The record keeps GoRA's unadjusted ranks next to the final ones.

Contrast with ``gora-score``: the same score through our proportional allocator makes *ranks*
proportional to it, so a wide module gets as many ranks as a narrow one of equal score, at a higher cost.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from fimlora.allocation import Allocation
from fimlora.allocation.allocate import rank_cost
from fimlora.errors import FimloraError
from fimlora.methods.allocations.gora_score import gora_importance
from fimlora.methods.base import AllocationRule, MethodContext
from fimlora.methods.gradients import calibration_gradients


def gora_ranks(
    importance: Mapping[str, float],
    costs: Mapping[str, int],
    caps: Mapping[str, int],
    *,
    budget: int,
    r_lo: int,
) -> tuple[dict[str, int], dict[str, int]]:
    """``(ranks, gora)``: GoRA's ranks made to fit ``budget`` exactly, and its unadjusted ranks.

    ``importance``: I_i ≥ 0 (not all 0); ``costs``: parameters per rank; ``caps``: largest rank (≥ r_lo).
    Σ ranks_i·costs_i ≤ budget, and no module below its cap has a rank that still fits.
    """
    names = sorted(importance)
    total = sum(importance.values())
    if not total > 0:
        raise FimloraError("GoRA's importances are all zero; check the calibration gradient.")
    share = {n: importance[n] / total for n in names}
    target = {n: budget * share[n] / costs[n] for n in names}
    gora = {n: min(max(round(budget * share[n]) // costs[n], r_lo), caps[n]) for n in names}
    ranks = dict(gora)
    left = budget - sum(ranks[n] * costs[n] for n in names)
    while left < 0:
        above = [n for n in names if ranks[n] > r_lo]
        if not above:
            raise FimloraError(
                f"A budget of {budget} trainable parameters cannot give every module GoRA's smallest rank "
                f"{r_lo}; raise the budget or lower method_options.gora.min_rank_factor."
            )
        name = max(above, key=lambda n: (ranks[n] - target[n], n))
        ranks[name] -= 1
        left += costs[name]
    heap = [(ranks[n] - target[n], -share[n], n) for n in names if ranks[n] < caps[n]]
    heapq.heapify(heap)
    while heap:
        _, _, name = heapq.heappop(heap)
        if costs[name] > left:  # left only shrinks: this module never fits again
            continue
        ranks[name] += 1
        left -= costs[name]
        if ranks[name] < caps[name]:
            heapq.heappush(heap, (ranks[name] - target[name], -share[name], name))
    return ranks, gora


class Gora(AllocationRule):
    name = "gora"
    description = "GoRA: parameters ∝ normalised mean |W ⊙ Ḡ|, rank = round(b·Ĩ) // (d_in + d_out), clamped."

    def allocate(
        self,
        ctx: MethodContext,
        shapes: Mapping[str, tuple[int, int]],
        budget: int,
        rank_costs: Mapping[str, int] | None = None,
    ) -> Allocation:
        if ctx.base_model is None:
            raise RuntimeError("GoRA needs the base model's weights")
        settings, opts = ctx.config.allocation, ctx.options.gora
        reference = ctx.config.budget.reference_rank
        r_lo = max(settings.r_min, math.floor(opts.min_rank_factor * reference))
        r_hi = math.floor(opts.max_rank_factor * reference)
        if settings.r_max is not None:
            r_hi = min(r_hi, settings.r_max)
        caps = {n: min(r_hi, d_out, d_in) for n, (d_out, d_in) in shapes.items()}
        low = sorted(n for n, cap in caps.items() if cap < r_lo)
        if low:
            raise FimloraError(
                f"GoRA's smallest rank {r_lo} exceeds the largest rank module {low[0]!r} may take "
                f"({caps[low[0]]}); check method_options.gora's rank factors and allocation.r_max."
            )
        gradients = calibration_gradients(ctx)
        importance = gora_importance(ctx.base_model, {n: gradients[n] for n in shapes})
        costs = {n: rank_cost(shapes, rank_costs, n) for n in shapes}
        ranks, gora = gora_ranks(importance, costs, caps, budget=budget, r_lo=r_lo)
        ctx.record["gora_allocation"] = {
            "importance": "mean |W ⊙ Ḡ| (union_mean), normalised to sum 1",
            "min_rank": r_lo,
            "max_rank": r_hi,
            "gora_ranks": gora,
            "ranks": ranks,
        }
        return Allocation(
            ranks=ranks,
            shapes=dict(shapes),
            budget=budget,
            strategy="gora",
            scores=importance,
            r_min=r_lo,
            r_max=r_hi,
            rank_costs=None if rank_costs is None else dict(rank_costs),
        )

    def finalize(self, model: nn.Module, ctx: MethodContext) -> dict[str, Any]:
        return {"gora_allocation": ctx.record.pop("gora_allocation", None)}


RULE = Gora()
