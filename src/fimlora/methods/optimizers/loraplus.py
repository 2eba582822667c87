"""LoRA+ (Hayou et al., 2024, arXiv 2402.12354) through ``peft.optimizers.create_loraplus_optimizer``.

B learns ``lr_ratio`` times faster than A. Two PEFT behaviours are corrected here so that LoRA+ differs
from LoRA in that one respect only: PEFT ignores a plain ``weight_decay`` argument (the decay must be
passed as ``loraplus_weight_decay``), and it puts every 1-D trainable tensor, including the task head's
bias, in B's fast group. Parameters that are not LoRA factors go back to the base learning rate, and
weight decay follows the Trainer's rule (none on biases and normalisation weights).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.optimizers import create_loraplus_optimizer
from torch import nn

from fimlora.methods.base import MethodContext, OptimizerKind
from fimlora.methods.optimizers._groups import split_weight_decay


class LoraPlus(OptimizerKind):
    name = "loraplus"
    description = "LoRA+: learning rate of B = lr_ratio × that of A (PEFT's LoRA+ optimizer)."

    def build(self, model: Any, ctx: MethodContext) -> torch.optim.Optimizer:
        train = ctx.config.train
        ratio = ctx.options.loraplus.lr_ratio
        peft_optimizer = create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=train.learning_rate,
            loraplus_lr_ratio=ratio,
            loraplus_weight_decay=train.weight_decay,
        )
        names = {id(p): n for n, p in model.named_parameters()}
        groups: list[dict] = []
        others: list[nn.Parameter] = []
        for group in peft_optimizer.param_groups:
            fast = group["lr"] != train.learning_rate
            keep = [p for p in group["params"] if not fast or "lora_B" in names[id(p)]]
            others += [p for p in group["params"] if fast and "lora_B" not in names[id(p)]]
            if keep:
                groups.append({"params": keep, "lr": group["lr"], "weight_decay": group["weight_decay"]})
        if others:
            groups.append({"params": others, "lr": train.learning_rate, "weight_decay": train.weight_decay})
        ctx.record["loraplus"] = {"lr_ratio": ratio}
        return split_weight_decay(
            torch.optim.AdamW(groups, lr=train.learning_rate), model, train.weight_decay
        )

    def finalize(self, model: nn.Module, ctx: MethodContext) -> dict:
        return {"loraplus": ctx.record.pop("loraplus", None)}


OPTIMIZER = LoraPlus()
