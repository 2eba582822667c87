"""Cheap control: importance mean |W ⊙ Ḡ| of the accumulated gradient (GoRA's score, arXiv 2502.12171).

Ḡ is the gradient of the mean calibration loss with respect to the frozen weight W, taken in the same
pass as the Fisher. The scores go through the same allocator, with the same budget rules, as the Fisher
scores: only the importance signal differs. On a quantised base W is the dequantised weight the layer
multiplies by, formed one module at a time.
"""

from __future__ import annotations

import torch

from fimlora.methods.allocations._scored import ScoredAllocation
from fimlora.methods.base import NEEDS_GRADIENTS, MethodContext
from fimlora.quantization import dequantized_weight


def gradnorm_score(weight: torch.Tensor, gradient: torch.Tensor) -> float:
    """``mean |W ⊙ Ḡ|`` of one module, in float64."""
    return float((weight.double() * gradient.double()).abs().mean())


def gradnorm_scores(weights: dict[str, torch.Tensor], gradients: dict[str, torch.Tensor]) -> dict[str, float]:
    """``mean |W ⊙ Ḡ|`` per module, in float64."""
    return {name: gradnorm_score(weights[name], gradients[name]) for name in gradients}


class GradNorm(ScoredAllocation):
    name = "gradnorm"
    description = "Ranks ∝ (mean |W ⊙ Ḡ|)^tau, Ḡ the accumulated calibration gradient (GoRA's importance)."
    needs = frozenset({NEEDS_GRADIENTS})

    def scores(self, ctx: MethodContext) -> dict[str, float]:
        if ctx.fisher is None or not ctx.fisher.gradients:
            raise RuntimeError("gradnorm needs the calibration gradients, but none were computed")
        if ctx.base_model is None:
            raise RuntimeError("gradnorm needs the base model's weights")
        modules = dict(ctx.base_model.named_modules())
        gradients = ctx.fisher.gradients
        # One dequantised weight at a time: a quantised base never holds all of them in float32.
        return {
            name: gradnorm_score(dequantized_weight(modules[name]), gradients[name]) for name in ctx.targets
        }


RULE = GradNorm()
