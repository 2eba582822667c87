from fimlora.methods.base import Method

LORA = Method(
    name="lora",
    description="Uniform LoRA: the same rank on every target module (Hu et al., 2021).",
    strategy="uniform",
    needs_fisher=False,
)
