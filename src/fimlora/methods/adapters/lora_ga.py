"""LoRA-GA (Wang et al., 2024): A, B from the SVD of the calibration gradient of W."""

from __future__ import annotations

from typing import Any

from torch import nn

from fimlora.allocation import Allocation
from fimlora.methods.adapters.lora import PeftLora
from fimlora.methods.base import MethodContext


class LoraGa(PeftLora):
    name = "lora-ga"
    description = "LoRA-GA (Wang et al., 2024): A, B from the SVD of the calibration gradient of W."
    rewrites_base = True
    refuses_quantized_base = (
        "initialises A, B from the gradient of W, which a packed quantised weight does not have, and "
        "replaces W by W − BA"
    )

    def lora_kwargs(self, allocation: Allocation, ctx: MethodContext) -> dict[str, Any]:
        from peft import LoraGAConfig

        kwargs = super().lora_kwargs(allocation, ctx)
        kwargs.update(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
        return kwargs

    def before_wrap(self, model: nn.Module, peft_config: Any, ctx: MethodContext) -> None:
        from peft.tuners.lora.loraga import preprocess_loraga

        if ctx.calibration_batches is None:
            raise RuntimeError("LoRA-GA needs calibration batches")
        batches = list(ctx.calibration_batches())

        def train_step() -> None:
            # Gradient of the mean calibration loss, accumulated over the batches PEFT's hooks watch.
            for batch in batches:
                loss = model(**batch).loss / len(batches)
                loss.backward()

        was_training = model.training
        model.eval()
        preprocess_loraga(model, peft_config, train_step)
        model.train(was_training)


ADAPTER = LoraGa()
