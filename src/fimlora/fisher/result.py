"""The Fisher diagonal of each adapted weight matrix, its per-module scores, and its on-disk form.

On disk a Fisher is two files: ``fisher.safetensors`` (one float32 tensor per module, keyed by the
module's name in ``model.named_modules()``) and ``fisher.json`` (N, estimator, metadata, shapes and the
per-module scores). Nothing is pickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fimlora.errors import FimloraError
from fimlora.io import atomic_write, atomic_write_json

TENSORS_FILE = "fisher.safetensors"
META_FILE = "fisher.json"

# Reduce a module's diagonal to one importance number. "trace" grows with the module's size, "mean" does
# not: with rank cost r·(d_in+d_out), "mean" asks "how important is each weight here".
AGGREGATIONS: dict[str, Callable[[torch.Tensor], float]] = {
    "trace": lambda diag: float(diag.double().sum()),
    "mean": lambda diag: float(diag.double().mean()),
}


@dataclass
class FisherResult:
    """``diagonal[name]`` = (1/N) Σ_n (∂ℓ_n/∂W)², a float32 tensor shaped like module ``name``'s weight."""

    diagonal: dict[str, torch.Tensor]
    num_examples: int
    estimator: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """``(d_out, d_in)`` of each module, as the allocator expects."""
        return {name: (int(d.shape[0]), int(d.shape[1])) for name, d in self.diagonal.items()}

    def scores(self, aggregation: str = "mean") -> dict[str, float]:
        """One importance score per module (see ``AGGREGATIONS``)."""
        try:
            reduce = AGGREGATIONS[aggregation]
        except KeyError:
            raise FimloraError(
                f"Unknown Fisher aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}."
            ) from None
        return {name: reduce(diag) for name, diag in self.diagonal.items()}

    def check_finite(self) -> None:
        bad = [name for name, d in self.diagonal.items() if not bool(torch.isfinite(d).all())]
        if bad:
            raise FimloraError(
                f"The Fisher is not finite in {len(bad)} module(s) (first: {bad[0]}); the model produces "
                "NaN/inf gradients on the calibration data."
            )

    def save(self, directory: str | Path) -> Path:
        """Write ``fisher.safetensors`` and ``fisher.json`` into ``directory`` (each atomically)."""
        directory = Path(directory)
        tensors = {
            name: d.detach().to("cpu", torch.float32).contiguous() for name, d in self.diagonal.items()
        }
        atomic_write(directory / TENSORS_FILE, lambda tmp: save_file(tensors, str(tmp)))
        meta = {
            "num_examples": self.num_examples,
            "estimator": self.estimator,
            "metadata": self.metadata,
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "scores": {agg: self.scores(agg) for agg in AGGREGATIONS},
        }
        atomic_write_json(directory / META_FILE, meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> FisherResult:
        directory = Path(directory)
        tensors_path, meta_path = directory / TENSORS_FILE, directory / META_FILE
        if not tensors_path.is_file() or not meta_path.is_file():
            raise FimloraError(f"No Fisher found in {directory} (expected {TENSORS_FILE} and {META_FILE}).")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            diagonal = load_file(str(tensors_path))
        except (OSError, ValueError) as exc:
            raise FimloraError(f"The Fisher in {directory} is unreadable: {exc}.") from exc
        if set(diagonal) != set(meta.get("shapes", {})):
            raise FimloraError(f"{TENSORS_FILE} and {META_FILE} in {directory} describe different modules.")
        return cls(
            diagonal=diagonal,
            num_examples=int(meta["num_examples"]),
            estimator=str(meta["estimator"]),
            metadata=dict(meta.get("metadata", {})),
        )


def summarize_scores(scores: dict[str, float]) -> dict[str, float]:
    """Spread of the scores: how uneven the importance is (max/min ratio is what proportional rank sees)."""
    values = sorted(scores.values())
    positive = [v for v in values if v > 0]
    return {
        "min": values[0],
        "max": values[-1],
        "max_over_min": values[-1] / positive[0] if positive else math.nan,
    }
