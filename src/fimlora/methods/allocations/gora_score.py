"""Control: GoRA's importance score through our proportional allocator (not GoRA; see ``gora.py``).

The score is GoRA's (arXiv 2502.12171): mean |W ⊙ Ḡ|, Ḡ the gradient of the mean calibration loss with
respect to the frozen weight W, taken in the same pass as the Fisher. The scores go through the same
allocator, with the same budget rules, as the Fisher scores (ranks ∝ score^tau, water-filled): only the
importance signal differs from fim-lora. GoRA itself spends *parameters* in proportion to the score and
initialises B from Ḡ; that is the ``gora`` preset.
"""

from __future__ import annotations

import torch

from fimlora.methods.allocations._scored import ScoredAllocation
from fimlora.methods.base import NEEDS_GRADIENTS, MethodContext


def gora_importance(weights: dict[str, torch.Tensor], gradients: dict[str, torch.Tensor]) -> dict[str, float]:
    """GoRA's importance ``mean |W ⊙ Ḡ|`` per module (``union_mean`` in the official code), in float64."""
    return {
        name: float((weights[name].double() * gradients[name].double()).abs().mean()) for name in gradients
    }


class GoraScore(ScoredAllocation):
    name = "gora-score"
    description = "Control: ranks ∝ (mean |W ⊙ Ḡ|)^tau (GoRA's score) through our proportional allocator."
    needs = frozenset({NEEDS_GRADIENTS})

    def scores(self, ctx: MethodContext) -> dict[str, float]:
        if ctx.fisher is None or not ctx.fisher.gradients:
            raise RuntimeError("gora-score needs the calibration gradients, but none were computed")
        if ctx.base_model is None:
            raise RuntimeError("gora-score needs the base model's weights")
        modules = dict(ctx.base_model.named_modules())
        weights = {name: modules[name].weight.detach() for name in ctx.targets}
        return gora_importance(weights, dict(ctx.fisher.gradients))


RULE = GoraScore()
