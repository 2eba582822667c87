"""Paper methods as named points on the three axes (allocation, adapter, optimizer)."""

from __future__ import annotations

from fimlora.methods.base import MethodSpec

# fmt: off
_TABLE: list[tuple[str, str, str, str, str]] = [
    # name, allocation, adapter, optimizer, what it is
    ("lora", "uniform", "lora", "adamw", "Uniform LoRA (Hu et al., 2021)."),
    ("fim-lora", "fisher", "lora", "adamw", "Ours: ranks ∝ Fisher score^tau, same budget."),
    ("random-rank", "random", "lora", "adamw", "Control: fim-lora's ranks shuffled (same shape)."),
    ("gora-score", "gora-score", "lora", "adamw", "Control: GoRA's score, ranks ∝ mean |W ⊙ Ḡ|."),
    ("spectral-lora", "spectral", "lora", "adamw", "Ours: knapsack on σ_k² of the calibration gradient."),
    ("whitened-spectral-lora", "whitened-spectral", "lora", "adamw", "Ours: same, K-FAC-whitened gradient."),
    ("hindsight-lora", "hindsight", "lora", "adamw", "Upper bound: knapsack on σ_k² of a run's trained ΔW."),
    ("adalora", "adalora", "lora", "adamw", "AdaLoRA (Zhang et al., 2023), pruned each step."),
    ("fim-lora-dynamic", "fisher-online", "lora", "adamw", "Ours: fim-lora, re-solved while training."),
    ("eva", "eva", "lora", "adamw", "EVA (Paischer et al., 2024), activation-SVD init."),
    ("gora", "gora", "gora", "adamw", "GoRA (He et al., 2025): params ∝ |W ⊙ Ḡ|, B from Ḡ A⁺."),
    ("dora", "uniform", "dora", "adamw", "DoRA (Liu et al., 2024), magnitude + direction."),
    ("rslora", "uniform", "rslora", "adamw", "rsLoRA (Kalajdzievski, 2023), scaling α/√r."),
    ("pissa", "uniform", "pissa", "adamw", "PiSSA (Meng et al., 2024), principal SVD init."),
    ("olora", "uniform", "olora", "adamw", "OLoRA (Büyükakyüz, 2024), QR init."),
    ("lora-ga", "uniform", "lora-ga", "adamw", "LoRA-GA (Wang et al., 2024), gradient-SVD init."),
    ("vera", "uniform", "vera", "adamw", "VeRA (Kopiczko et al., 2024), shared projections."),
    ("loraplus", "uniform", "lora", "loraplus", "LoRA+ (Hayou et al., 2024), η_B = λ·η_A."),
    ("lora-fa", "uniform", "lora", "lora-fa", "LoRA-FA (Zhang et al., 2023), A frozen."),
    ("riemannian", "uniform", "lora", "riemannian", "Riemannian preconditioned LoRA (2024)."),
    ("delta-lora", "uniform", "delta-lora", "adamw", "Delta-LoRA (Zi et al., 2023), W follows Δ(BA)."),
    ("hydralora", "uniform", "hydralora", "adamw", "HydraLoRA (Tian et al., 2024), shared A, k B."),
    ("full-ft", "none", "full", "adamw", "Full fine-tuning (reference upper line)."),
]
# fmt: on

PRESETS: dict[str, MethodSpec] = {row[0]: MethodSpec(*row) for row in _TABLE}
