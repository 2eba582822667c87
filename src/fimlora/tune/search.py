"""The sampler and the pruner every study gets.

**Sampler.** Optuna's TPE, with each trial's randomness derived from the sampler seed and the trial's
*place*: its position among the trials that count against the budget (:func:`fimlora.tune.storage.taken`
of the trials numbered before it). A sampler seeded once per process would draw trial 0's values again
after a restart; a per-place seed makes a resumed study draw what an uninterrupted one would (a killed
trial is retried with its own values at its own place, and lost trials hold no place), and it keeps
workers that share a study from proposing the same values (they hold different places).

**Start-up design.** TPE models the results only after ``sampler.startup_trials`` trials; before that it
draws each value independently at random, and a few random draws may fall side by side and leave most of
a range unexplored (three draws on [3e-4, 5e-2] put two within 15 % of each other in a real study).
``sampler.startup_design: latin-hypercube`` instead cuts each dimension's range into ``startup_trials``
equal parts (of its log scale for a log range) and gives each start-up place a point of its own part, in
an order and at a spot within the part drawn from the sampler seed and the dimension's key: a Latin
hypercube, one stratum per start-up trial and dimension. Every study with that seed starts from the same
points, as with random start-up; TPE takes over from the first place after them.

**Probes.** ``tune.probes`` are fixed points every study tries after its ``trials`` trials: the trial at
place ``trials + i`` takes probe ``i``'s values (the sampler draws any dimension it does not name). By
place rather than enqueued: an enqueued trial would run next, before the sampler's remaining trials, so a
study started after the probes were added would spend its trials differently from one that had already
run them. By place, every study runs its ``trials`` trials exactly as it would without probes, then the
probes, and a lost probe trial is retried at its own place with its own values.

**Pruner.** A trial's seeds train one after another, and it reports the validation score of its k-th
seed at step s as the *trial step* ``k · (train.steps + 1) + s`` (:func:`trial_step`). The pruner is
Optuna's median rule made seed by seed: at a trial step, the trial's best score so far on the current
seed against the median of the completed trials' scores at the same trial step, i.e. the same seed
(same head initialisation and data order) at the same training step. Like is compared with like, and a
setting that collapses on any one seed is stopped there. An aggregate over seeds at each step would
need every seed of a trial in training at once (one model per seed in memory); with one seed both
rules are Optuna's ``MedianPruner``. ``pruner.warmup_steps`` counts training steps within each seed.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler, TPESampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from fimlora.tune.spec import StartupDesign, TuneSettings
from fimlora.tune.storage import seed_and_step, taken


def place_seed(seed: int, place: int) -> int:
    """The sampler seed of the trial at ``place`` (independent streams for different places)."""
    return int(np.random.SeedSequence([seed, place]).generate_state(1)[0])


def stratified_point(seed: int, key: str, strata: int, place: int) -> float:
    """The point in [0, 1) of start-up ``place`` along dimension ``key``: a Latin hypercube of ``strata``
    points puts one in each of ``strata`` equal parts of [0, 1), in a seeded order, at a seeded spot."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(key.encode("utf-8"))]))
    points = (rng.permutation(strata) + rng.random(strata)) / strata
    return float(points[place])


def value_at(distribution: BaseDistribution, u: float) -> Any:
    """The value at quantile ``u`` of ``distribution`` as TPE's start-up would draw from it (uniform
    in the log for a log range; integers and choices in equal shares)."""
    if isinstance(distribution, CategoricalDistribution):
        choices = distribution.choices
        return choices[min(int(u * len(choices)), len(choices) - 1)]
    if not isinstance(distribution, FloatDistribution | IntDistribution):
        raise TypeError(f"no start-up design for {type(distribution).__name__}")
    low, high = float(distribution.low), float(distribution.high)
    if isinstance(distribution, IntDistribution):
        # Integers in equal shares: the range widened by one step, so the top value gets its share too.
        high += distribution.step if not distribution.log else 1
    value = math.exp(math.log(low) + u * math.log(high / low)) if distribution.log else low + u * (high - low)
    if isinstance(distribution, IntDistribution):
        steps = math.floor((value - distribution.low) / distribution.step)
        return int(min(distribution.low + steps * distribution.step, distribution.high))
    if distribution.step is not None:
        value = distribution.low + round((value - distribution.low) / distribution.step) * distribution.step
    return min(max(value, distribution.low), distribution.high)


