"""DoRA (Liu et al., 2024): magnitude vector m and direction W + s·BA, normalised per column."""

from __future__ import annotations

from fimlora.methods.adapters.lora import PeftLora
from fimlora.methods.base import CostModel, MethodContext


class Dora(PeftLora):
    name = "dora"
    description = "DoRA (Liu et al., 2024): magnitude vector m and direction W + s·BA, normalised per column."
    optimizers = frozenset({"adamw", "loraplus", "riemannian"})
    lora_options = {"use_dora": True}  # noqa: RUF012

    def cost(self, shape: tuple[int, int], ctx: MethodContext) -> CostModel:
        # The magnitude vector (one entry per output feature) is trained too and counts against the budget.
        return CostModel(per_rank=shape[0] + shape[1], fixed=shape[0])


ADAPTER = Dora()
