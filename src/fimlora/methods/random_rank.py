from fimlora.methods.base import Method

RANDOM_RANK = Method(
    name="random-rank",
    description=(
        "Control: fim-lora's rank histogram randomly permuted across modules of equal shape "
        "(same budget, same spread, no Fisher signal)."
    ),
    strategy="random",
    needs_fisher=True,
)
