"""Two local workers on one SQLite study never claim the same waiting trial (an enqueued retry): Optuna's
claim reads WAITING and then writes RUNNING, atomic on PostgreSQL but not on SQLite, where two workers
once ran one retry side by side. fimlora's SQLite storage holds a lock file around every state change.
And a trial ended elsewhere while a worker ran it does not end that worker's tuning."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
from optuna.storages._rdb import models
from tune_runs import lora_grid, write_spec

from fimlora.cli import main
from fimlora.sweep import load_spec
from fimlora.tune import objective as objective_module
from fimlora.tune import parse_tune, plan_cells
from fimlora.tune.storage import CLAIMS_LOCK_SUFFIX, default_storage, kind_counts, open_storage


@pytest.fixture
def slow_claims(monkeypatch):
    """Widen the window between reading a trial's state and writing the new one, as a loaded machine does."""
    read = models.TrialModel.find_or_raise_by_id

    def slow(cls, *args, **kwargs):
        row = read(*args, **kwargs)
        time.sleep(0.3)
        return row

    monkeypatch.setattr(models.TrialModel, "find_or_raise_by_id", classmethod(slow))


def _claim_together(url: str, workers: int) -> list[int]:
    numbers: list[int] = []
    start = threading.Barrier(workers)

    def worker() -> None:
        study = optuna.load_study(study_name="s", storage=open_storage(url, heartbeat_s=30))
        start.wait()
        numbers.append(study.ask().number)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(numbers)


# fimlora's workers quiet these (heartbeats are experimental in Optuna; ask() is used here directly).
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_a_waiting_trial_is_claimed_by_one_worker_only(tmp_path, slow_claims):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'tuning.db'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url, heartbeat_s=30))
    study.enqueue_trial({"x": 1.0})
    # One worker gets the waiting trial 0, the other a new trial: not both trial 0.
    assert _claim_together(url, 2) == [0, 1]
    assert (tmp_path / f"tuning.db{CLAIMS_LOCK_SUFFIX}").is_file()


def test_a_trial_finished_by_another_worker_does_not_end_the_tuning(
    capsys, monkeypatch, small_bert_dir, split_dir, tmp_path
):
    path = write_spec(tmp_path, lora_grid(small_bert_dir, split_dir), {"trials": 3, "metric": "loss"})
    spec = load_spec(path)
    (cell,) = plan_cells(spec, parse_tune(spec))
    url = default_storage(spec.output_path)
    real = objective_module.run_method

    def finished_meanwhile(prepared, method, run_dir, **kwargs):  # another worker ends trial 1 meanwhile
        outcome = real(prepared, method, run_dir, **kwargs)
        if "trial-0001" in str(run_dir.path):
            other = optuna.load_study(study_name=cell.study_name, storage=url)
            (trial,) = [t for t in other.get_trials() if t.number == 1]
            other._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.COMPLETE, [0.5])
        return outcome

    monkeypatch.setattr(objective_module, "run_method", finished_meanwhile)
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", str(path)])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out  # not "ValueError: Cannot tell a COMPLETE trial"
    assert "trial 1 [" in out and "finished by another worker while this one ran it" in out
    study = optuna.load_study(study_name=cell.study_name, storage=url)
    assert kind_counts(study.trials) == {"complete": 3}
    assert [t.value for t in study.trials if t.number == 1] == [0.5]  # the other worker's record stands