class PlaceSeededSampler(BaseSampler):
    """TPE whose randomness for each trial is seeded by ``(seed, place)``, optionally after a Latin
    hypercube of start-up trials (see the module docstring)."""

    def __init__(
        self,
        seed: int,
        startup_trials: int,
        startup_design: StartupDesign = "random",
        *,
        probes: Sequence[Mapping[str, Any]] = (),
        probes_from: int = 0,
    ) -> None:
        self.seed = seed
        self.startup_trials = startup_trials
        self.startup_design = startup_design
        self.probes = [dict(probe) for probe in probes]
        self.probes_from = probes_from
        self._by_trial: dict[int, tuple[int, TPESampler]] = {}

    def _place_and_tpe(self, study: optuna.Study, trial: FrozenTrial) -> tuple[int, TPESampler]:
        held = self._by_trial.get(trial.number)
        if held is None:
            place = taken(study.get_trials(deepcopy=False), before=trial.number)
            tpe = TPESampler(seed=place_seed(self.seed, place), n_startup_trials=self.startup_trials)
            held = self._by_trial[trial.number] = (place, tpe)
        return held

    def _for(self, study: optuna.Study, trial: FrozenTrial) -> TPESampler:
        return self._place_and_tpe(study, trial)[1]

    def _probe(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        """The values the trial's place fixes (empty unless it is a probe's place)."""
        index = self._place_and_tpe(study, trial)[0] - self.probes_from
        return self.probes[index] if 0 <= index < len(self.probes) else {}

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._for(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        drawn = self._for(study, trial).sample_relative(study, trial, search_space)
        fixed = self._probe(study, trial)
        return {key: fixed.get(key, value) for key, value in drawn.items()}

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        place, tpe = self._place_and_tpe(study, trial)
        fixed = self._probe(study, trial)
        if param_name in fixed:
            return fixed[param_name]
        if self.startup_design == "latin-hypercube" and place < self.startup_trials:
            u = stratified_point(self.seed, param_name, self.startup_trials, place)
            return value_at(param_distribution, u)
        return tpe.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(study, trial).before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._for(study, trial).after_trial(study, trial, state, values)
        self._by_trial.pop(trial.number, None)


class SeedwiseMedianPruner(BasePruner):
    """Optuna's median rule, seed by seed (see the module docstring)."""

    def __init__(self, *, steps: int, startup_trials: int, warmup_steps: int) -> None:
        self.steps = steps
        self.startup_trials = startup_trials
        self.warmup_steps = warmup_steps

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        reported = trial.last_step
        if not completed or len(completed) < self.startup_trials or reported is None:
            return False
        seed_index, step = seed_and_step(reported, self.steps)
        if step < self.warmup_steps:
            return False
        maximize = study.direction == StudyDirection.MAXIMIZE
        own = [
            value
            for at, value in trial.intermediate_values.items()
            if seed_and_step(at, self.steps)[0] == seed_index and at <= reported and not math.isnan(value)
        ]
        if not own:
            return True  # only NaN on this seed so far: diverged
        best = max(own) if maximize else min(own)
        others = np.array(
            [t.intermediate_values[reported] for t in completed if reported in t.intermediate_values],
            dtype=float,
        )
        if others.size == 0 or np.isnan(others).all():
            return False
        median = float(np.nanmedian(others))
        return best < median if maximize else best > median


def sampler(settings: TuneSettings) -> PlaceSeededSampler:
    return PlaceSeededSampler(
        settings.sampler.seed,
        settings.sampler_startup,
        settings.sampler.startup_design,
        probes=settings.probes,
        probes_from=settings.trials,
    )


def pruner(settings: TuneSettings, steps: int) -> SeedwiseMedianPruner:
    return SeedwiseMedianPruner(
        steps=steps, startup_trials=settings.pruner.startup_trials, warmup_steps=settings.pruner.warmup_steps
    )
