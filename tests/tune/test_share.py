"""`tune.share`: a control (random-rank, hindsight-lora) runs no study of its own and takes its reference
method's tuned settings, recorded in its final runs and shown in the report's tuning table."""

from __future__ import annotations

import pandas as pd
import pytest
from tune_runs import cell, tuned_file, write_spec

from fimlora.errors import FimloraError
from fimlora.reporting.tuning import budget_blocks
from fimlora.sweep import load_spec
from fimlora.tune import expand_tuned, parse_tune, plan_cells

GRID = {
    "model": ["some/model"],
    "dataset": ["movie-reviews"],
    "method": ["lora", "fim-lora", "random-rank"],
    "budget": [{"uniform_rank": 2}],
    "seed": [0, 1],
}
TUNE = {
    "trials": 4,
    "methods": {"fim-lora": {"allocation.tau": {"low": 0.5, "high": 2.0}}},
    "share": {"random-rank": "fim-lora"},
}
FIM_LORA = {"train.learning_rate": 0.0456, "allocation.tau": 1.5}


def test_a_control_gets_no_study_and_its_reference_studies_are_unchanged(tmp_path):
    spec = load_spec(write_spec(tmp_path, GRID, TUNE))
    cells = plan_cells(spec, parse_tune(spec))
    assert [c.method for c in cells] == ["lora", "fim-lora"]
    unshared = load_spec(
        write_spec(tmp_path, {**GRID, "method": ["lora", "fim-lora"]}, {**TUNE, "share": {}})
    )
    # Adding a control does not rename its reference's study: its trials are reused.
    assert [c.study_name for c in cells] == [c.study_name for c in plan_cells(unshared, parse_tune(unshared))]


def test_a_control_runs_at_its_references_tuned_settings_and_says_so(tmp_path):
    spec = load_spec(write_spec(tmp_path, GRID, TUNE))
    path = tuned_file(
        tmp_path / "tuned.yaml", [cell("lora", {"train.learning_rate": 0.0123}), cell("fim-lora", FIM_LORA)]
    )
    runs = expand_tuned(spec, path)
    assert sorted(r.method for r in runs) == ["fim-lora"] * 2 + ["lora"] * 2 + ["random-rank"] * 2
    for run in runs:
        tuning = run.extras["tuning"]
        if run.method == "random-rank":
            assert run.config.train.learning_rate == 0.0456 and run.config.allocation.tau == 1.5
            assert tuning["shared_from"] == "fim-lora" and tuning["params"] == FIM_LORA
            sources = run.extras["hyperparameter_sources"]
            assert sources["train.learning_rate"] == {"value": 0.0456, "source": "tuned"}
        else:
            assert tuning["shared_from"] is None
    # Without its reference's entry the control cannot run, and the error says whose settings are missing.
    control_first = load_spec(write_spec(tmp_path, {**GRID, "method": ["random-rank", "fim-lora"]}, TUNE))
    only_lora = tuned_file(tmp_path / "lora.yaml", [cell("lora", {"train.learning_rate": 0.0123})])
    with pytest.raises(FimloraError, match=r"fim-lora \(whose settings random-rank shares"):
        expand_tuned(control_first, only_lora)


@pytest.mark.parametrize(
    ("share", "methods", "message"),
    [
        ({"gora": "fim-lora"}, {}, "tune.share.gora: gora is not in the grid"),
        ({"random-rank": "gora"}, {}, "its reference gora is not in the grid"),
        ({"random-rank": "fim-lora", "fim-lora": "lora"}, {}, "fim-lora shares settings itself"),
        ({"random-rank": "random-rank"}, {}, "random-rank shares settings itself"),
        (
            {"random-rank": "fim-lora"},
            {"random-rank": {"allocation.tau": {"low": 0.5, "high": 2.0}}},
            "tune.methods.random-rank would never be searched",
        ),
    ],
)
def test_a_share_that_cannot_hold_is_refused(tmp_path, share, methods, message):
    spec = load_spec(write_spec(tmp_path, GRID, {**TUNE, "share": share, "methods": methods}))
    with pytest.raises(FimloraError, match=message):
        parse_tune(spec)


def test_a_reference_setting_the_control_cannot_take_is_refused_before_tuning(tmp_path):
    # Modules without an adapter (r_min 0) are fine for fim-lora, but DoRA refuses them: sharing
    # fim-lora's searched r_min with DoRA is refused by name before any trial runs.
    tune = {
        **TUNE,
        "methods": {"fim-lora": {"allocation.r_min": {"choices": [0, 1]}}},
        "share": {"dora": "fim-lora"},
    }
    spec = load_spec(write_spec(tmp_path, {**GRID, "method": ["fim-lora", "dora"]}, tune))
    with pytest.raises(FimloraError, match=r"tune\.share\.dora gives it fim-lora's allocation\.r_min"):
        plan_cells(spec, parse_tune(spec))


def test_the_report_marks_a_control_as_sharing_and_leaves_it_out_of_the_effort_check():
    row = {
        "budget": "r2",
        "budget_label": "r2",
        "metric": "accuracy",
        "validation_score": 0.8,
        "pruned": 1,
        "failed": 0,
        "lost": 0,
        "seed_scores": {},
        "seed_spread": None,
        "aggregate": "mean",
        "trials_per_study": 4,
        "params": {"train.learning_rate": 0.01},
        "file": "tuned.yaml",
    }
    tuning = pd.DataFrame(
        [
            {**row, "method": "lora", "complete": 3, "shared_from": None},
            {**row, "method": "fim-lora", "complete": 3, "shared_from": None},
            {**row, "method": "random-rank", "complete": 2, "shared_from": "fim-lora"},
        ]
    )
    _, table, *notices = budget_blocks(tuning, "lora")
    methods = [r[1] for r in table.rows]
    assert methods == ["lora", "fim-lora", "random-rank (shares fim-lora's settings)"]
    assert not notices  # the control's repeated counts are not a second, unequal tuning effort
