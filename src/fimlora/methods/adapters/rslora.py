"""rsLoRA (Kalajdzievski, 2023): scaling α/√r instead of α/r (PEFT use_rslora)."""

from __future__ import annotations

from fimlora.methods.adapters.lora import PeftLora
from fimlora.methods.base import MethodContext


class RsLora(PeftLora):
    name = "rslora"
    description = "rsLoRA (Kalajdzievski, 2023): scaling α/√r instead of α/r (PEFT use_rslora)."
    scalings = frozenset({"alpha_over_r", "alpha_over_sqrt_r"})

    def scaling(self, ctx: MethodContext) -> str:
        return "alpha_over_sqrt_r"


ADAPTER = RsLora()
