"""DoRA (Liu et al., 2024): magnitude vector m and direction W + s·BA, normalised per column."""

from __future__ import annotations

import torch

from fimlora.methods.adapters.lora import PeftLora
from fimlora.methods.base import CostModel, MethodContext


class Dora(PeftLora):
    name = "dora"
    description = "DoRA (Liu et al., 2024): magnitude vector m and direction W + s·BA, normalised per column."
    optimizers = frozenset({"adamw", "loraplus", "riemannian"})
    lora_options = {"use_dora": True}  # noqa: RUF012
    refuses_rank_zero = (
        "pays each module's magnitude vector out of the budget before any rank is allocated, so a module "
        "left without an adapter would still be charged for one"
    )

    def quantized_base_refusal(self, quantization: str) -> str | None:
        if quantization == "int8" and not torch.cuda.is_available():
            # PEFT 0.21 dequantises the weight for the column norm every forward and, on CPU, re-wraps it
            # with Int8Params.to(cpu), which drops the row scales bitsandbytes 0.50 reads at the next one.
            return (
                "fails on an int8 base on CPU: PEFT 0.21 re-wraps the int8 weight while dequantising it for "
                "the column norm, and bitsandbytes then finds no row scales (nf4 works)"
            )
        return None

    def cost(self, shape: tuple[int, int], ctx: MethodContext) -> CostModel:
        # The magnitude vector (one entry per output feature) is trained too and counts against the budget.
        return CostModel(per_rank=shape[0] + shape[1], fixed=shape[0])


ADAPTER = Dora()
