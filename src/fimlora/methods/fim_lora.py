from fimlora.methods.base import Method

FIM_LORA = Method(
    name="fim-lora",
    description="Fisher-guided LoRA: ranks ∝ (per-module Fisher score)^tau within the parameter budget.",
    strategy="proportional",
    needs_fisher=True,
)
