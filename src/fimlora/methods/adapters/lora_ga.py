"""LoRA-GA (Wang et al., 2024): A, B from the SVD of the calibration gradient of W."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from fimlora.allocation import Allocation
from fimlora.methods.adapters.lora import PeftLora
from fimlora.methods.base import MethodContext


class LoraGa(PeftLora):
    name = "lora-ga"
    description = "LoRA-GA (Wang et al., 2024): A, B from the SVD of the calibration gradient of W."
    rewrites_base = True

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
        with warnings.catch_warnings():
            # PEFT's hooks watch the frozen weights' gradients; torch notes that no *input* needs one.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            preprocess_loraga(model, peft_config, train_step)
        model.train(was_training)


ADAPTER = LoraGa()
