"""PiSSA (Meng et al., 2024): A, B from the top singular vectors of W; W keeps the residual."""

from __future__ import annotations

from fimlora.methods.adapters.lora import PeftLora


class Pissa(PeftLora):
    name = "pissa"
    description = "PiSSA (Meng et al., 2024): A, B from the top singular vectors of W; W keeps the residual."
    lora_options = {"init_lora_weights": "pissa"}  # noqa: RUF012
    rewrites_base = True
    refuses_quantized_base = (
        "initialises A, B from the SVD of W and replaces W by the residual W − BA, which bitsandbytes "
        "would re-quantise: the adapter would not reproduce the trained model on a freshly quantised base"
    )


ADAPTER = Pissa()
