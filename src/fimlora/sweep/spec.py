"""Sweep specs: a grid of experiments as data, on top of default experiment settings.

A spec is one YAML file::

    name: minilm-movie-reviews
    output_dir: runs                  # relative to the spec file's directory; default "runs"
    defaults:                         # any ExperimentConfig keys except the grid axes and output_dir
      dataset_options: {text_column: review, label_column: sentiment}
      train: {steps: 60, batch_size: 16, max_length: 64}
      fisher: {num_examples: 256}
    grid:
      model: [minilm]
      dataset: [movie-reviews]
      method: [lora, fim-lora, random-rank]     # required; one method per run
      budget: [{uniform_rank: 2}, {uniform_rank: 4}]
      seed: [0, 1, 2, 3, 4]
      learning_rate: [2.0e-3]                   # → train.learning_rate

A ``tune:`` section (see :mod:`fimlora.tune.spec`) is read by ``fimlora tune`` only.

Every axis except ``method`` may be left out of the grid; its value then comes from ``defaults`` (or the
experiment default). An axis may not be set in both places. ``defaults`` may not set ``methods`` (the
``method`` axis does) nor ``output_dir`` (each run gets its own directory under the sweep's).
Model and dataset strings are used as written, exactly as in ``fimlora run`` (local paths are relative
to the working directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fimlora.config import format_validation_error, read_yaml_file
from fimlora.errors import FimloraError

#: Grid axes, in the order they appear in run names and records.
AXES = ("model", "dataset", "method", "budget", "seed", "learning_rate")


class SweepGrid(BaseModel):
    """The axes of a sweep; the runs are their Cartesian product. ``None`` = not an axis."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: list[str] | None = Field(
        None, min_length=1, description="Models (as the config's model key); absent: from defaults."
    )
    dataset: list[str | dict[str, str]] | None = Field(
        None, min_length=1, description="Dataset names, paths, or split → file mappings."
    )
    method: list[str | dict[str, Any]] = Field(min_length=1, description="Method names or mappings.")
    budget: list[dict[str, Any]] | None = Field(None, min_length=1, description="BudgetSettings mappings.")
    seed: list[int] | None = Field(
        None, min_length=1, description="Experiment seeds (the config's seed); absent: from defaults."
    )
    learning_rate: list[float] | None = Field(
        None, min_length=1, description="Values of train.learning_rate; absent: from defaults."
    )

    @field_validator("method")
    @classmethod
    def _named(cls, methods: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        for entry in methods:
            if isinstance(entry, dict) and not isinstance(entry.get("name"), str):
                raise ValueError(f"a method given as a mapping needs a string 'name' key, got {entry}")
        return methods

    def axes(self) -> dict[str, list[Any]]:
        """The axes that are set, in :data:`AXES` order."""
        return {axis: values for axis in AXES if (values := getattr(self, axis)) is not None}


class SweepSpec(BaseModel):
    """A whole sweep: name, where its runs land, default experiment settings and the grid."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        min_length=1,
        description="The sweep's name, in its progress lines, each run's sweep.json and tuned.yaml; run "
        "keys do not depend on it.",
    )
    output_dir: str = Field("runs", description="Relative paths are relative to the spec file's directory.")
    defaults: dict[str, Any] = Field(
        default_factory=dict,
        description="Experiment config keys every run starts from; not methods, output_dir, nor a key a "
        "grid axis sets.",
    )
    grid: SweepGrid = Field(
        description="The runs are the Cartesian product of its axes; method is required, the others optional."
    )
    tune: dict[str, Any] | None = Field(
        None, description="The hyperparameter search of `fimlora tune` (fimlora.tune.spec); sweeps ignore it."
    )
    base_dir: Path = Field(
        default_factory=Path.cwd,
        exclude=True,
        description="Not a key of the file (refused there): where the spec's relative paths are resolved "
        "from, its file's directory, set by load_spec.",
    )

    @property
    def output_path(self) -> Path:
        """The sweep's run store, absolute."""
        return (self.base_dir / self.output_dir).resolve()


def method_name(entry: str | dict[str, Any]) -> str:
    """The name of a method entry: the entry itself, or a mapping's ``name``."""
    return entry if isinstance(entry, str) else str(entry["name"])


def _check_defaults(spec: SweepSpec, source: str) -> None:
    defaults = spec.defaults
    clashes: list[str] = [key for key in ("methods", "output_dir") if key in defaults]
    axes = spec.grid.axes()
    clashes += [axis for axis in ("model", "dataset", "budget", "seed") if axis in axes and axis in defaults]
    train = defaults.get("train", {})
    if not isinstance(train, dict):
        raise FimloraError(f"Invalid sweep spec {source}: defaults.train must be a mapping of settings.")
    if "learning_rate" in axes and "learning_rate" in train:
        clashes.append("train.learning_rate")
    if clashes:
        raise FimloraError(
            f"Invalid sweep spec {source}: defaults must not set {', '.join(clashes)} "
            "(set by the grid or by the sweep itself)."
        )


def parse_spec(data: Any, *, base_dir: str | Path | None = None, source: str = "sweep spec") -> SweepSpec:
    """Validate a spec mapping (the grid points themselves are checked by :func:`expand`)."""
    if not isinstance(data, dict):
        raise FimloraError(f"{source} must be a YAML mapping, got {type(data).__name__}.")
    if "base_dir" in data:
        raise FimloraError(f"Invalid {source}: base_dir: unknown key.")
    try:
        spec = SweepSpec.model_validate(
            {**data, "base_dir": Path(base_dir) if base_dir is not None else Path.cwd()}
        )
    except ValidationError as exc:
        raise FimloraError(f"Invalid {source}: {format_validation_error(exc, root='spec')}.") from None
    _check_defaults(spec, source)
    return spec


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec file; relative paths in it are resolved from its directory."""
    path = Path(path)
    data = read_yaml_file(path, "sweep spec")
    return parse_spec(data, base_dir=path.resolve().parent, source=str(path))
