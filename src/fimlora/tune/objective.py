"""One trial: the cell's run with the trial's values, trained on train and scored on validation.

The trial is the same computation as ``fimlora run`` of its config (``eval_split: validation``): the same
``prepare`` → calibrate → :func:`~fimlora.experiment.run_method` path, with the test split sealed (never
loaded). Two things are shared between the trials of one process: the prepared data and base model
(reloading them per trial would only cost time: trials differ in hyperparameters, not in data) and, on
disk, the cell's Fisher (reused while its fingerprint matches).

Periodic validation (``train.eval_every``) reports to the study's median pruner; a pruned trial stops
there. A run that raises a FimloraError (a diverging loss, an invalid combination of values) or a
RuntimeError (numerical trouble, out of memory) is recorded as failed with its reason, and the study
goes on. Errors of the set-up (data, model, Fisher) are the same for every trial and stop the tuning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fimlora.config import ExperimentConfig, parse_config, read_yaml_file
from fimlora.errors import FimloraError
from fimlora.experiment import VALIDATION_FILE, Prepared, calibrate, prepare, run_method
from fimlora.methods import get_allocation, resolve_method
from fimlora.runs import CONFIG_FILE, RESULT_FILE, RunDirectory
from fimlora.tune.cells import TUNING_SPLITS, Cell
from fimlora.tune.preparation import preparation_key
from fimlora.tune.spec import METRIC_DIRECTIONS, aggregate_scores
from fimlora.tune.storage import (
    FAILURE_ATTR,
    PROBE_ATTR,
    SEED_SCORES_ATTR,
    SURPLUS_ATTR,
    WORKER_ATTR,
    taken,
    trial_kind,
    trial_step,
)

RUN_DIR_ATTR = "run_dir"


class SurplusTrial(Exception):
    """Raised for a trial started after the study's budget was taken (it trains nothing)."""


class SetupError(Exception):
    """The cell cannot run at all (data, model, calibration): every trial would fail the same way."""


class PreparedCache:
    """The prepared data and models of this process, reused by trials that would prepare the same
    (:func:`fimlora.tune.preparation.preparation_key`); up to ``capacity`` of them (one per tuning
    seed: each seed initialises its own task head), the least recently used dropped first."""

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = max(1, capacity)
        self._entries: OrderedDict[str, Prepared] = OrderedDict()

    def get(self, config: ExperimentConfig) -> Prepared:
        key = prepared_data_key(config)
        prepared = self._entries.pop(key, None)
        if prepared is None:
            while len(self._entries) >= self.capacity:  # free the oldest model first
                self._entries.popitem(last=False)
            # Quiet as the trial's training is: a worker's output is one line per trial.
            prepared = prepare(config, splits=TUNING_SPLITS, progress=False)
        self._entries[key] = prepared
        return prepared


def prepared_data_key(config: ExperimentConfig) -> str:
    """What a trial's prepared data and model depend on: every preparation input
    (:func:`fimlora.tune.preparation.preparation_key`) and the tuning splits' content."""
    data = config.data_identity(splits=TUNING_SPLITS).fingerprint()
    return json.dumps([preparation_key(config), data], sort_keys=True)


