"""`tune.seeds`: every trial trains at each seed, is scored by the spec's aggregate (mean or worst), and
records its per-seed scores; the pruner compares each seed with the same seed of the completed trials."""

from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from tune_runs import write_spec

from fimlora.sweep import load_spec
from fimlora.tune import TRIALS_FILE, TUNED_FILE, parse_tune, plan_cells, run_tuning
from fimlora.tune.search import SeedwiseMedianPruner
from fimlora.tune.storage import SEED_SCORES_ATTR, trial_kind, trial_step

TRIALS = 3
# Every trial a random one (startup = trials) and no pruning: the mean and the worst study train the
# same learning rates (each trial's draw depends on its place only) and differ only in what they choose.
TUNE = {
    "trials": TRIALS,
    "seeds": 2,
    "metric": "loss",
    "eval_every": 3,
    "learning_rate": {"low": 1e-3, "high": 3e-1},
    "sampler": {"startup_trials": TRIALS},
    "pruner": {"startup_trials": TRIALS},
}


def tune(parent, small_bert_dir, split_dir, aggregate):
    directory = parent / aggregate
    directory.mkdir()
    grid = {
        "model": [str(small_bert_dir)],
        "dataset": [str(split_dir)],
        "method": ["lora"],
        "budget": [{"uniform_rank": 2}],
        "seed": [0, 1, 2],
    }
    spec = load_spec(write_spec(directory, grid, {**TUNE, "aggregate": aggregate}))
    report = run_tuning(spec, log=lambda _: None)
    (cell,) = plan_cells(spec, parse_tune(spec))
    study = optuna.load_study(study_name=cell.study_name, storage=report.storage)
    return spec, cell, sorted(study.trials, key=lambda t: t.number)


@pytest.fixture(scope="module")
def worst(tmp_path_factory, small_bert_dir, split_dir):
    """One tuning scored by the worst seed, read (never written) by the tests below."""
    return tune(tmp_path_factory.mktemp("seeds"), small_bert_dir, split_dir, "worst")


def test_every_trial_trains_at_each_seed_and_is_scored_by_the_aggregate(worst):
    spec, cell, trials = worst
    assert cell.seeds == (0, 1)
    assert [trial_kind(t) for t in trials] == ["complete"] * TRIALS
    for trial in trials:
        scores = {int(s): v for s, v in trial.user_attrs[SEED_SCORES_ATTR].items()}
        assert list(scores) == [0, 1]
        assert trial.value == max(scores.values())  # the worst loss of the two seeds
        for seed, score in scores.items():  # each seed is a run of its own, at that seed
            run = cell.directory / f"trial-{trial.number:04d}" / f"seed-{seed}" / "lora"
            result = json.loads((run / "result.json").read_text())
            assert result["seed"] == seed and result["metrics"]["loss"] == score
        assert scores[0] != scores[1]
    # Each seed has its own Fisher directory and task head; the validation scores are reported per seed
    # at steps that never mix two seeds.
    assert set(trials[0].intermediate_values) == {3, 7 + 3}  # steps 6 + 1 apart: seed 1's step 3 is 10

    document = yaml.safe_load((spec.output_path / TUNED_FILE).read_text())
    assert document["seeds"] == [0, 1] and document["aggregate"] == "worst"
    (entry,) = document["cells"]
    best = min(trials, key=lambda t: (t.value, t.number))
    assert entry["params"] == best.params and entry["validation_score"] == best.value
    expected = {int(s): v for s, v in best.user_attrs[SEED_SCORES_ATTR].items()}
    assert entry["seed_scores"] == expected
    assert entry["seed_spread"] == pytest.approx(max(expected.values()) - min(expected.values()))
    table = pd.read_csv(spec.output_path / TRIALS_FILE)
    assert table[["score.seed0", "score.seed1"]].notna().all().all() and len(table) == TRIALS
    # A relative record of the storage: the store sits next to the spec.
    assert document["storage"] == "sqlite:///store/tuning.db"


def test_mean_and_worst_choose_from_the_same_per_seed_scores(worst, small_bert_dir, split_dir, tmp_path):
    _, _, by_worst = worst
    _, _, by_mean = tune(tmp_path, small_bert_dir, split_dir, "mean")
    scores = [t.user_attrs[SEED_SCORES_ATTR] for t in by_worst]
    assert [t.params for t in by_mean] == [t.params for t in by_worst]  # the same learning rates...
    assert [t.user_attrs[SEED_SCORES_ATTR] for t in by_mean] == scores  # ...the same runs
    assert [t.value for t in by_mean] == pytest.approx([sum(s.values()) / 2 for s in scores])
    assert [t.value for t in by_worst] == [max(s.values()) for s in scores]


def _trial(values: dict[int, float], state=TrialState.COMPLETE):
    return create_trial(
        state=state,
        value=0.0 if state == TrialState.COMPLETE else None,
        params={"x": 0.5},
        distributions={"x": FloatDistribution(0, 1)},
        intermediate_values=values,
    )


def test_the_pruner_compares_each_seed_with_the_same_seed_of_the_completed_trials():
    steps = 10
    at = {(seed, step): trial_step(seed, step, steps) for seed in (0, 1) for step in (5,)}
    study = optuna.create_study(direction="maximize")
    for first, second in ((0.80, 0.78), (0.70, 0.72), (0.75, 0.74)):
        study.add_trial(_trial({at[0, 5]: first, at[1, 5]: second}))
    # Best of all on seed 0, collapsed on seed 1.
    collapsed = _trial({at[0, 5]: 0.90, at[1, 5]: 0.50})
    seedwise = SeedwiseMedianPruner(steps=steps, startup_trials=3, warmup_steps=0)
    assert seedwise.prune(study, collapsed)
    # Optuna's median pruner takes the trial's best score over all its steps (0.90, seed 0's) against
    # the median at seed 1's step: it would let the collapse through.
    assert not optuna.pruners.MedianPruner(n_startup_trials=3).prune(study, collapsed)
    steady = _trial({at[0, 5]: 0.76, at[1, 5]: 0.75})
    assert not seedwise.prune(study, steady)
    # Warm-up counts training steps within each seed; fewer completed trials than the start-up: no verdict.
    assert not SeedwiseMedianPruner(steps=steps, startup_trials=3, warmup_steps=6).prune(study, collapsed)
    assert not SeedwiseMedianPruner(steps=steps, startup_trials=4, warmup_steps=0).prune(study, collapsed)
