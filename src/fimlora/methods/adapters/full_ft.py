"""Full fine-tuning: every weight trains. The reference upper line, not a parameter-efficient method.

The learning rate is ``train.learning_rate × method_options.full_ft.lr_scale`` (default 0.1): LoRA's
optimal learning rate is about ten times full fine-tuning's (Schulman et al., "LoRA Without Regret",
2025), so sharing one rate would cripple one of the two.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from fimlora.allocation import Allocation
from fimlora.errors import FimloraError
from fimlora.methods.base import AdapterKind, AllocationRule, MethodContext

WEIGHTS_NAME = "model.safetensors"


class FullFineTuning(AdapterKind):
    name = "full"
    description = "Full fine-tuning: all weights trained (reference upper line)."
    rank_based = False
    budget_matched = False
    scalings = None  # no LoRA scaling: lora.scaling does not apply
    refuses_quantized_base = "trains W itself, and a quantised weight (4-bit or int8 codes) has no gradient"

    def build(
        self, model: nn.Module, allocation: Allocation | None, rule: AllocationRule, ctx: MethodContext
    ) -> nn.Module:
        model.requires_grad_(True)
        return model

    def trainable_counts(self, model: nn.Module, ctx: MethodContext) -> dict[str, int]:
        head_prefixes = tuple(f"{h}." for h in ctx.head_modules)
        counts = {"adapter_params": 0, "head_params": 0, "other_trainable_params": 0}
        for name, param in model.named_parameters():
            if param.requires_grad:
                key = "head_params" if name.startswith(head_prefixes) else "adapter_params"
                counts[key] += param.numel()
        return counts

    def save(self, model: nn.Module, directory: Path, ctx: MethodContext) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # Tied weights (e.g. an LM head tied to the embeddings) are stored once.
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        seen: dict[int, str] = {}
        unique = {}
        for key, tensor in state.items():
            if tensor.data_ptr() in seen:
                continue
            seen[tensor.data_ptr()] = key
            unique[key] = tensor
        save_file(unique, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    def load(self, base_model: nn.Module, directory: Path) -> nn.Module:
        path = directory / WEIGHTS_NAME
        if not path.is_file():
            raise FimloraError(f"{directory} has no {WEIGHTS_NAME}.")
        _missing, unexpected = base_model.load_state_dict(load_file(str(path)), strict=False)
        if unexpected:
            raise FimloraError(f"{path} has weights the model does not: {unexpected[:3]}.")
        return base_model.eval()


ADAPTER = FullFineTuning()
