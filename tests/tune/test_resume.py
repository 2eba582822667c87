"""A killed tuning resumes: a real SIGKILL of `fimlora tune` loses only the trial that was running, the
rerun completes the study with the budget it was given and draws exactly what an uninterrupted tuning
draws; --trials extends it; workers share the budget."""

from __future__ import annotations

import datetime
import json
import subprocess
import threading
import time

import optuna
import pandas as pd
import pytest
import yaml
from optuna.distributions import FloatDistribution
from processes import ONE_THREAD, fimlora_command, kill_when
from tune_runs import lora_grid, write_spec

from fimlora.cli import main
from fimlora.sweep import load_spec
from fimlora.tune import TRIALS_FILE, TUNED_FILE, parse_tune, plan_cells
from fimlora.tune.storage import SEED_SCORES_ATTR, default_storage, kind_counts, open_storage, trial_kind
from fimlora.tune.study import WorkerTask, create_studies, tune_worker


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


TUNE = {"trials": 4, "metric": "loss", "eval_every": 2, "heartbeat_s": 1, "sampler": {"startup_trials": 3}}


def tune_command(path, *extra) -> list[str]:
    return fimlora_command("tune", path, *extra)


def counted(study) -> list[tuple]:
    """The trials that count against the budget, in order: their values, state and score."""
    return [
        (t.params, trial_kind(t), t.value, t.last_step)
        for t in sorted(study.trials, key=lambda t: t.number)
        if trial_kind(t) in ("complete", "pruned", "failed")
    ]


def test_a_killed_and_resumed_tuning_is_the_uninterrupted_one_trial_by_trial(
    capsys, small_bert_dir, split_dir, tmp_path
):
    plain_path, path, spec, cell = _uninterrupted_and_to_kill(small_bert_dir, split_dir, tmp_path, TUNE)
    second = cell.directory / "trial-0001" / "lora" / "config.yaml"
    kill_when(tune_command(path), second.exists)  # the first trial finished, the second is training
    storage = default_storage(spec.output_path)
    study = optuna.load_study(study_name=cell.study_name, storage=storage)
    assert [trial_kind(t) for t in study.trials] == ["complete", "running"]
    first_result = cell.directory / "trial-0000" / "lora" / "result.json"
    first_stamp = first_result.stat().st_mtime_ns

    subprocess.run(tune_command(path), check=True, env=ONE_THREAD, capture_output=True)
    trials = optuna.load_study(study_name=cell.study_name, storage=storage).trials
    counts = kind_counts(trials)
    assert counts["lost"] == 1 and trial_kind(trials[1]) == "lost"  # only the trial that was running
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 1)
    assert retry.params == trials[1].params and trial_kind(retry) != "lost"  # re-run, same values
    assert first_result.stat().st_mtime_ns == first_stamp  # the finished trial was not touched
    # Trial by trial, the resumed study drew and scored what the uninterrupted one did: the learning
    # rates of the random start-up trials and of TPE's, the verdicts, the validation losses.
    plain = optuna.load_study(
        study_name=cell.study_name, storage=default_storage(load_spec(plain_path).output_path)
    )
    assert counted(optuna.load_study(study_name=cell.study_name, storage=storage)) == counted(plain)
    rates = [params["train.learning_rate"] for params, *_ in counted(plain)]
    assert len(set(rates)) == 4  # and no trial's values were drawn twice
    # The lost trial is counted and shown apart: tuned.yaml, the trial table.
    (entry,) = yaml.safe_load((spec.output_path / TUNED_FILE).read_text())["cells"]
    assert entry["trials"]["lost"] == 1
    assert entry["trials"]["complete"] + entry["trials"]["pruned"] + entry["trials"]["failed"] == 4
    table = pd.read_csv(spec.output_path / TRIALS_FILE)
    assert table["state"].tolist().count("lost") == 1 and len(table) == 5

    # More trials extend the same study by exactly the difference.
    code, out, err = run_cli(capsys, "tune", path, "--trials", "5")
    assert code == 0, out + err
    assert out.count(" trial ") == 1 and "1 lost and retried" in out
    counts = kind_counts(optuna.load_study(study_name=cell.study_name, storage=storage).trials)
    assert counts["complete"] + counts["pruned"] + counts["failed"] == 5
    document = yaml.safe_load((spec.output_path / TUNED_FILE).read_text())
    assert document["trials_per_study"] == 5


