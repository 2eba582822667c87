"""Standalone loader of a HydraLoRA export written by ``fimlora export``: torch, transformers and
safetensors only, neither fimlora nor PEFT.

HydraLoRA (Tian et al. 2024, arXiv 2404.19245) cannot be merged into the base weights: every adapted
linear layer computes ``W x + b + s · Σ_i g_i(x) · B_i A x`` with router weights ``g(x) = softmax(W_r x)``
that depend on each token, so the update is not one fixed matrix. An export therefore holds the base
model and the adapter side by side, and this file (copied into the export) puts them together::

    import sys; sys.path.insert(0, "path/to/export")
    import hydralora_loader
    model, tokenizer = hydralora_loader.load("path/to/export")

Layout of an export: ``base/`` (the base model and tokenizer, ``save_pretrained``), ``adapter/``
(``hydralora_config.json``: ranks per module, number of heads k, α, scaling convention,
``modules_to_save``; ``hydralora.safetensors``: ``<module>.lora_A`` (r, d_in), ``<module>.lora_B``
(k, d_out, r), ``<module>.router.weight`` (k, d_in) and the trained task head), ``fimlora_export.json``
(the task), and this file. The forward below is fimlora's ``HydraLoraLinear`` in eval mode (no
dropout), operation for operation, so the outputs equal the run's.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

EXPORT_FILE = "fimlora_export.json"
CONFIG_NAME = "hydralora_config.json"
WEIGHTS_NAME = "hydralora.safetensors"


class HydraLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``s · Σ_i softmax(W_r x)_i · B_i A x`` (inference only)."""

    def __init__(self, base_layer: nn.Linear, *, rank: int, num_heads: int, scaling: float) -> None:
        super().__init__()
        weight = base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        d_out, d_in = weight.shape
        self.base_layer = base_layer
        self.rank, self.num_heads, self.scaling = rank, num_heads, float(scaling)
        self.lora_A = nn.Parameter(torch.zeros(rank, d_in, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(num_heads, d_out, rank, dtype=dtype, device=weight.device))
        self.router = nn.Linear(d_in, num_heads, bias=False, device=weight.device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        dtype = self.lora_A.dtype
        x = x.to(dtype)
        gates = torch.softmax(self.router(x), dim=-1, dtype=torch.float32)
        h = F.linear(x, self.lora_A)
        mixed = (gates.to(dtype).unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)
        heads = self.lora_B.permute(1, 0, 2).reshape(self.base_layer.out_features, self.num_heads * self.rank)
        return result + (F.linear(mixed, heads) * self.scaling).to(result.dtype)


def _reference_rank(ranks: dict[str, int]) -> int:
    """The most common rank, ties to the smaller (the ``constant`` scaling convention's r)."""
    counts = Counter(ranks.values())
    return max(counts, key=lambda r: (counts[r], -r))


@torch.no_grad()
def apply(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Replace the adapted ``nn.Linear`` layers of ``model`` in place and load the trained weights."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config: dict[str, Any] = json.loads((adapter_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    if config.get("method") != "hydralora":
        raise ValueError(f"{adapter_dir / CONFIG_NAME} is not a HydraLoRA config.")
    tensors = load_file(str(adapter_dir / WEIGHTS_NAME))
    ranks = {str(name): int(rank) for name, rank in config["ranks"].items()}
    r_ref = _reference_rank(ranks)
    for name, rank in ranks.items():
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"HydraLoRA target {name!r} is not an nn.Linear in this model.")
        scaling = config["alpha"] / (rank if config["scaling"] == "alpha_over_r" else r_ref)
        layer = HydraLoraLinear(base, rank=rank, num_heads=int(config["num_heads"]), scaling=scaling)
        layer.lora_A.copy_(tensors[f"{name}.lora_A"])
        layer.lora_B.copy_(tensors[f"{name}.lora_B"])
        layer.router.weight.copy_(tensors[f"{name}.router.weight"])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    for name in config.get("modules_to_save") or []:
        module = model.get_submodule(name)
        prefix = f"{name}."
        state = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        module.load_state_dict(state, strict=True)
    return model


def load(export_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """The trained HydraLoRA model (eval mode) and its tokenizer from an export directory."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    export_dir = Path(export_dir)
    info = json.loads((export_dir / EXPORT_FILE).read_text(encoding="utf-8"))
    auto = AutoModelForSequenceClassification if info["task"] == "classification" else AutoModelForCausalLM
    model = auto.from_pretrained(str(export_dir / "base"), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir / "base"))
    return apply(model, export_dir / "adapter").eval(), tokenizer
