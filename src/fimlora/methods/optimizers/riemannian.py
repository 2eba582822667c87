"""Riemannian preconditioned LoRA (Zhang & Pilanci, 2024, arXiv 2402.02347), PEFT's implementation.

Before each AdamW step the LoRA gradients are preconditioned by r×r matrices:
∇A ← (BᵀB + λI)⁻¹∇A and ∇B ← ∇B(AAᵀ + λI)⁻¹, with λ = ``method_options.riemannian.reg``.
PEFT builds one parameter group; the Trainer's weight-decay grouping (no decay on biases and
normalisation weights) is applied to it, as for plain LoRA.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.optimizers import create_riemannian_optimizer

from fimlora.methods.base import MethodContext, OptimizerKind
from fimlora.methods.optimizers._groups import split_weight_decay


class Riemannian(OptimizerKind):
    name = "riemannian"
    description = "AdamW on Riemannian-preconditioned LoRA gradients (r×r preconditioners, damping reg)."

    def build(self, model: Any, ctx: MethodContext) -> torch.optim.Optimizer:
        train = ctx.config.train
        opts = ctx.options.riemannian
        optimizer = create_riemannian_optimizer(
            model,
            torch.optim.AdamW if opts.base_optimizer == "adamw" else torch.optim.SGD,
            lr=train.learning_rate,
            reg=opts.reg,
            weight_decay=train.weight_decay,
        )
        return split_weight_decay(optimizer, model, train.weight_decay)


OPTIMIZER = Riemannian()