def test_a_lost_trial_keeps_the_seeds_it_finished(small_bert_dir, split_dir, tmp_path):
    # Seeds train one after another: killed while seed 1 trains, the retry keeps seed 0's finished run
    # (its validation history replayed to the pruner) and trains seed 1 only, to the uninterrupted scores.
    tune = {**TUNE, "trials": 2, "seeds": 2}
    plain_path, path, spec, cell = _uninterrupted_and_to_kill(small_bert_dir, split_dir, tmp_path, tune)
    seed_0 = cell.directory / "trial-0000" / "seed-0" / "lora"
    seed_1 = cell.directory / "trial-0000" / "seed-1" / "lora" / "config.yaml"
    kill_when(tune_command(path), seed_1.exists)  # seed 0 finished, seed 1 is training
    stamp = (seed_0 / "result.json").stat().st_mtime_ns

    resumed = subprocess.run(tune_command(path), check=True, env=ONE_THREAD, capture_output=True, text=True)
    assert "seed 0 finished before its worker was lost; kept" in resumed.stdout
    trials = optuna.load_study(study_name=cell.study_name, storage=default_storage(spec.output_path)).trials
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 0)
    retry_dir = cell.directory / f"trial-{retry.number:04d}"
    assert not (retry_dir / "seed-0").exists()  # not trained again
    assert (retry_dir / "seed-1" / "lora" / "result.json").is_file()
    assert (seed_0 / "result.json").stat().st_mtime_ns == stamp
    assert retry.user_attrs["run_dir"] == str(seed_0)
    plain = optuna.load_study(
        study_name=cell.study_name, storage=default_storage(load_spec(plain_path).output_path)
    )
    first = min(plain.trials, key=lambda t: t.number)
    assert retry.user_attrs[SEED_SCORES_ATTR] == first.user_attrs[SEED_SCORES_ATTR]
    assert retry.intermediate_values == first.intermediate_values  # what the pruner saw, step by step
    assert counted(
        optuna.load_study(study_name=cell.study_name, storage=default_storage(spec.output_path))
    ) == (counted(plain))


def _uninterrupted_and_to_kill(model, data, tmp_path, tune):
    """Two specs of one tuning: the first tuned to the end here, the second (its spec and cell returned)
    for a test to kill and resume."""
    plain_path = write_spec(_mkdir(tmp_path / "plain"), lora_grid(model, data), tune)
    path = write_spec(_mkdir(tmp_path / "killed"), lora_grid(model, data), tune)
    subprocess.run(tune_command(plain_path), check=True, env=ONE_THREAD, capture_output=True)
    spec = load_spec(path)
    (cell,) = plan_cells(spec, parse_tune(spec))
    return plain_path, path, spec, cell


def _mkdir(path):
    path.mkdir()
    return path


@pytest.mark.slow
def test_worker_processes_share_each_study_budget_exactly(capsys, small_bert_dir, split_dir, tmp_path):
    # A grace period of 10 s: on a loaded machine a live worker may be silent for a few seconds.
    path = write_spec(tmp_path, lora_grid(small_bert_dir, split_dir), {**TUNE, "heartbeat_s": 5})
    code, out, err = run_cli(capsys, "tune", path, "--workers", "2")
    assert code == 0, out + err
    spec = load_spec(path)
    (cell,) = plan_cells(spec, parse_tune(spec))
    study = optuna.load_study(study_name=cell.study_name, storage=default_storage(spec.output_path))
    counts = kind_counts(study.trials)
    # Two workers race for the last place; the loser's trial is surplus, never trained, not counted.
    assert counts["complete"] + counts["pruned"] + counts["failed"] == TUNE["trials"]
    assert not counts["lost"] and not counts["running"]
    trained = {json.dumps(t.params) for t in study.trials if trial_kind(t) != "surplus"}
    assert len(trained) == TUNE["trials"]  # each place draws its own values: no duplicate proposals


