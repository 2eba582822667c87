"""EVA, explained-variance adaptation (Paischer et al., 2024, arXiv 2410.07170), through PEFT.

PEFT's ``init_lora_weights="eva"`` only *declares* EVA: ``initialize_lora_eva_weights(model, dataloader)``
must then run the incremental SVD of each target layer's inputs on calibration batches, put the top right
singular vectors into A and redistribute ranks by explained variance (each module capped at ``rho × r``).
Without that call the adapter is plain LoRA. This rule makes the call, on the same calibration subset the
Fisher uses, and records the redistributed ranks.

Budget: EVA redistributes a budget of ranks (``r × n_modules``). On modules of different widths that can
move parameters onto wide modules; the run records the exact parameter count next to the budget, and
``rho = 1`` keeps EVA's initialisation with uniform ranks (exact parameter parity).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from fimlora.allocation import Allocation, allocate_ranks
from fimlora.methods.base import AllocationRule, MethodContext


def _module_ranks(model: nn.Module) -> dict[str, int]:
    ranks = {}
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            ranks[name.split(".lora_A.")[0].removeprefix("base_model.model.")] = int(param.shape[0])
    return ranks


class Eva(AllocationRule):
    name = "eva"
    description = "EVA: A from the SVD of layer inputs; ranks redistributed by explained variance."
    static_ranks = False
    adapters = frozenset({"lora", "rslora"})

    def allocate(self, ctx: MethodContext, shapes: Mapping[str, tuple[int, int]], budget: int) -> Allocation:
        # EVA starts from uniform ranks at the budget and moves them between modules itself.
        settings = ctx.config.allocation
        return allocate_ranks(
            None, shapes, budget=budget, strategy="uniform", r_min=settings.r_min, r_max=settings.r_max
        )

    def peft_config(self, lora_kwargs: dict[str, Any], allocation: Allocation, ctx: MethodContext) -> Any:
        from peft import EvaConfig, LoraConfig

        opts = ctx.options.eva
        eva_config = EvaConfig(
            rho=opts.rho,
            tau=opts.tau,
            # Classification labels are one per sequence, not per token: only LM labels can mask tokens.
            use_label_mask=ctx.task == "causal-lm",
            whiten=False,
        )
        return LoraConfig(**lora_kwargs, init_lora_weights="eva", eva_config=eva_config)

    def after_wrap(self, model: nn.Module, ctx: MethodContext) -> None:
        from peft import initialize_lora_eva_weights

        batches = ctx.calibration_shard or ctx.calibration_batches
        if batches is None:
            raise RuntimeError("EVA needs calibration batches")
        before = _module_ranks(model)
        # PEFT gathers every process's layer inputs itself: each process feeds its own shard.
        initialize_lora_eva_weights(model, dataloader=batches(), show_progress_bar=False)
        after = _module_ranks(model)
        ctx.record["eva"] = {
            "rho": ctx.options.eva.rho,
            "initial_ranks": before,
            "redistributed_ranks": after,
            "initialized": True,
        }

    def finalize(self, model: nn.Module, ctx: MethodContext) -> dict[str, Any]:
        return {"eva": ctx.record.pop("eva", None)}


RULE = Eva()
