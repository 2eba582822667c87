"""GoRA's initialisation (He et al., 2025, arXiv 2502.12171; official ``grad_compress_init``).

A is LoRA's random (Kaiming-uniform) init; B is the accumulated gradient compressed through A's
pseudo-inverse, so that the initial adapter is one gradient-descent step restricted to A's row space:

    B₀ = −(γ·√(d_in / r) / s) · Ḡ · A⁺,   so   s·B₀·A = −γ·√(d_in / r) · Ḡ · A⁺A,

Ḡ the gradient of the mean training loss on the calibration subset (:mod:`fimlora.methods.gradients`),
A⁺ = Aᵀ(AAᵀ)⁻¹, s the module's LoRA scaling and γ = ``method_options.gora.init_lr``. √(d_in / r) undoes
the shrinkage of a random rank-r projection (‖Ḡ A⁺A‖ ≈ √(r / d_in)·‖Ḡ‖). This is the official code's
setting of its published scripts (``--gora-init-method compress --gora-scale-by-lr --gora-lr 5e-2
--gora-rank-stablize --gora-dynamic-scaling``): scaling s = α/√r_i (rank-stabilised, each module's own
rank), B₀ = Ḡ·A⁺·γ·√d_in / α. One deliberate difference: the sign. The paper's initial adapter
approximates a gradient *descent* step; the official ``grad_compress_init`` uses +Ḡ (an ascent step), we
use −Ḡ.

W is not modified (the official code leaves ``reinit_weight`` off): the adapted model starts one
compressed gradient step away from the base model, and the adapter saves and reloads as a plain PEFT
LoRA (``PeftModel.from_pretrained`` restores the trained model exactly).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fimlora.methods.adapters.lora import PeftLora, lora_layers
from fimlora.methods.base import MethodContext
from fimlora.methods.gradients import calibration_gradients


def gora_b(gradient: torch.Tensor, a: torch.Tensor, *, scaling: float, lr: float) -> torch.Tensor:
    """GoRA's B₀ ``(d_out, r)``, float64, for Ḡ ``(d_out, d_in)``, A ``(r, d_in)`` and scaling ``s``."""
    rank, d_in = a.shape
    pinv = torch.linalg.pinv(a.detach().to(torch.float64))  # (d_in, r): Aᵀ(AAᵀ)⁻¹ for full-rank A
    return -(lr * math.sqrt(d_in / rank) / scaling) * (gradient.detach().to(torch.float64) @ pinv)


class Gora(PeftLora):
    name = "gora"
    description = "GoRA (He et al., 2025): B₀ = −γ√(d_in/r)/s · Ḡ A⁺ (A random), scaling α/√r, W unchanged."
    scalings = frozenset({"alpha_over_r", "alpha_over_sqrt_r"})

    def scaling(self, ctx: MethodContext) -> str:
        return "alpha_over_sqrt_r"

    @torch.no_grad()
    def initialise(self, peft_model: Any, ctx: MethodContext) -> None:
        lr = ctx.options.gora.init_lr
        gradients = calibration_gradients(ctx)
        for name, layer in lora_layers(peft_model).items():
            b = layer.lora_B["default"].weight
            a = layer.lora_A["default"].weight
            value = gora_b(gradients[name], a, scaling=layer.scaling["default"], lr=lr)
            b.copy_(value.to(dtype=b.dtype, device=b.device))
        ctx.record["gora_init"] = {
            "init_lr": lr,
            "scaling": "alpha / sqrt(r)",
            "a": "kaiming_uniform(a=sqrt(5)) (PEFT's LoRA init)",
            "b": "-(init_lr * sqrt(d_in / r) / scaling) * G @ pinv(A)",
            "base_weights": "unchanged",
            "gradient": "mean training loss over the calibration subset, eval mode",
        }

    def finalize(self, model: nn.Module, ctx: MethodContext) -> dict[str, Any]:
        return {"gora_init": ctx.record.pop("gora_init", None)}


ADAPTER = Gora()
