"""Two local workers on one SQLite study never claim the same waiting trial (an enqueued retry): Optuna's
claim reads WAITING and then writes RUNNING, atomic on PostgreSQL but not on SQLite, where two workers
once ran one retry side by side. fimlora's SQLite storage holds a lock file around every state change."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
from optuna.storages._rdb import models

from fimlora.tune.storage import CLAIMS_LOCK_SUFFIX, open_storage


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
