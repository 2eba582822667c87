"""The ``tune:`` section of a sweep spec: the search every cell of the grid gets, equally.

::

    tune:
      trials: 8                      # per cell (model × dataset × method × budget); --trials overrides
      seed: 0                        # experiment seed of every trial (default: the grid's first seed)
      seeds: 2                       # each trial trains at seed, seed + 1, …; --seeds overrides (default 1)
      aggregate: worst               # a trial's score over its seeds: mean (default) or worst
      metric: accuracy               # scored on validation; default accuracy (classification) or perplexity
      eval_every: 10                 # validation every N steps for the pruner (default: train.steps // 4)
      eval_examples: 256             # validation examples (default: train.eval_examples)
      learning_rate: {low: 1.0e-4, high: 3.0e-2}   # log-uniform; null: not searched
      methods:                       # extra dimensions, per method (the learning rate is everyone's)
        fim-lora:
          allocation.tau: {low: 0.5, high: 2.0}
          lora.scaling: {choices: [alpha_over_r, alpha_over_sqrt_r]}
        adalora:
          method_options.adalora.tinit_ratio: {low: 0.0, high: 0.3}
      sampler: {seed: 0, startup_trials: 4}        # TPE; start-up trials before it models (default
                                                   # trials // 2): random, or startup_design: latin-hypercube
      probes:                        # fixed points every study also tries, after its `trials` trials
      - {train.learning_rate: 8.0e-4}
      - {train.learning_rate: 1.6e-3}
      pruner: {startup_trials: 3, warmup_steps: 0} # median pruner
      heartbeat_s: 30                # a trial silent for 2 × this is taken as lost (its worker died)
      share:                         # controls run at their reference method's tuned settings
        random-rank: fim-lora        # (no study of their own; the final runs say whose settings)

A *control* isolates one ingredient of a method: ``random-rank`` is fim-lora with random instead of
Fisher ranks, ``hindsight-lora`` fim-lora with ranks read off a finished run. Tuned separately, a
control's difference from its reference would mix the ingredient with the two studies' luck; sharing
the reference's tuned settings (``tune.share``) keeps everything else equal. A shared method gets no
study, and the final runs record ``tuning.shared_from``.

With several seeds a trial's score is the ``aggregate`` of its seeds' validation scores: ``mean``, or
``worst`` (the lowest accuracy, the highest loss), which prefers settings that hold on every seed to
settings with the best peak. Its seeds run one after another; the pruner judges each seed's validation
scores against the completed trials' scores at the same seed and step (see :mod:`fimlora.tune.search`).

*Probes* are points of the search space that every study tries as well, one trial each, after the
sampler's ``trials`` trials and in the order given: a fixed grid on top of the search, for a part of the
range the sampler left untried in every study alike. A probe names values for some or all dimensions
(the sampler draws the rest); each must be in the range of every tuned method's space. They are judged
by the same pruner, and the best trial is chosen among all of them. A study's budget is ``trials`` plus
the probes; like more trials, probes extend a study without renaming it, and a probe trial records
which probe it is (Optuna user attribute ``probe``, column ``probe`` of ``tuning-trials.csv``). A study
whose finished trials contradict ``trials`` and ``probes`` (a probe tried at a place the sampler now holds,
or another value at a probe's place) is refused before anything trains.

A parameter is a dotted path into the experiment config with ``{low, high}`` (uniform; ``log: true`` for
log-uniform, ``integer: true`` for integers) or ``{choices: [...]}``. Every method gets the same number
of trials: a method entry may repeat ``trials`` only with the same value, anything else is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fimlora.config import format_validation_error
from fimlora.errors import FimloraError
from fimlora.sweep.spec import SweepSpec, method_name
from fimlora.tune.preparation import refusal

LEARNING_RATE = "train.learning_rate"
#: Metrics a study can optimise, and whether larger is better.
METRIC_DIRECTIONS: dict[str, bool] = {"accuracy": True, "macro_f1": True, "loss": False, "perplexity": False}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RangeSpec(_Strict):
    """A numeric dimension: uniform on [low, high], or log-uniform; integers with ``integer: true``."""

    low: float = Field(description="Lower bound, included.")
    high: float = Field(description="Upper bound, included; above low.")
    log: bool = Field(
        False, description="Draw log-uniformly (needs low > 0); tune.learning_rate defaults to true."
    )
    integer: bool = Field(False, description="Draw integers (the bounds must be integers).")

    @model_validator(mode="after")
    def _valid(self) -> RangeSpec:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError(f"needs finite low < high, got [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-uniform range needs low > 0, got {self.low}")
        if self.integer and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError(f"an integer range needs integer bounds, got [{self.low}, {self.high}]")
        return self


class ChoiceSpec(_Strict):
    """A categorical dimension."""

    choices: list[str | int | float | bool] = Field(
        min_length=1, description="The values to choose from (strings, numbers or booleans)."
    )


#: How the start-up trials' values are placed (:mod:`fimlora.tune.search`).
StartupDesign = Literal["random", "latin-hypercube"]


class SamplerSettings(_Strict):
    seed: int = Field(0, description="Seed of every study's TPE sampler (per trial: with its place).")
    startup_trials: int | None = Field(
        None, ge=1, description="Start-up trials before TPE models the results (default: trials // 2, ≥ 1)."
    )
    startup_design: StartupDesign = Field(
        "random",
        description="How the start-up trials' values are placed: TPE's independent random draws, or a "
        "Latin hypercube (each dimension's range cut into startup_trials equal parts, of its log scale "
        "for a log range, one start-up trial in each, in a seeded order).",
    )


class PrunerSettings(_Strict):
    startup_trials: int = Field(
        3, ge=0, description="Completed trials before the median pruner may prune (optuna n_startup_trials)."
    )
    warmup_steps: int = Field(0, ge=0, description="Training steps before a trial may be pruned.")


class TuneSettings(_Strict):
    """The validated ``tune:`` section (see the module docstring)."""

    trials: int = Field(ge=1, description="Trials per study; the same for every cell.")
    seed: int | None = Field(
        None,
        description="Experiment seed of every trial (the first of its seeds); default: the grid's first "
        "seed, else defaults.seed, else 0.",
    )
    seeds: int = Field(1, ge=1, description="Seeds every trial trains at: seed, seed + 1, …")
    aggregate: Literal["mean", "worst"] = Field(
        "mean",
        description="A trial's score over its seeds: their mean, or the worst (lowest accuracy, highest "
        "loss), which prefers settings that hold on every seed.",
    )
    metric: Literal["accuracy", "macro_f1", "loss", "perplexity"] | None = Field(
        None,
        description="Validation metric a study optimises (accuracy and macro_f1 maximised, loss and "
        "perplexity minimised); default: accuracy for classification, perplexity for causal LM.",
    )
    eval_every: int | None = Field(
        None,
        ge=1,
        description="Training steps between the validation evaluations the pruner judges; default: "
        "train.steps // 4 (at least 1).",
    )
    eval_examples: int | None = Field(
        None,
        ge=1,
        description="Validation examples a trial is scored on; default: train.eval_examples (all if unset).",
    )
    learning_rate: RangeSpec | None = Field(
        RangeSpec(low=1e-4, high=3e-2, log=True),
        description="Range of train.learning_rate searched for every method, log-uniform unless log: "
        "false; null: not searched.",
    )
    methods: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per method: its extra dimensions, {dotted config key: {low, high} or {choices}}; a "
        "trials key may only repeat tune.trials.",
    )
    sampler: SamplerSettings = Field(SamplerSettings(), description="The TPE sampler of every study.")
    pruner: PrunerSettings = Field(
        PrunerSettings(),
        description="The median pruner: a trial's seed is judged against completed trials at that seed "
        "and step.",
    )
    heartbeat_s: int = Field(
        30,
        ge=1,
        description="Seconds between a running trial's heartbeats; one silent for 2 × this is taken as "
        "lost (its worker died) and retried, at most twice, with the same parameters.",
    )
    share: dict[str, str] = Field(
        default_factory=dict,
        description="Methods run at another method's tuned settings instead of a study of their own: "
        "{control: reference}.",
    )
    probes: list[dict[str, float | int | str | bool]] = Field(
        default_factory=list,
        description="Points every study tries after its trials, one trial each, in this order: "
        "{dotted config key: value} for some or all dimensions (the sampler draws the rest).",
    )

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _learning_rate_is_log_uniform_unless_said(cls, value: Any) -> Any:
        # Learning rates are searched on a log scale; a uniform draw on [3e-4, 5e-2] would put 60 % of the
        # trials above 2e-2. An explicit `log: false` still gets the uniform range.
        if isinstance(value, dict) and "log" not in value:
            return {**value, "log": True}
        return value

    @property
    def budget(self) -> int:
        """Trials per study: the sampler's ``trials``, then one per probe."""
        return self.trials + len(self.probes)

    @property
    def sampler_startup(self) -> int:
        """Random trials before TPE (the same in every study)."""
        return self.sampler.startup_trials or max(1, self.trials // 2)

    def space(self, method: str) -> list[Param]:
        """The search space of ``method``: the learning rate, then its own extras in key order."""
        params = [] if self.learning_rate is None else [Param.of(LEARNING_RATE, self.learning_rate)]
        extras = self.methods.get(method, {})
        params += [Param.of(key, _dimension(method, key, value)) for key, value in sorted(extras.items())]
        return params

    def protocol(self) -> dict[str, Any]:
        """Everything a study's trials depend on besides the cell (hashed into study names); not the
        number of trials nor the probes (both extend a study) nor the heartbeat. One seed leaves ``seeds`` and
        ``aggregate`` out (its mean is its worst), and random start-up its ``startup_design``, so that
        studies named before those settings existed keep their names."""
        exclude: dict[str, Any] = {
            "trials": True,
            "probes": True,
            "heartbeat_s": True,
            "methods": True,
            "share": True,
        }
        if self.seeds == 1:
            exclude |= {"seeds": True, "aggregate": True}
        if self.sampler.startup_design == "random":
            exclude["sampler"] = {"startup_design": True}  # studies from before the option keep their names
        return self.model_dump(mode="json", exclude=exclude)


@dataclass(frozen=True)
class Param:
    """One search dimension: a dotted config key and its range or choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    @classmethod
    def of(cls, key: str, spec: RangeSpec | ChoiceSpec) -> Param:
        if isinstance(spec, ChoiceSpec):
            return cls(key, choices=tuple(spec.choices))
        return cls(key, spec.low, spec.high, spec.log, spec.integer)

    def suggest(self, trial: Any) -> Any:
        """The value Optuna's ``trial`` proposes for this dimension."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def admits(self, value: Any) -> bool:
        """Whether ``value`` lies in this dimension: one of its choices, or within its bounds (an
        integer for an integer range)."""
        if self.choices is not None:
            return any(type(value) is type(c) and value == c for c in self.choices)
        assert self.low is not None and self.high is not None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not float(value).is_integer():
            return False
        return self.low <= value <= self.high

    def extremes(self) -> list[Any]:
        """Values that must all make a valid config: the bounds, or every choice."""
        if self.choices is not None:
            return list(self.choices)
        assert self.low is not None and self.high is not None
        return [int(self.low), int(self.high)] if self.integer else [self.low, self.high]

    def describe(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"key": self.key, "choices": list(self.choices)}
        kind = "int" if self.integer else "float"
        return {"key": self.key, "low": self.low, "high": self.high, "log": self.log, "type": kind}


def _dimension(method: str, key: str, value: Any) -> RangeSpec | ChoiceSpec:
    where = f"tune.methods.{method}.{key}"
    reason = refusal(key)
    if reason is not None:
        raise FimloraError(f"{where}: {reason} and cannot be searched; trials would not be the final runs.")
    if key == LEARNING_RATE:
        raise FimloraError(
            f"{where}: the learning rate is searched for every method alike; set its range in "
            "tune.learning_rate."
        )
    if not isinstance(value, dict):
        raise FimloraError(f"{where} must be {{low, high}} or {{choices: [...]}}, got {value!r}.")
    model: type[RangeSpec] | type[ChoiceSpec] = ChoiceSpec if "choices" in value else RangeSpec
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise FimloraError(f"{where}: {format_validation_error(exc, root='range')}.") from None


def _check_share(settings: TuneSettings, grid_methods: list[str], source: str) -> None:
    for control, reference in sorted(settings.share.items()):
        where = f"Invalid {source}: tune.share.{control}"
        if control not in grid_methods:
            raise FimloraError(f"{where}: {control} is not in the grid ({', '.join(grid_methods)}).")
        if reference not in grid_methods:
            raise FimloraError(
                f"{where}: its reference {reference} is not in the grid, so it is never tuned."
            )
        if reference == control or reference in settings.share:
            raise FimloraError(f"{where}: {reference} shares settings itself; name a method that is tuned.")
        if control in settings.methods:
            raise FimloraError(
                f"{where}: {control} takes {reference}'s settings, so tune.methods.{control} would never be "
                "searched; remove one of them."
            )


def _check_probes(settings: TuneSettings, tuned_methods: list[str], source: str) -> None:
    for index, probe in enumerate(settings.probes):
        where = f"Invalid {source}: tune.probes[{index}]"
        if not probe:
            raise FimloraError(f"{where} names no dimension; give {{dotted key: value}}.")
        for method in tuned_methods:
            space = {param.key: param for param in settings.space(method)}
            for key, value in probe.items():
                if key not in space:
                    raise FimloraError(
                        f"{where}: {key} is not searched for {method} (its dimensions: "
                        f"{', '.join(space) or 'none'}); a probe is tried by every study."
                    )
                if not space[key].admits(value):
                    bounds = space[key].describe()
                    allowed = bounds.get("choices") or f"[{bounds['low']:g}, {bounds['high']:g}]"
                    raise FimloraError(f"{where}: {key} = {value!r} is outside {method}'s range {allowed}.")
    seen = [tuple(sorted(probe.items())) for probe in settings.probes]
    if len(set(seen)) < len(seen):
        raise FimloraError(f"Invalid {source}: tune.probes repeats a point; each probe is one trial.")


def aggregate_scores(scores: Sequence[float], how: str, *, higher_is_better: bool) -> float:
    """A trial's score from its seeds' scores: their mean, or the worst of them."""
    if how == "mean":
        return float(sum(scores) / len(scores))
    return float(min(scores) if higher_is_better else max(scores))


def parse_tune(spec: SweepSpec, *, trials: int | None = None, seeds: int | None = None) -> TuneSettings:
    """The spec's ``tune:`` section, validated against its grid; ``trials`` overrides every count,
    ``seeds`` the seeds per trial.

    Refused: no section; per-method trial counts that differ from ``tune.trials`` (every method gets
    the same tuning effort); a method the grid does not have; a learning-rate grid axis while the
    learning rate is searched; a dimension that is fixed by the cell or the protocol.
    """
    source = f"tune section of sweep {spec.name!r}"
    if spec.tune is None:
        raise FimloraError(
            f"Sweep spec {spec.name!r} has no tune: section; add one (see docs/experiments.md, 'Tuning')."
        )
    try:
        settings = TuneSettings.model_validate(spec.tune)
    except ValidationError as exc:
        problems = format_validation_error(exc, root="tune").split("; ")
        listed = "; ".join(p if p.startswith("tune") else f"tune.{p}" for p in problems)
        raise FimloraError(f"Invalid {source}: {listed}.") from None
    grid_methods = [method_name(m) for m in spec.grid.method]
    unknown = sorted(set(settings.methods) - set(grid_methods))
    if unknown:
        raise FimloraError(
            f"Invalid {source}: tune.methods names {', '.join(unknown)}, not in the grid "
            f"({', '.join(grid_methods)})."
        )
    _check_share(settings, grid_methods, source)
    counts = {m: entry.get("trials") for m, entry in settings.methods.items() if isinstance(entry, dict)}
    unequal = {m: n for m, n in counts.items() if n is not None and n != settings.trials}
    if unequal:
        listed = ", ".join(f"{m}: {n}" for m, n in sorted(unequal.items()))
        raise FimloraError(
            f"Invalid {source}: every method gets the same tuning effort, tune.trials = {settings.trials}, "
            f"but {listed}; remove the per-method counts."
        )
    methods = {}
    for method, entry in settings.methods.items():
        if not isinstance(entry, dict):
            raise FimloraError(f"Invalid {source}: tune.methods.{method} must be a mapping of dimensions.")
        methods[method] = {k: v for k, v in entry.items() if k != "trials"}
    rates = spec.grid.learning_rate
    if settings.learning_rate is not None and rates is not None:
        raise FimloraError(
            f"Invalid {source}: the learning rate is searched (tune.learning_rate), so the grid must not "
            "have a learning_rate axis; remove one of them."
        )
    if rates is not None and len(rates) > 1:
        raise FimloraError(
            f"Invalid {source}: a study is one model × dataset × method × budget; the grid's "
            f"{len(rates)} learning rates would need one each. Keep one, or search the rate."
        )
    updated: dict[str, Any] = {"methods": methods}
    if trials is not None:
        if trials < 1:
            raise FimloraError(f"--trials must be at least 1, got {trials}.")
        updated["trials"] = trials
    if seeds is not None:
        if seeds < 1:
            raise FimloraError(f"--seeds must be at least 1, got {seeds}.")
        updated["seeds"] = seeds
    settings = settings.model_copy(update=updated)
    tuned_methods = [m for m in grid_methods if m not in settings.share]
    for method in tuned_methods:
        if not settings.space(method):
            raise FimloraError(
                f"Invalid {source}: nothing to search for {method} (tune.learning_rate is null and "
                "tune.methods gives it no dimension)."
            )
    _check_probes(settings, tuned_methods, source)
    return settings
