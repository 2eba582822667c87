"""LoRA-FA (Zhang et al., 2023, arXiv 2308.03303) through ``peft.optimizers.create_lorafa_optimizer``.

A stays frozen at its random init; only B trains, with its gradient projected so the update is the one
full fine-tuning would make within A's row space. PEFT's optimizer freezes A itself.

Two of PEFT's settings are brought in line with the Trainer's AdamW, so that LoRA-FA differs from LoRA
only in what it is meant to: PEFT decays every parameter (biases and normalisation weights too) and
uses eps = 1e-6; here the Trainer's weight-decay grouping and its eps (1e-8) apply.

Budget: a rank trains only B's column, ``d_out`` parameters (not ``d_in + d_out``), so at an equal
parameter budget LoRA-FA gets the ranks that budget affords (uniform: about twice LoRA's on square
modules); the count is taken after the optimizer froze A.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any, cast

import torch
from peft.optimizers import create_lorafa_optimizer

from fimlora.methods.base import CostModel, MethodContext, OptimizerKind
from fimlora.methods.optimizers._groups import TRAINER_ADAM_BETAS, TRAINER_ADAM_EPS, split_weight_decay

_TAKES_RANK = "r" in inspect.signature(create_lorafa_optimizer).parameters


class LoraFa(OptimizerKind):
    name = "lora-fa"
    description = "LoRA-FA: A frozen, B trained with a projected gradient (PEFT's LoRA-FA optimizer)."

    def cost(self, adapter_cost: CostModel, shape: tuple[int, int], ctx: MethodContext) -> CostModel:
        # A (r × d_in) is frozen: a rank trains what it costs less A's row.
        return replace(adapter_cost, per_rank=adapter_cost.per_rank - shape[1])

    def build(self, model: Any, ctx: MethodContext) -> torch.optim.Optimizer:
        train = ctx.config.train
        # Untyped: PEFT's annotations differ between the two signatures (and its versions).
        create = cast(Any, create_lorafa_optimizer)
        if _TAKES_RANK:
            # PEFT before 0.22 requires r and lora_alpha (its default scaling; per-module scalings are
            # read from the layers); 0.22 reads everything from the layers and deprecates them.
            optimizer = create(
                model,
                r=ctx.config.budget.reference_rank,
                lora_alpha=ctx.config.lora_alpha,
                lr=train.learning_rate,
                weight_decay=train.weight_decay,
            )
        else:
            optimizer = create(model, lr=train.learning_rate, weight_decay=train.weight_decay)
        # A and B of a module stay adjacent in one group (LoRA-FA pairs them by order): both are decayed.
        return split_weight_decay(
            optimizer,
            model,
            train.weight_decay,
            aligned=("names", "scaling_factors"),
            eps=TRAINER_ADAM_EPS,
            betas=TRAINER_ADAM_BETAS,
        )


OPTIMIZER = LoraFa()
