"""Experiment configuration: one YAML file, validated with pydantic (unknown keys are errors).

Units: ``budget.params`` counts trainable LoRA parameters, Σ r_i·(d_in + d_out); ``budget.uniform_rank``
is shorthand for what uniform LoRA of that rank costs on the same target modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fimlora.errors import FimloraError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSettings(_Strict):
    text_column: str | None = None
    label_column: str | None = None
    hub_config: str | None = Field(None, description="Configuration name of a Hugging Face dataset.")


class FisherSettings(_Strict):
    estimator: Literal["empirical", "mc"] = "empirical"
    num_examples: int = Field(256, ge=1, description="Calibration examples, drawn from the training split.")
    batch_size: int = Field(16, ge=1)
    aggregation: Literal["mean", "trace"] = "mean"


class AllocationSettings(_Strict):
    tau: float = Field(1.0, gt=0, description="Ranks ∝ score^tau for proportional allocation.")
    r_min: int = Field(1, ge=1)
    r_max: int | None = Field(None, ge=1)


class BudgetSettings(_Strict):
    """Exactly one of ``uniform_rank`` (default 8) or ``params``."""

    uniform_rank: int | None = Field(None, ge=1)
    params: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_of(self) -> BudgetSettings:
        if self.uniform_rank is not None and self.params is not None:
            raise ValueError("give either budget.uniform_rank or budget.params, not both")
        return self

    @property
    def reference_rank(self) -> int:
        return self.uniform_rank if self.uniform_rank is not None else 8


class LoraSettings(_Strict):
    alpha: float | None = Field(None, gt=0, description="Default: 2 × the budget's reference rank.")
    dropout: float = Field(0.0, ge=0, lt=1)
    scaling: Literal["alpha_over_r", "constant"] = "alpha_over_r"


class TrainSettings(_Strict):
    steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    lr_scheduler: str = "linear"
    max_length: int = Field(64, ge=2, description="Tokens per example (causal LM: block length).")
    eval_split: Literal["validation", "test"] = "test"
    eval_examples: int | None = Field(None, ge=1, description="Cap on evaluated examples; None = all.")
    eval_batch_size: int = Field(64, ge=1)


class ExperimentConfig(_Strict):
    """One experiment: a model, a dataset, a budget and the methods compared at that budget."""

    model: str = Field(description="Built-in name (minilm, smollm2), local directory or hub id.")
    dataset: str = Field(description="Built-in name, local .csv/.json/.jsonl file or hub dataset id.")
    task: Literal["classification", "causal-lm"] | None = None
    dataset_options: DatasetSettings = DatasetSettings()
    methods: list[str] = Field(default_factory=lambda: ["lora", "fim-lora", "random-rank"], min_length=1)
    target_modules: list[str] | str | None = None
    seed: int = 0
    output_dir: str = "runs/experiment"
    trust_remote_code: bool = False
    budget: BudgetSettings = BudgetSettings()
    fisher: FisherSettings = FisherSettings()
    allocation: AllocationSettings = AllocationSettings()
    lora: LoraSettings = LoraSettings()
    train: TrainSettings = TrainSettings()

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        from fimlora.methods import METHODS

        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; available: {sorted(METHODS)}")
        if len(set(methods)) != len(methods):
            raise ValueError("methods must not repeat")
        return methods

    @property
    def lora_alpha(self) -> float:
        return self.lora.alpha if self.lora.alpha is not None else 2.0 * self.budget.reference_rank

    def for_method(self, method: str) -> ExperimentConfig:
        """The resolved config of one run: this experiment restricted to ``method``."""
        return self.model_copy(update={"methods": [method]})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def parse_config(data: Any, *, source: str = "config") -> ExperimentConfig:
    if not isinstance(data, dict):
        raise FimloraError(f"{source} must be a YAML mapping of settings, got {type(data).__name__}.")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise FimloraError(f"Invalid {source}: {_format_validation_error(exc)}.") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate a YAML experiment config; ``overrides`` replace top-level keys."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FimloraError(f"Cannot read config {path}: {exc.strerror}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise FimloraError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}.") from None
    if data is None:
        raise FimloraError(f"{path} is empty.")
    if overrides and isinstance(data, dict):
        data = {**data, **overrides}
    return parse_config(data, source=str(path))
