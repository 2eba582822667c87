"""VeRA (Kopiczko et al., 2024, arXiv 2310.11454) through ``peft.VeraConfig``.

One pair of frozen random projections shared by all layers; only the scaling vectors d (length r) and
b (length d_out) train, so VeRA's size is set by its own rank, far below a LoRA budget. It is not
budget-matched: the run records its (much smaller) parameter count next to the budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft import PeftModel, VeraConfig, get_peft_model
from torch import nn
from transformers import set_seed

from fimlora.allocation import Allocation
from fimlora.methods.base import AdapterKind, AllocationRule, MethodContext


class Vera(AdapterKind):
    name = "vera"
    description = "VeRA: shared frozen random A, B; trains per-layer scaling vectors d (r) and b (d_out)."
    budget_matched = False
    scalings = None  # no LoRA scaling: lora.scaling does not apply

    def build(
        self, model: nn.Module, allocation: Allocation | None, rule: AllocationRule, ctx: MethodContext
    ) -> nn.Module:
        opts = ctx.options.vera
        rank = min(opts.rank, *(min(shape) for shape in ctx.shapes.values()))
        config = VeraConfig(
            r=rank,
            target_modules=sorted(ctx.targets),
            projection_prng_key=ctx.seed,
            # The projections are regenerated from the key on load, but saving them makes the adapter
            # independent of the PRNG implementation.
            save_projection=True,
            vera_dropout=ctx.config.lora.dropout,
            d_initial=opts.d_initial,
            modules_to_save=ctx.peft_modules_to_save,
            task_type=ctx.task_type,
        )
        set_seed(ctx.seed)
        ctx.record["vera"] = {"rank": rank}
        return get_peft_model(model, config)

    def trainable_counts(self, model: nn.Module, ctx: MethodContext) -> dict[str, int]:
        counts = {"adapter_params": 0, "head_params": 0, "other_trainable_params": 0}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if "vera_lambda" in name:
                counts["adapter_params"] += param.numel()
            elif "modules_to_save" in name:
                counts["head_params"] += param.numel()
            else:
                counts["other_trainable_params"] += param.numel()
        return counts

    def finalize(self, model: nn.Module, ctx: MethodContext) -> dict:
        return {"vera": ctx.record.pop("vera", None)}

    def save(self, model: Any, directory: Path, ctx: MethodContext) -> None:
        model.save_pretrained(str(directory))

    def load(self, base_model: nn.Module, directory: Path) -> nn.Module:
        return PeftModel.from_pretrained(base_model, str(directory)).eval()


ADAPTER = Vera()
