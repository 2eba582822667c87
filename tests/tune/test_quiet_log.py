"""A surplus trial (it lost the race for a study's last place and trained nothing) is not logged as a
failure with a traceback; a trial that really failed still is."""

from __future__ import annotations

import logging

import optuna

from fimlora.tune.objective import SurplusTrial
from fimlora.tune.study import quiet_optuna


def test_a_surplus_trial_is_not_reported_as_a_failure_while_a_real_failure_is() -> None:
    quiet_optuna()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("optuna").addHandler(handler)

    def objective(trial: optuna.Trial) -> float:
        if trial.number == 0:
            raise SurplusTrial("trial 0: the study's 2 trials are taken")
        if trial.number == 1:
            raise RuntimeError("the loss is not finite")
        return 1.0

    try:
        study = optuna.create_study()
        study.optimize(objective, n_trials=3, catch=(SurplusTrial, RuntimeError))
    finally:
        logging.getLogger("optuna").removeHandler(handler)
    messages = [record.getMessage() for record in records]
    assert not [m for m in messages if m.startswith("Trial 0 ")], messages
    assert any(m.startswith("Trial 1 failed with parameters") for m in messages), messages
    assert any(m.startswith("Trial 1 failed with value") for m in messages), messages
    quiet_optuna()  # a second call (each worker makes one) adds no second filter
    assert len(logging.getLogger("optuna.study._optimize").filters) == 1
