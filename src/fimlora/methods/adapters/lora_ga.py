"""LoRA-GA (Wang et al., 2024, arXiv 2407.05000): A, B from the SVD of the calibration gradient of W.

Ḡ is the gradient of the mean training loss over the calibration subset (:mod:`fimlora.methods.gradients`:
eval mode, every example weighted once however the subset is batched). With Ḡ = U S Vᵀ and r the
module's rank, both variants take A from the top right-singular vectors and B from the *next* r left
ones (PEFT's and the paper's ``ArB2r``), subtract the initial product from W (W ← W − s·B·A, so the
adapted model starts at the base model's function) and differ in scale (``method_options.lora_ga``):

* ``official`` (default), as the authors' code (Outsider565/LoRA-GA, ``scale="stable"``):
  A = V[:, :r]ᵀ · d_out^¼/√γ and B = U[:, r:2r] · d_out^¼/√γ, orthonormal factors with the same scale,
  no singular values.
* ``peft``, PEFT 0.21's ``lora_ga_init``: A = V[:, :r]ᵀ, B = U[:, r:2r] · diag(S[r:2r]) · d_out^¼/√γ.

Both need 2r ≤ min(d_in, d_out) (A and B take disjoint singular vectors). The SVD is exact
(``torch.linalg.svd`` in float64), where both reference codes use a randomised ``svd_lowrank``.
Adapters are saved with PEFT's conversion to a plain LoRA on the original base (see ``lora.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fimlora.allocation import Allocation
from fimlora.errors import FimloraError
from fimlora.methods.adapters.lora import PeftLora, lora_layers
from fimlora.methods.base import MethodContext
from fimlora.methods.gradients import calibration_gradients

_DIRECTION = "ArB2r"


def official_factors(gradient: torch.Tensor, rank: int, *, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The official LoRA-GA init ``(A, B)``, shapes ``(rank, d_in)``, ``(d_out, rank)``, float64.

    ``gradient`` is Ḡ, shape ``(d_out, d_in)``: A = V[:, :r]ᵀ·d_out^¼/√γ, B = U[:, r:2r]·d_out^¼/√γ.
    """
    d_out, _ = gradient.shape
    u, _, vh = torch.linalg.svd(gradient.detach().to(torch.float64), full_matrices=False)
    scale = d_out**0.25 / gamma**0.5
    return vh[:rank] * scale, u[:, rank : 2 * rank] * scale


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

        too_wide = sorted(n for n, r in allocation.ranks.items() if 2 * r > min(allocation.shapes[n]))
        if too_wide:
            name = too_wide[0]
            raise FimloraError(
                f"LoRA-GA takes 2r = {2 * allocation.ranks[name]} singular vectors of the gradient of "
                f"{name!r} ({allocation.shapes[name][0]}×{allocation.shapes[name][1]}), more than it has; "
                "lower the rank (budget, allocation.r_max) or leave the module out."
            )
        kwargs = super().lora_kwargs(allocation, ctx)
        gamma = ctx.options.lora_ga.stable_gamma
        # Recorded in the adapter config; the official variant sets the weights itself (initialise).
        config = LoraGAConfig(direction=_DIRECTION, scale="stable", stable_gamma=gamma)  # type: ignore[arg-type]
        kwargs.update(init_lora_weights="lora_ga", lora_ga_config=config)
        return kwargs

    def before_wrap(self, model: nn.Module, peft_config: Any, ctx: MethodContext) -> None:
        opts = ctx.options.lora_ga
        ctx.record["lora_ga"] = {
            "variant": opts.variant,
            "direction": _DIRECTION,
            "stable_gamma": opts.stable_gamma,
            "gradient": "mean training loss over the calibration subset, eval mode",
            "calibration_examples": ctx.config.fisher.num_examples,
        }
        if opts.variant == "peft":
            # PEFT's lora_ga_init reads the gradient from the base layer while it wraps the model.
            modules = dict(model.named_modules())
            for name, gradient in calibration_gradients(ctx).items():
                modules[name]._peft_loraga_grad = gradient

    @torch.no_grad()
    def initialise(self, peft_model: Any, ctx: MethodContext) -> None:
        if ctx.options.lora_ga.variant == "peft":  # PEFT initialised the layers while wrapping
            return
        gradients = calibration_gradients(ctx)
        gamma = ctx.options.lora_ga.stable_gamma
        for name, layer in lora_layers(peft_model).items():
            a, b = official_factors(gradients[name], layer.r["default"], gamma=gamma)
            base = layer.get_base_layer()
            dtype = base.weight.dtype
            a, b = a.to(dtype), b.to(dtype)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            # As the reference code: the offset is computed from the factors as stored, in float32.
            offset = layer.scaling["default"] * (b.float() @ a.float())
            base.weight.copy_((base.weight.float() - offset).to(dtype))

    def finalize(self, model: nn.Module, ctx: MethodContext) -> dict[str, Any]:
        return {"lora_ga": ctx.record.pop("lora_ga", None)}


ADAPTER = LoraGa()