def format_params(params: dict[str, Any]) -> str:
    """``lr=0.00312 tau=1.2``: the last part of each key, floats to 3 significant digits."""
    parts = []
    for key, value in params.items():
        name = "lr" if key == "train.learning_rate" else key.rsplit(".", 1)[-1]
        parts.append(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(parts)


class Objective:
    """``objective(trial) -> validation score`` for one cell, with a budget of ``trials`` per study, of
    which the places from ``probes_from`` on are the probes' (:mod:`fimlora.tune.search`)."""

    def __init__(
        self,
        cell: Cell,
        trials: int,
        cache: PreparedCache,
        log: Callable[[str], None],
        *,
        probes_from: int | None = None,
    ) -> None:
        self.cell = cell
        self.trials = trials
        self.probes_from = trials if probes_from is None else probes_from
        self.cache = cache
        self.log = log
        self.number: int | None = None  # the trial this objective runs (or ran last)
        self.ended_elsewhere = False  # whether that trial was ended by someone else while it ran

    def __call__(self, trial: Any) -> float:
        import optuna

        study = trial.study
        self.number = trial.number
        self.ended_elsewhere = False
        # Trial numbers are handed out by the storage, in order: the first `trials` places go to the
        # lowest numbers, whichever worker holds them.
        place = taken(study.get_trials(deepcopy=False), before=trial.number)
        if place >= self.trials:
            trial.set_user_attr(SURPLUS_ATTR, True)
            study.stop()
            raise SurplusTrial(f"trial {trial.number}: the study's {self.trials} trials are taken")
        params = {param.key: param.suggest(trial) for param in self.cell.space}
        cell = self.cell
        what = f"{cell.describe()} trial {trial.number} [{format_params(params)}]"
        if place >= self.probes_from:
            trial.set_user_attr(PROBE_ATTR, place - self.probes_from)
            what += f" (probe {place - self.probes_from})"
        started = time.perf_counter()
        # A retry inherits the lost trial's attributes: start its record afresh.
        trial.set_user_attr(SEED_SCORES_ATTR, {})
        trial.set_user_attr(WORKER_ATTR, worker_name())
        scores: dict[int, float] = {}
        seed = cell.seeds[0]
        # The lost trials this one retries (set by the heartbeat's retry; empty for a fresh trial).
        lost = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("retry_history", [])
        try:
            for index, seed in enumerate(cell.seeds):
                config = cell.trial_config(params, trial.number, seed)
                kept = self._finished_by_lost_trial(lost, config, params)
                run_dir = Path(config.output_dir) / cell.method if kept is None else kept
                if index == 0:
                    trial.set_user_attr(RUN_DIR_ATTR, str(run_dir))
                if kept is None:
                    scores[seed] = self._run(trial, config, params, index)
                else:
                    scores[seed] = self._replay(trial, kept, index, config.train.steps)
                    self.log(f"{what}: seed {seed} finished before its worker was lost; kept ({kept})")
                trial.set_user_attr(SEED_SCORES_ATTR, {str(s): v for s, v in scores.items()})
        except optuna.TrialPruned as exc:
            self.log(f"{what}: pruned{self._at(seed)}, {exc} ({time.perf_counter() - started:.0f} s)")
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            # The trial was ended elsewhere while this run trained it: another worker took it for lost (no
            # heartbeat within the grace period) and re-enqueued it, whose retry counts; or another
            # worker finished it, whose record stands. This run does not count either way.
            self.ended_elsewhere = True
            ended = study._storage.get_trial(trial._trial_id)
            self.log(
                f"{what}: taken for lost by the heartbeat check while running; its retry counts"
                if trial_kind(ended) == "lost"
                else f"{what}: finished by another worker while this one ran it; that record stands"
            )
            raise
        except (FimloraError, RuntimeError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            trial.set_user_attr(FAILURE_ATTR, f"{type(exc).__name__}{self._at(seed)}: {reason}")
            self.log(f"{what}: failed{self._at(seed)}: {reason} ({time.perf_counter() - started:.0f} s)")
            raise
        higher = METRIC_DIRECTIONS[cell.metric]
        value = aggregate_scores(list(scores.values()), cell.aggregate, higher_is_better=higher)
        per_seed = (
            f" ({cell.aggregate} of seeds {', '.join(f'{s}: {v:.4f}' for s, v in scores.items())})"
            if len(scores) > 1
            else ""
        )
        self.log(f"{what}: {cell.metric} {value:.4f}{per_seed} ({time.perf_counter() - started:.0f} s)")
        return value

    def _finished_by_lost_trial(
        self, lost: list[int], config: ExperimentConfig, params: dict[str, Any]
    ) -> Path | None:
        """The run of ``config``'s seed that one of the ``lost`` trials (same values) finished before its
        worker died, or None. Its seeds train
        one after another, so a stop loses the seed in flight, not the ones done: those are kept rather
        than trained again. Kept only when its record says it is this run: finished, the same trial
        values and seed, and its config this one's but for the directory."""
        wanted = config.model_dump(mode="json", exclude={"output_dir"})
        for number in reversed(lost):
            prior = self.cell.trial_config(params, int(number), config.seed)
            run_dir = Path(prior.output_dir) / self.cell.method
            try:
                result = json.loads((run_dir / RESULT_FILE).read_text(encoding="utf-8"))
                recorded = parse_config(read_yaml_file(run_dir / CONFIG_FILE, "run config"))
            except (OSError, ValueError, FimloraError):
                continue
            record = result.get("tuning_trial") if isinstance(result, dict) else None
            if (
                result.get("status") == "finished"
                and isinstance(record, dict)
                and record.get("params") == params
                and record.get("seed") == config.seed
                and recorded.model_dump(mode="json", exclude={"output_dir"}) == wanted
            ):
                return run_dir
        return None

    def _replay(self, trial: Any, run_dir: Path, seed_index: int, steps: int) -> float:
        """Report a kept run's validation history to the pruner as its training did (a pruner that
        would stop it now stops it here), and return its final score."""
        import optuna

        metric = self.cell.metric
        for line in (run_dir / VALIDATION_FILE).read_text(encoding="utf-8").splitlines():
            point = json.loads(line)
            if "step" not in point or metric not in point or int(point["step"]) >= steps:
                continue  # (never written at the last step: the final score is the result)
            value = float(point[metric])
            trial.report(value, trial_step(seed_index, int(point["step"]), steps))
            if trial.should_prune():
                raise optuna.TrialPruned(f"step {point['step']}: validation {metric} {value:.4f}")
        return self._score(json.loads((run_dir / RESULT_FILE).read_text(encoding="utf-8")))

    def _score(self, result: dict[str, Any]) -> float:
        """The cell's metric from a finished run's ``result.json``."""
        value = result.get("metrics", {}).get(self.cell.metric)
        if not isinstance(value, int | float):
            raise FimloraError(
                f"The run records no validation {self.cell.metric}; choose another tune.metric."
            )
        return float(value)

    def _at(self, seed: int) -> str:
        return f" at seed {seed}" if len(self.cell.seeds) > 1 else ""

    def setup(self) -> None:
        """Prepare the cell (data, model, Fisher) before any trial: a cell that cannot run at all fails
        here with a FimloraError, not as a trial."""
        self._prepared(self.cell.config)

    def _prepared(self, config: ExperimentConfig) -> Prepared:
        """The trial's prepared experiment: cached data and model, the Fisher of the cell at its seed."""
        base = self.cache.get(config)
        prepared = dataclasses.replace(base, config=config)
        # The Fisher lives in the cell's directory (one per seed), shared by its trials.
        needs = get_allocation(resolve_method(config.methods[0]).allocation).needs
        calibration = dataclasses.replace(
            prepared,
            config=config.model_copy(update={"output_dir": str(self.cell.seed_directory(config.seed))}),
        )
        calibrate(calibration, set(needs), progress=False, log=_silent)
        prepared.fisher, prepared.fisher_dir, prepared.kfac = (
            calibration.fisher,
            calibration.fisher_dir,
            calibration.kfac,
        )
        return prepared

    def _run(self, trial: Any, config: ExperimentConfig, params: dict[str, Any], seed_index: int) -> float:
        import optuna

        cell, metric = self.cell, self.cell.metric
        try:
            prepared = self._prepared(config)
        except (FimloraError, RuntimeError, OSError) as exc:
            raise SetupError(f"{cell.describe()}: {exc}") from exc
        steps = config.train.steps

        def on_validation(step: int, metrics: dict[str, float]) -> None:
            value = float(metrics[metric])
            trial.report(value, trial_step(seed_index, step, steps))
            if trial.should_prune():
                raise optuna.TrialPruned(f"step {step}: validation {metric} {value:.4f}")

        outcome = run_method(
            prepared,
            cell.method,
            RunDirectory(Path(config.output_dir) / cell.method),
            progress=False,
            on_validation=on_validation,
            result_extras={
                "tuning_trial": {
                    "study": cell.study_name,
                    "number": trial.number,
                    "params": params,
                    "seed": config.seed,
                }
            },
        )
        return self._score(outcome.result)


def worker_name() -> str:
    """``host:pid`` of this process, recorded with each trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _silent(_: str) -> None:
    pass
