"""The cells of a tuning: one Optuna study per model × dataset × method × budget of the grid.

Every trial of a cell runs the cell's base config (the grid point at the tuning seed, scored on the
validation split) with the trial's values written into it. A study's name is a readable prefix plus a
hash of everything its trials depend on (the base config, the search space, the metric, the sampler and
pruner settings), so a changed setting starts a new study instead of mixing trials, while more trials
(``--trials``) extend the same one.

Trial directories live in ``<store>/.tuning/<study>/`` (hidden, so that ``fimlora results``/``report``
never take a trial for a final run): ``fisher/`` (shared by the cell's trials) and ``trial-0003/<method>/``;
with several seeds per trial (``tune.seeds``) ``seed-1/fisher/`` and ``trial-0003/seed-1/<method>/``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fimlora.config import ExperimentConfig, key_view, parse_config
from fimlora.data import dataset_label
from fimlora.data.registry import registered_task
from fimlora.errors import FimloraError
from fimlora.sweep.expand import PlannedRun, _slug, budget_label, deep_merge, expand
from fimlora.sweep.spec import SweepSpec
from fimlora.tune.spec import Param, TuneSettings

TUNING_DIR = ".tuning"
HASH_CHARS = 10
#: Splits a trial may load: the test split is sealed while tuning.
TUNING_SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Cell:
    """One study: its grid coordinates, the base config of its trials and its search space."""

    method: str
    budget: dict[str, Any]
    config: ExperimentConfig  # output_dir: the cell's directory
    space: tuple[Param, ...]
    metric: str
    study_name: str
    seeds: tuple[int, ...]  # every trial trains at each of them (config.seed is the first)
    aggregate: str  # a trial's score over its seeds: mean or worst

    @property
    def directory(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def dataset(self) -> str:
        return self.config.dataset_label

    def describe(self) -> str:
        """``fim-lora r4 (minilm, movie-reviews)``."""
        return f"{self.method} {budget_label(self.budget)} ({self.config.model}, {self.dataset})"

    def record(self) -> dict[str, Any]:
        """The cell's coordinates as tuned.yaml lists them."""
        return {
            "model": self.config.model,
            "dataset": self.config.dataset,
            "method": self.method,
            "budget": {k: v for k, v in self.budget.items() if v is not None},
        }

    def seed_directory(self, seed: int) -> Path:
        """Where the trials at ``seed`` share their Fisher (the cell's directory for a single seed)."""
        return self.directory if len(self.seeds) == 1 else self.directory / f"seed-{seed}"

    def trial_config(self, params: dict[str, Any], number: int, seed: int | None = None) -> ExperimentConfig:
        """The config of trial ``number`` at ``seed`` (default: the first) with ``params`` (dotted keys)
        written into the base config."""
        seed = self.seeds[0] if seed is None else seed
        data = with_values(self.config.model_dump(mode="json"), params)
        data["seed"] = seed
        trial = self.directory / f"trial-{number:04d}"
        data["output_dir"] = str(trial if len(self.seeds) == 1 else trial / f"seed-{seed}")
        return parse_config(data, source=f"trial {number} of {self.describe()}")


def with_values(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each dotted key of ``values`` (``allocation.tau``) set (``data`` is not modified)."""
    out = json.loads(json.dumps(data))
    for key, value in values.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[leaf] = value
    return out


def tuning_seed(spec: SweepSpec, settings: TuneSettings) -> int:
    """The experiment seed of every trial: tune.seed, else the grid's first seed, else the default."""
    if settings.seed is not None:
        return settings.seed
    if spec.grid.seed:
        return spec.grid.seed[0]
    return int(spec.defaults.get("seed", 0))


def tuning_seeds(spec: SweepSpec, settings: TuneSettings) -> list[int]:
    """The seeds every trial trains at: ``tune.seeds`` consecutive seeds from :func:`tuning_seed`."""
    first = tuning_seed(spec, settings)
    return [first + k for k in range(settings.seeds)]


def _metric(settings: TuneSettings, config: ExperimentConfig) -> str:
    if settings.metric is not None:
        return settings.metric
    task = config.task
    if task is None and isinstance(config.dataset, str):
        task = registered_task(config.dataset)
    if task is None and config.dataset_options.label_column is not None:
        task = "classification"
    if task is None:
        raise FimloraError(
            f"Cannot tell whether {dataset_label(config.dataset)!r} is classification or causal LM before "
            "loading it; set tune.metric (accuracy, macro_f1, loss, perplexity) or the config's task."
        )
    return "accuracy" if task == "classification" else "perplexity"


def _study_name(method: str, budget: dict[str, Any], fingerprint: dict[str, Any]) -> str:
    canonical = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:HASH_CHARS]
    return f"{_slug(method)}-{budget_label(budget)}-{digest}"


def _check_shared_space(run: PlannedRun, settings: TuneSettings) -> None:
    """A control must accept every value its reference's study may choose (``tune.share``)."""
    reference = settings.share[run.method]
    data = run.config.model_dump(mode="json")
    for param in settings.space(reference):
        for value in param.extremes():
            try:
                parse_config(with_values(data, {param.key: value}), source=f"{run.method}")
            except FimloraError as exc:
                raise FimloraError(
                    f"Invalid tune section: tune.share.{run.method} gives it {reference}'s {param.key}, but "
                    f"{value!r} does not make a valid run of it: {exc}"
                ) from None


def plan_cells(spec: SweepSpec, settings: TuneSettings) -> list[Cell]:
    """Every cell of the grid that gets a study (not the methods of ``tune.share``), validated: each
    trial config at the bounds (and every choice) of its search space must be a valid experiment, or a
    FimloraError names the cell and the dimension."""
    seed = tuning_seed(spec, settings)
    defaults = {k: v for k, v in spec.defaults.items() if k != "seed"}
    grid = spec.grid.model_copy(update={"seed": [seed]})
    runs = expand(spec.model_copy(update={"grid": grid, "defaults": defaults}))
    store = spec.output_path / TUNING_DIR
    cells = []
    for run in runs:
        if run.method in settings.share:
            _check_shared_space(run, settings)
            continue
        base = run.config
        steps = base.train.steps
        train = {
            "eval_split": "validation",
            "eval_every": settings.eval_every or max(1, steps // 4),
            "eval_examples": settings.eval_examples or base.train.eval_examples,
        }
        data = deep_merge(base.model_dump(mode="json"), {"train": train})
        config = parse_config(data, source=f"tuning of {run.method}")
        space = tuple(settings.space(run.method))
        metric = _metric(settings, config)
        fingerprint = {
            "config": key_view(config),
            # The data by content (the test file, sealed while tuning, is not read): an edited file
            # starts new studies instead of mixing trials on two versions of the data.
            "data": config.data_identity(splits=TUNING_SPLITS).fingerprint(),
            "space": [p.describe() for p in space],
            "metric": metric,
            "protocol": settings.protocol(),
        }
        name = _study_name(run.method, run.axes["budget"], fingerprint)
        config = config.model_copy(update={"output_dir": str(store / name)})
        seeds = tuple(tuning_seeds(spec, settings))
        cell = Cell(run.method, run.axes["budget"], config, space, metric, name, seeds, settings.aggregate)
        for param in space:
            for value in param.extremes():
                try:
                    cell.trial_config({param.key: value}, 0)
                except FimloraError as exc:
                    raise FimloraError(
                        f"Invalid tune section: {param.key} = {value!r} does not make a valid run of "
                        f"{cell.describe()}: {exc}"
                    ) from None
        cells.append(cell)
    return cells
