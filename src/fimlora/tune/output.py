"""What a tuning leaves in the sweep's store: ``tuned.yaml`` (the best settings per cell) and
``tuning-trials.csv`` (every counted trial, for the report's sensitivity plots).

``tuned.yaml``::

    name: minilm-movie-reviews-tune      # the spec
    split: validation                    # what the scores are measured on; test was never loaded
    seed: 0                              # the first seed of the trials
    seeds: [0, 1]                        # every trial trained at each (tune.seeds)
    aggregate: worst                     # a trial's score over its seeds (mean or worst)
    trials_per_study: 8                  # tune.trials plus the probes
    probes: [{train.learning_rate: 0.0008}]   # only when tune.probes gives some: each study's last trials
    storage: sqlite:///runs/tuning.db    # without a password; a SQLite file relative to the spec
    cells:
    - model: minilm
      dataset: movie-reviews
      method: fim-lora
      budget: {uniform_rank: 4}
      params: {train.learning_rate: 0.0031, allocation.tau: 1.3}   # the best complete trial; null if none
      metric: accuracy
      validation_score: 0.81             # its aggregate over the seeds
      seed_scores: {0: 0.84, 1: 0.81}    # its score at each seed
      seed_spread: 0.03                  # max − min of those (null for one seed)
      trials: {complete: 6, pruned: 2, failed: 0, lost: 1}
      data: {source: builtin, name: movie-reviews, revision: vader-3.3.2}   # what the trials saw

``lost`` counts trials whose process died (a SIGKILL): each was retried with its own values, and the
retry is one of the counted ones.

``tuning-trials.csv``: one row per counted or lost trial: ``model, dataset, method, budget, study,
number, state`` (complete / pruned / failed / lost), ``metric``, ``value`` (the validation score, the
aggregate over seeds; for a pruned trial its last reported one, at ``step`` of ``seed``), ``failure``,
``duration_s``, ``worker`` (``host:pid``), one ``score.seed<S>`` column per seed and one
``param.<key>`` column per dimension; with probes, ``probe``: the probe a trial tried (empty for the
sampler's trials).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fimlora.config import format_validation_error, read_yaml_file
from fimlora.errors import FimloraError
from fimlora.io import atomic_write, atomic_write_text
from fimlora.sweep.expand import budget_label
from fimlora.tune.cells import TUNING_SPLITS, Cell
from fimlora.tune.storage import (
    COUNTED,
    FAILURE_ATTR,
    PROBE_ATTR,
    RETRY_OF_ATTR,
    SEED_SCORES_ATTR,
    WORKER_ATTR,
    kind_counts,
    retried_numbers,
    seed_and_step,
    trial_kind,
)

TUNED_FILE = "tuned.yaml"
TRIALS_FILE = "tuning-trials.csv"


class TrialCounts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    complete: int = Field(ge=0)
    pruned: int = Field(ge=0)
    failed: int = Field(ge=0)
    lost: int = Field(0, ge=0, description="Killed with their process and retried (not counted).")
    retried: int = Field(
        0, ge=0, description="Failed, then retried with the same parameters (--retry-failed; not counted)."
    )

    @property
    def total(self) -> int:
        """The trials that count against the budget."""
        return self.complete + self.pruned + self.failed


class TunedCell(BaseModel):
    """One entry of ``tuned.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    dataset: str | dict[str, str]
    method: str
    budget: dict[str, Any]
    params: dict[str, Any] | None
    metric: str
    validation_score: float | None
    seed_scores: dict[int, float] | None = None
    seed_spread: float | None = None
    trials: TrialCounts
    # The train and validation data the trials saw, by content (None: written before it was recorded).
    data: dict[str, Any] | None = None

    def key(self) -> str:
        return cell_key(self.model, self.dataset, self.method, self.budget)


class TunedFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    split: str
    seed: int
    seeds: list[int] | None = None  # None: written before tune.seeds existed, i.e. [seed]
    aggregate: Literal["mean", "worst"] = "mean"
    trials_per_study: int
    # tune.probes, the last len(probes) trials of every study (None: none, or written before they existed).
    probes: list[dict[str, Any]] | None = None
    storage: str
    cells: list[TunedCell]


def cell_key(model: str, dataset: Any, method: str, budget: dict[str, Any]) -> str:
    """A canonical string for a cell's coordinates (``None`` budget entries dropped)."""
    budget = {k: v for k, v in budget.items() if v is not None}
    return json.dumps([model, dataset, method, budget], sort_keys=True)


@dataclass
class TuningSummary:
    """A study's outcome: its cell, its best trial and its counts."""

    cell: Cell
    entry: TunedCell
    rows: list[dict[str, Any]]
    best_number: int | None = None  # the best complete trial's number (None: no trial completed)


def seed_scores(cell: Cell, trial: Any) -> dict[int, float]:
    """The validation score of each seed ``trial`` finished (one seed, recorded before per-seed scores
    were: its value)."""
    recorded = trial.user_attrs.get(SEED_SCORES_ATTR)
    if isinstance(recorded, dict) and recorded:
        return {int(seed): float(value) for seed, value in recorded.items()}
    if recorded is None and len(cell.seeds) == 1 and trial.value is not None:
        return {cell.seeds[0]: float(trial.value)}
    return {}


