"""``fimlora tune SPEC --status``: where every study stands, read from the storage without training or
writing anything (not even an empty database), with the best trial so far and whether a probe chose it."""

from __future__ import annotations

from datetime import datetime, timedelta

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState
from tune_runs import lora_grid, write_spec

from fimlora.cli import main
from fimlora.sweep import load_spec
from fimlora.tune import parse_tune, plan_cells
from fimlora.tune.status import time_left, tuning_status
from fimlora.tune.storage import DB_FILE, default_storage

TUNE = {"trials": 2, "metric": "loss", "learning_rate": {"low": 1e-3, "high": 1e-1}}
PROBED = {**TUNE, "probes": [{"train.learning_rate": 3e-3}]}


def tune(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", *map(str, argv)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    return captured.out


def test_status_reads_each_study_where_it_stands_and_writes_nothing(
    capsys, small_bert_dir, split_dir, tmp_path
):
    # Two specs of one store: the second adds a probe (write_spec names its file spec.yaml).
    probed = write_spec(tmp_path, lora_grid(small_bert_dir, split_dir), PROBED).rename(
        tmp_path / "probed.yaml"
    )
    plain = write_spec(tmp_path, lora_grid(small_bert_dir, split_dir), TUNE)
    store = tmp_path / "store"

    out = tune(capsys, plain, "--status")
    assert "0/2 trials ended over 1 studies" in out and "not started (0/2)" in out
    assert not store.exists()  # no database, no store: nothing was written

    tune(capsys, plain)
    before = (store / DB_FILE).read_bytes()
    out = tune(capsys, probed, "--status")
    assert "2/3 ended (2 complete, 0 pruned, 0 failed); best so far loss" in out
    assert "(probe" not in out and "probes tried 0 of 1" in out
    assert " trial " not in out  # nothing trained
    assert (store / DB_FILE).read_bytes() == before

    tune(capsys, probed)
    out = tune(capsys, probed, "--status")
    assert "3/3 ended (3 complete, 0 pruned, 0 failed); best so far loss" in out
    assert "with lr=0.003 (probe 0)" in out and "probes tried" not in out


def test_status_refuses_retry_failed(capsys, small_bert_dir, split_dir, tmp_path):
    path = write_spec(tmp_path, lora_grid(small_bert_dir, split_dir), TUNE)
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", str(path), "--status", "--retry-failed"])
    assert exit_info.value.code != 0
    assert "--status only reads the studies" in capsys.readouterr().err


def test_what_is_left_is_costed_at_each_studys_ended_trials_less_what_running_ones_have_run(
    capsys, small_bert_dir, split_dir, tmp_path
):
    grid = {**lora_grid(small_bert_dir, split_dir), "method": ["lora", "fim-lora"]}
    path = write_spec(tmp_path, grid, {**TUNE, "trials": 4})
    spec = load_spec(path)
    lora, fim_lora = plan_cells(spec, parse_tune(spec))
    now = datetime.now()
    spec.output_path.mkdir()
    study = optuna.create_study(
        study_name=lora.study_name, storage=default_storage(spec.output_path), direction="minimize"
    )
    # lora: three trials ended in 60, 30 (pruned) and 120 s, a mean of 70 s; a fourth has run for 20 s.
    ended = [(TrialState.COMPLETE, 60), (TrialState.PRUNED, 30), (TrialState.COMPLETE, 120)]
    for number, (state, took) in enumerate([*ended, (TrialState.RUNNING, 20)]):
        started = now - timedelta(seconds=1000 - 200 * number)
        study.add_trial(
            FrozenTrial(
                number=number,
                trial_id=number,
                state=state,
                value=0.5 if state == TrialState.COMPLETE else None,
                datetime_start=started if state != TrialState.RUNNING else now - timedelta(seconds=took),
                datetime_complete=None if state == TrialState.RUNNING else started + timedelta(seconds=took),
                params={"train.learning_rate": 1e-2},
                distributions={"train.learning_rate": FloatDistribution(1e-3, 1e-1, log=True)},
                user_attrs={},
                system_attrs={},
                intermediate_values={},
            )
        )
    _, statuses = tuning_status(spec)
    left = time_left(statuses)
    # lora's last place: 70 s less the 20 run; fim-lora has none ended, so its 4 places cost the mean over
    # every ended trial (70 s): 50 + 280. Timing complete trials only (90 s) or not crediting the running
    # one would give 430 or 350.
    assert (left.trials, left.running, left.guessed) == (5, 1, (fim_lora.describe(),))
    assert left.mean_s == pytest.approx(70) and left.seconds == pytest.approx(330, abs=2)
    out = tune(capsys, path, "--status")
    assert "3/4 ended (2 complete, 1 pruned, 0 failed), 1 running" in out
    assert "left: 5 trials (1 running), ≈ 0.1 h of one worker (" in out and "1.2 min over all" in out
    assert f"none ended yet in {fim_lora.describe()}" in out


def test_nothing_is_left_once_every_budget_has_ended(capsys, small_bert_dir, split_dir, tmp_path):
    path = write_spec(tmp_path, lora_grid(small_bert_dir, split_dir), TUNE)
    tune(capsys, path)
    spec = load_spec(path)
    _, statuses = tuning_status(spec)
    assert time_left(statuses) is None and all(len(s.ended_s) == 2 for s in statuses)
    assert "left:" not in tune(capsys, path, "--status")


def test_before_any_trial_ends_what_is_left_is_counted_without_an_estimate(
    capsys, small_bert_dir, split_dir, tmp_path
):
    path = write_spec(tmp_path, lora_grid(small_bert_dir, split_dir), {**TUNE, "trials": 3})
    spec = load_spec(path)
    (lora,) = plan_cells(spec, parse_tune(spec))
    spec.output_path.mkdir()
    study = optuna.create_study(
        study_name=lora.study_name, storage=default_storage(spec.output_path), direction="minimize"
    )
    study.add_trial(
        FrozenTrial(
            number=0,
            trial_id=0,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=datetime.now() - timedelta(seconds=30),
            datetime_complete=None,
            params={"train.learning_rate": 1e-2},
            distributions={"train.learning_rate": FloatDistribution(1e-3, 1e-1, log=True)},
            user_attrs={},
            system_attrs={},
            intermediate_values={},
        )
    )
    _, statuses = tuning_status(spec)
    assert time_left(statuses) is None
    out = tune(capsys, path, "--status")
    assert "left: 3 trials (1 running); no trial has ended yet, so no estimate of the time" in out
