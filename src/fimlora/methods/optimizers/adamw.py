"""AdamW, as the Trainer builds it (weight decay on all but biases and normalisation weights)."""

from __future__ import annotations

from torch import nn

from fimlora.methods.base import MethodContext, OptimizerKind


class AdamW(OptimizerKind):
    name = "adamw"
    description = "AdamW with the Trainer's defaults."

    def build(self, model: nn.Module, ctx: MethodContext) -> None:
        return None


OPTIMIZER = AdamW()
