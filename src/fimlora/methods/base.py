"""What every method provides: how it spends the parameter budget across the target modules.

A method here is a rank-allocation rule on top of plain LoRA with AdamW; every method sees the same
targets, the same budget (trainable LoRA parameters), the same seed and the same training settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fimlora.allocation import Allocation, allocate_ranks


@dataclass(frozen=True)
class AllocationRequest:
    """Everything a method may look at when allocating ranks."""

    shapes: Mapping[str, tuple[int, int]]
    budget: int
    scores: Mapping[str, float] | None
    r_min: int = 1
    r_max: int | None = None
    tau: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Method:
    """A named method: an allocation strategy, and whether it needs the Fisher."""

    name: str
    description: str
    strategy: str
    needs_fisher: bool

    def allocate(self, request: AllocationRequest) -> Allocation:
        scores = request.scores
        if not self.needs_fisher:
            scores = dict.fromkeys(request.shapes, 1.0)
        elif scores is None:
            raise ValueError(f"method {self.name!r} needs Fisher scores")
        return allocate_ranks(
            scores,
            request.shapes,
            budget=request.budget,
            strategy=self.strategy,
            r_min=request.r_min,
            r_max=request.r_max,
            tau=request.tau,
            seed=request.seed,
        )
