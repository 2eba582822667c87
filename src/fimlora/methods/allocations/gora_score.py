"""Control: GoRA's importance score through our proportional allocator (not GoRA; see ``gora.py``).

The score is GoRA's (arXiv 2502.12171): mean |W ⊙ Ḡ|, Ḡ the gradient of the mean calibration loss with
respect to the frozen weight W, taken in the same pass as the Fisher. The scores go through the same
allocator, with the same budget rules, as the Fisher scores (ranks ∝ score^tau, water-filled): only the
importance signal differs from fim-lora. On a quantised base W is the dequantised weight the layer
multiplies by, formed one module at a time. GoRA itself spends *parameters* in proportion to the score and
initialises B from Ḡ; that is the ``gora`` preset.
"""

from __future__ import annotations

import torch

from fimlora.methods.allocations._scored import ScoredAllocation
from fimlora.methods.base import NEEDS_GRADIENTS, MethodContext
from fimlora.quantization import dequantized_weight


def gora_module_importance(weight: torch.Tensor, gradient: torch.Tensor) -> float:
    """GoRA's importance ``mean |W ⊙ Ḡ|`` of one module (``union_mean`` in the official code), in float64."""
    return float((weight.double() * gradient.double()).abs().mean())


def gora_importance(base_model: torch.nn.Module, gradients: dict[str, torch.Tensor]) -> dict[str, float]:
    """:func:`gora_module_importance` of every module in ``gradients``; one dequantised weight at a time,
    so a quantised base never holds all of them in float32."""
    modules = dict(base_model.named_modules())
    return {
        name: gora_module_importance(dequantized_weight(modules[name]), g) for name, g in gradients.items()
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
        gradients = ctx.fisher.gradients
        return gora_importance(ctx.base_model, {name: gradients[name] for name in ctx.targets})


RULE = GoraScore()
