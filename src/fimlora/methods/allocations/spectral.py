"""Spectral allocation (ours): spend the budget on the largest marginal gains σ_k² / (d_in + d_out).

A module's k-th rank is worth the k-th squared singular value of its expected calibration gradient Ḡ
(``spectral``), or of the K-FAC-whitened S^{-1/2} Ḡ A^{-1/2} (``whitened-spectral``, the loss decrease of
a rank-k natural-gradient step); see :mod:`fimlora.allocation.spectral` for the solver and its guarantee.
"""

from __future__ import annotations

from collections.abc import Mapping

from fimlora.allocation import Allocation, allocate_spectral
from fimlora.methods.base import NEEDS_GRADIENTS, NEEDS_KFAC, AllocationRule, MethodContext

# A rank must be one rank of the weight whose gradient is decomposed (not HydraLoRA's k heads).
PLAIN_RANK_ADAPTERS = frozenset({"lora", "dora", "rslora", "pissa", "olora", "lora-ga", "gora", "delta-lora"})


class Spectral(AllocationRule):
    adapters = PLAIN_RANK_ADAPTERS

    def __init__(self, whitened: bool) -> None:
        self.whitened = whitened
        self.name = "whitened-spectral" if whitened else "spectral"
        self.description = (
            "Greedy/exact knapsack on σ_k² of the K-FAC-whitened expected gradient."
            if whitened
            else "Greedy/exact knapsack on σ_k² of the expected calibration gradient."
        )
        self.needs = frozenset({NEEDS_KFAC}) if whitened else frozenset({NEEDS_GRADIENTS})

    def allocate(
        self,
        ctx: MethodContext,
        shapes: Mapping[str, tuple[int, int]],
        budget: int,
        rank_costs: Mapping[str, int] | None = None,
    ) -> Allocation:
        source = ctx.kfac if self.whitened else ctx.fisher
        if source is None or not source.gradients:
            raise RuntimeError(f"{self.name} needs the calibration gradients, but none were computed")
        kfac = None
        if self.whitened:
            if not source.kfac:
                raise RuntimeError(f"{self.name} needs K-FAC factors, but none were computed")
            kfac = source.kfac
        settings = ctx.config.allocation
        return allocate_spectral(
            dict(source.gradients),
            shapes,
            budget=budget,
            r_min=settings.r_min,
            r_max=settings.r_max,
            kfac=kfac,
            damping=ctx.options.spectral.damping,
            rank_costs=rank_costs,
        )


RULES = {"spectral": Spectral(whitened=False), "whitened-spectral": Spectral(whitened=True)}
