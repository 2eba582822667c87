"""Early stopping: a clearly worse trial is pruned, a diverging trial is recorded as failed, the study
goes on to its full budget."""

from __future__ import annotations

import optuna
import yaml
from tune_runs import write_spec

from fimlora.sweep import load_spec
from fimlora.tune import TUNED_FILE, parse_tune, plan_cells, run_tuning
from fimlora.tune.storage import FAILURE_ATTR, default_storage, trial_kind
from fimlora.tune.study import create_studies


def test_a_bad_trial_is_pruned_and_a_diverging_one_fails_while_the_study_goes_on(
    small_bert_dir, split_dir, tmp_path
):
    grid = {
        "model": [str(small_bert_dir)],
        "dataset": [str(split_dir)],  # its test.csv cannot be read: tuning never needs it
        "method": ["lora"],
        "budget": [{"uniform_rank": 2}],
        "seed": [0],
    }
    tune = {
        "trials": 4,
        "metric": "loss",
        "eval_every": 2,
        "learning_rate": {"low": 1e-4, "high": 1e31, "log": True},
        "pruner": {"startup_trials": 1},
    }
    spec = load_spec(write_spec(tmp_path, grid, tune))
    settings = parse_tune(spec)
    (cell,) = plan_cells(spec, settings)
    spec.output_path.mkdir()
    url = default_storage(spec.output_path)
    create_studies([cell], settings, url)
    study = optuna.load_study(study_name=cell.study_name, storage=url)
    # A sound rate; one that overshoots (validation loss far above the first trial's at step 2); one whose
    # updates overflow float32 (NaN); and a small one after it: does the study go on?
    for rate in (1e-2, 1e-1, 1e30, 1e-3):
        study.enqueue_trial({"train.learning_rate": rate})
    lines: list[str] = []
    run_tuning(spec, log=lines.append)

    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [trial_kind(t) for t in trials] == ["complete", "pruned", "failed", "complete"]
    good, bad, diverged, _ = trials
    assert bad.last_step == 2 and bad.intermediate_values[2] > good.intermediate_values[2]
    assert "not finite" in diverged.user_attrs[FAILURE_ATTR] or "nan" in diverged.user_attrs[FAILURE_ATTR]
    assert any("trial 1 [lr=0.1]: pruned" in line for line in lines)
    assert any("trial 2 [lr=1e+30]: failed" in line for line in lines)
    document = yaml.safe_load((spec.output_path / TUNED_FILE).read_text())
    assert {k: document[k] for k in ("name", "split", "seed", "trials_per_study")} == {
        "name": "tiny",
        "split": "validation",
        "seed": 0,
        "trials_per_study": 4,
    }
    (entry,) = document["cells"]
    assert list(entry) == [
        "model", "dataset", "method", "budget", "params", "metric", "validation_score", "seed_scores",
        "seed_spread", "trials", "data"
    ]  # fmt: skip
    assert (entry["model"], entry["dataset"], entry["method"]) == (
        str(small_bert_dir),
        str(split_dir),
        "lora",
    )
    assert entry["budget"] == {"uniform_rank": 2} and entry["metric"] == "loss"
    assert entry["trials"] == {"complete": 2, "pruned": 1, "failed": 1, "lost": 0, "retried": 0}
    assert entry["seed_scores"] == {0: entry["validation_score"]} and entry["seed_spread"] is None
    best = min((t for t in trials if trial_kind(t) == "complete"), key=lambda t: t.value)
    assert entry["params"] == best.params and entry["validation_score"] == best.value