def summarize_study(cell: Cell, study: Any) -> TuningSummary:
    """Best complete trial, counts and the per-trial rows of ``cell``'s study."""
    trials = study.get_trials(deepcopy=False)
    counts = kind_counts(trials)
    retried = retried_numbers(trials)
    complete = [t for t in trials if trial_kind(t, retried) == "complete"]
    maximize = study.direction.name == "MAXIMIZE"
    best = None
    if complete:
        # Ties go to the earlier trial, as in Optuna's own best_trial.
        best = sorted(complete, key=lambda t: (-t.value if maximize else t.value, t.number))[0]
    chosen = seed_scores(cell, best) if best is not None else {}
    entry = TunedCell(
        **cell.record(),
        params=dict(best.params) if best is not None else None,
        metric=cell.metric,
        validation_score=float(best.value) if best is not None else None,
        seed_scores=chosen or None,
        seed_spread=max(chosen.values()) - min(chosen.values()) if len(chosen) > 1 else None,
        trials=TrialCounts(
            complete=counts["complete"],
            pruned=counts["pruned"],
            failed=counts["failed"],
            lost=counts["lost"],
            retried=counts["retried"],
        ),
        data=cell.config.data_identity(splits=TUNING_SPLITS).fingerprint(),
    )
    steps = cell.config.train.steps
    rows = []
    for trial in sorted(trials, key=lambda t: t.number):
        kind = trial_kind(trial, retried)
        if kind not in (*COUNTED, "lost", "retried"):
            continue
        reported = trial.last_step
        value, step, at_seed = None, None, None
        if kind == "complete":
            value = trial.value
        elif kind == "pruned" and reported is not None:  # its last reported validation score
            value = trial.intermediate_values.get(reported)
            index, step = seed_and_step(reported, steps)
            at_seed = cell.seeds[index] if index < len(cell.seeds) else None
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        row = {
            "model": cell.config.model,
            "dataset": cell.dataset,
            "method": cell.method,
            "budget": budget_label(cell.budget),
            "study": cell.study_name,
            "number": trial.number,
            "state": kind,
            "metric": cell.metric,
            "value": value,
            "step": step,
            "seed": at_seed,
            "failure": trial.user_attrs.get(FAILURE_ATTR),
            "retry_of": trial.user_attrs.get(RETRY_OF_ATTR),
            "duration_s": duration,
            "worker": trial.user_attrs.get(WORKER_ATTR),
        }
        if PROBE_ATTR in trial.user_attrs:  # a column only where a study has probes
            row["probe"] = trial.user_attrs[PROBE_ATTR]
        scores = seed_scores(cell, trial)
        row.update({f"score.seed{seed}": scores.get(seed) for seed in cell.seeds})
        row.update({f"param.{key}": value for key, value in trial.params.items()})
        rows.append(row)
    return TuningSummary(cell, entry, rows, None if best is None else best.number)


def write_outputs(
    store: Path,
    *,
    name: str,
    seeds: Sequence[int],
    aggregate: str,
    trials: int,
    storage: str,
    summaries: Sequence[TuningSummary],
    probes: Sequence[dict[str, Any]] = (),
) -> tuple[Path, Path]:
    """Write ``tuned.yaml`` and ``tuning-trials.csv`` into ``store``, atomically; ``storage`` as it is
    to be recorded (:func:`fimlora.tune.storage.recorded_storage`)."""
    document = TunedFile(
        name=name,
        split="validation",
        seed=seeds[0],
        seeds=list(seeds),
        aggregate=aggregate,  # type: ignore[arg-type]
        trials_per_study=trials,
        probes=[dict(probe) for probe in probes] or None,
        storage=storage,
        cells=[s.entry for s in summaries],
    )
    header = (
        "# Written by `fimlora tune`: per cell the best settings on the validation split (the test\n"
        "# split was never loaded). `fimlora sweep SPEC --tuned THIS_FILE` runs the final seeds on test.\n"
    )
    data = document.model_dump(mode="json")
    if data["probes"] is None:  # files of tunings without probes stay as they were
        del data["probes"]
    for cell in data["cells"]:  # JSON mode writes mapping keys as strings; seeds are integers
        if cell["seed_scores"] is not None:
            cell["seed_scores"] = {int(seed): score for seed, score in cell["seed_scores"].items()}
    body = yaml.safe_dump(data, sort_keys=False, width=110)
    tuned = atomic_write_text(store / TUNED_FILE, header + body)
    frame = pd.DataFrame([row for s in summaries for row in s.rows])
    trials_csv = atomic_write(store / TRIALS_FILE, lambda tmp: frame.to_csv(tmp, index=False))
    return tuned, trials_csv


def load_tuned(path: Path) -> TunedFile:
    """Read and validate a ``tuned.yaml``."""
    data = read_yaml_file(path, "tuned settings")
    if not isinstance(data, dict):
        raise FimloraError(f"{path} must be a YAML mapping written by fimlora tune.")
    try:
        return TunedFile.model_validate(data)
    except ValidationError as exc:
        raise FimloraError(f"Invalid tuned settings {path}: {format_validation_error(exc)}.") from None
