"""OLoRA (Büyükakyüz, 2024): A, B from a QR decomposition of W; W keeps the residual."""

from __future__ import annotations

from fimlora.methods.adapters.lora import PeftLora


class Olora(PeftLora):
    name = "olora"
    description = "OLoRA (Büyükakyüz, 2024): A, B from a QR decomposition of W; W keeps the residual."
    lora_options = {"init_lora_weights": "olora"}  # noqa: RUF012
    rewrites_base = True
    refuses_quantized_base = (
        "initialises A, B from a QR decomposition of W and replaces W by the residual W − BA, which "
        "bitsandbytes would re-quantise: the adapter would not reproduce the trained model on a freshly "
        "quantised base"
    )


ADAPTER = Olora()
