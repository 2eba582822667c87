"""Latin-hypercube start-up (``tune.sampler.startup_design``): the start-up trials of a study cover each
dimension's range one equal part apiece (of the log scale for a log range), the same points in every
study of one seed and after a restart; random start-up, the default, does not, and keeps study names."""

from __future__ import annotations

import math

import optuna
import pytest

from fimlora.errors import FimloraError
from fimlora.sweep import parse_spec
from fimlora.tune import parse_tune, plan_cells
from fimlora.tune.search import PlaceSeededSampler

LOW, HIGH = 3e-4, 5e-2  # the study's learning-rate range
GRID = {"model": ["some/model"], "dataset": ["movie-reviews"], "method": ["lora", "fim-lora"]}


def part_of(value: float, parts: int, low: float = LOW, high: float = HIGH) -> int:
    """Which of ``parts`` equal parts of [low, high]'s log scale ``value`` lies in."""
    return min(int(parts * math.log(value / low) / math.log(high / low)), parts - 1)


def start_up(design: str, seed: int, parts: int, *, study_name: str = "s", extra: bool = False):
    """The parameters of a study's ``parts`` start-up trials under ``design``."""
    sampler = PlaceSeededSampler(seed, parts, design)
    study = optuna.create_study(study_name=study_name, sampler=sampler, direction="maximize")

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", LOW, HIGH, log=True)
        if extra:
            trial.suggest_int("layers", 1, 4)
            trial.suggest_categorical("scaling", ["alpha_over_r", "alpha_over_sqrt_r"])
            trial.suggest_float("tau", 0.5, 2.0)
        return -abs(math.log(lr / 1e-3))

    study.optimize(objective, n_trials=parts)
    return [t.params for t in study.trials]


@pytest.mark.parametrize("parts", [2, 3, 5, 8])
def test_latin_hypercube_puts_one_start_up_trial_in_each_part_of_the_log_range(parts):
    for seed in range(10):
        lrs = [p["lr"] for p in start_up("latin-hypercube", seed, parts)]
        assert all(LOW <= lr <= HIGH for lr in lrs)
        assert sorted(part_of(lr, parts) for lr in lrs) == list(range(parts)), (seed, lrs)


def test_random_start_up_leaves_parts_empty_which_is_what_the_design_is_for():
    # The look-alike: TPE's own random start-up, same seeds, leaves a part of the range unexplored
    # on most seeds (three draws cover three parts with probability 6/27).
    covered = [
        sorted(part_of(p["lr"], 3) for p in start_up("random", seed, 3)) == [0, 1, 2] for seed in range(10)
    ]
    assert covered.count(False) >= 5


def test_every_dimension_is_stratified_and_every_study_of_one_seed_starts_alike():
    parts = 4
    params = start_up("latin-hypercube", 0, parts, extra=True)
    assert sorted(p["layers"] for p in params) == [1, 2, 3, 4]  # integers in equal shares
    assert sorted(p["scaling"] for p in params) == ["alpha_over_r"] * 2 + ["alpha_over_sqrt_r"] * 2
    taus = sorted(min(int(parts * (p["tau"] - 0.5) / 1.5), parts - 1) for p in params)
    assert taus == [0, 1, 2, 3]  # a linear range in equal linear parts
    # Dimensions are placed independently: the order along lr is not the order along tau.
    assert [p["lr"] for p in params] != [p["tau"] for p in params]
    assert start_up("latin-hypercube", 0, parts, study_name="other", extra=True) == params
    assert start_up("latin-hypercube", 1, parts, extra=True) != params


def test_a_study_resumed_by_a_new_process_draws_what_an_uninterrupted_one_draws():
    def objective(trial: optuna.Trial) -> float:
        return -abs(math.log(trial.suggest_float("lr", LOW, HIGH, log=True) / 1e-3))

    whole = optuna.create_study(sampler=PlaceSeededSampler(0, 3, "latin-hypercube"), direction="maximize")
    whole.optimize(objective, n_trials=5)
    storage = optuna.storages.InMemoryStorage()
    design = PlaceSeededSampler(0, 3, "latin-hypercube")
    first = optuna.create_study(storage=storage, study_name="r", sampler=design, direction="maximize")
    first.optimize(objective, n_trials=2)
    resumed = optuna.load_study(
        storage=storage, study_name="r", sampler=PlaceSeededSampler(0, 3, "latin-hypercube")
    )
    resumed.optimize(objective, n_trials=3)
    assert [t.params for t in resumed.trials] == [t.params for t in whole.trials]


def spec(sampler=None):
    tune = {"trials": 6, "learning_rate": {"low": LOW, "high": HIGH}}
    if sampler is not None:
        tune["sampler"] = sampler
    return parse_spec({"name": "s", "grid": GRID, "tune": tune}, base_dir="/x")


def names(sweep) -> list[str]:
    return [c.study_name for c in plan_cells(sweep, parse_tune(sweep))]


def test_random_start_up_keeps_the_study_names_of_before_the_option_and_the_design_names_new_ones():
    assert parse_tune(spec()).protocol() == {
        "seed": None,
        "metric": None,
        "eval_every": None,
        "eval_examples": None,
        "learning_rate": {"low": LOW, "high": HIGH, "log": True, "integer": False},
        "sampler": {"seed": 0, "startup_trials": None},
        "pruner": {"startup_trials": 3, "warmup_steps": 0},
    }
    assert names(spec({"startup_design": "random"})) == names(spec())
    assert not set(names(spec({"startup_design": "latin-hypercube"}))) & set(names(spec()))


def test_an_unknown_design_is_refused_with_the_choices():
    with pytest.raises(FimloraError) as info:
        parse_tune(spec({"startup_design": "sobol"}))
    assert "startup_design" in str(info.value) and "latin-hypercube" in str(info.value)