def test_a_worker_tunes_other_cells_while_the_last_place_of_one_is_held(small_bert_dir, split_dir, tmp_path):
    # The first study's only place is held by a running trial (another worker's): the worker must tune the
    # second study meanwhile, not sleep until that trial ends, and then finish once it has ended.
    grid = {**lora_grid(small_bert_dir, split_dir), "budget": [{"uniform_rank": 2}, {"uniform_rank": 1}]}
    spec = load_spec(write_spec(tmp_path, grid, {**TUNE, "trials": 1, "heartbeat_s": 600}))
    settings = parse_tune(spec)
    first, second = plan_cells(spec, settings)
    spec.output_path.mkdir()
    url = default_storage(spec.output_path)
    create_studies([first, second], settings, url)
    held = optuna.load_study(study_name=first.study_name, storage=url)
    held.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.RUNNING,
            params={"train.learning_rate": 1e-3},
            distributions={"train.learning_rate": FloatDistribution(1e-5, 1e-1, log=True)},
        )
    )
    worker = threading.Thread(target=tune_worker, args=(WorkerTask((first, second), settings, url, 0),))
    worker.start()
    other = optuna.load_study(study_name=second.study_name, storage=url)
    deadline = time.monotonic() + 60
    while not kind_counts(other.get_trials())["complete"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kind_counts(other.get_trials())["complete"] == 1, "the worker waited on the held study"
    assert worker.is_alive()  # it comes back to the held study
    held.tell(held.trials[0].number, 1.0)
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert kind_counts(held.get_trials())["complete"] == 1


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_trial_killed_before_its_first_heartbeat_is_failed_and_given_again(tmp_path):
    # Optuna creates a trial RUNNING, then starts its heartbeat thread: a process killed in between left
    # a trial with no heartbeat, which Optuna's check skips, and the resumed study waited for it forever.
    # Silence is timed from when this process first saw it, never from datetime_start: that is the
    # creating machine's local time, so a creator in another time zone writes it hours off.
    storage = open_storage(f"sqlite:///{tmp_path / 'tuning.db'}", heartbeat_s=1)
    study = optuna.create_study(study_name="s", storage=storage)

    def running(x: float, clock_off_h: float) -> int:
        started = datetime.datetime.now() + datetime.timedelta(hours=clock_off_h)
        study.add_trial(
            optuna.trial.FrozenTrial(
                number=0, trial_id=0, state=optuna.trial.TrialState.RUNNING, value=None,
                datetime_start=started, datetime_complete=None, params={"x": x},
                distributions={"x": FloatDistribution(0, 1)}, user_attrs={}, system_attrs={},
                intermediate_values={},
            )
        )  # fmt: skip
        return study.get_trials()[-1]._trial_id

    killed_east = running(0.25, clock_off_h=+5)  # creator 5 h ahead: "starts in the future"
    killed_west = running(0.5, clock_off_h=-5)  # creator 5 h behind: "5 h old" at once
    alive = running(0.75, clock_off_h=-5)  # will write its first heartbeat late, but write it
    optuna.storages.fail_stale_trials(study)
    assert [t.state.name for t in study.get_trials()] == ["RUNNING"] * 3  # silent, but not for long yet

    storage.record_heartbeat(alive)
    time.sleep(2.5)  # past the grace period (2 × heartbeat_s)
    storage.record_heartbeat(alive)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert {t._trial_id: t.state.name for t in trials[:3]} == {
        killed_east: "FAIL",
        killed_west: "FAIL",
        alive: "RUNNING",
    }
    assert sorted(t.params["x"] for t in trials[3:] if t.state.name == "WAITING") == [0.25, 0.5]  # retries
