"""`fimlora tune --retry-failed`: a trial failed by a fault of fimlora's own, fixed since, is given again
with its parameters; the failure stays on record as `retried` and stops counting, so the study's budget
is spent on trials that trained."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
import yaml
from tune_runs import lora_grid, write_spec

from fimlora.cli import main
from fimlora.sweep import load_spec
from fimlora.tune import TRIALS_FILE, TUNED_FILE, parse_tune, plan_cells
from fimlora.tune import objective as objective_module
from fimlora.tune.storage import RETRY_OF_ATTR, default_storage, kind_counts

TUNE = {"trials": 3, "metric": "loss", "sampler": {"startup_trials": 3}}


def _tune(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", *map(str, argv)])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    return out


def test_a_failed_trial_is_given_again_with_its_parameters(
    capsys, monkeypatch, small_bert_dir, split_dir, tmp_path
):
    path = write_spec(tmp_path, lora_grid(small_bert_dir, split_dir), TUNE)
    real = objective_module.run_method

    def broken_second_trial(prepared, method, run_dir, **kwargs):  # a bug that hits trial 1 only
        if "trial-0001" in str(run_dir.path):
            raise RuntimeError("added LoRA tensors need a group")
        return real(prepared, method, run_dir, **kwargs)

    monkeypatch.setattr(objective_module, "run_method", broken_second_trial)
    _tune(capsys, path)
    spec = load_spec(path)
    (cell,) = plan_cells(spec, parse_tune(spec))
    study = optuna.load_study(study_name=cell.study_name, storage=default_storage(spec.output_path))
    assert kind_counts(study.trials) == {"complete": 2, "failed": 1}
    failed_params = next(t.params for t in study.trials if t.number == 1)

    monkeypatch.setattr(objective_module, "run_method", real)  # the bug is fixed
    assert "given again" not in _tune(capsys, path)  # a plain rerun: the budget is taken, nothing runs
    out = _tune(capsys, path, "--retry-failed")
    assert "trial 1" in out and "failed (RuntimeError" in out and "given again" in out
    study = optuna.load_study(study_name=cell.study_name, storage=default_storage(spec.output_path))
    assert kind_counts(study.trials) == {"complete": 3, "retried": 1}
    retry = next(t for t in study.trials if t.user_attrs.get(RETRY_OF_ATTR) == 1)
    assert retry.params == failed_params and retry.number == 3
    (entry,) = yaml.safe_load((spec.output_path / TUNED_FILE).read_text())["cells"]
    assert entry["trials"] == {"complete": 3, "pruned": 0, "failed": 0, "lost": 0, "retried": 1}
    rows = pd.read_csv(spec.output_path / TRIALS_FILE).set_index("number")
    assert rows.loc[1, "state"] == "retried" and rows.loc[3, "retry_of"] == 1
    assert "no failed trial to give again" in _tune(capsys, path, "--retry-failed")  # nothing left


def test_tuning_workers_train_with_the_threads_asked_for(capsys, small_bert_dir, split_dir, tmp_path):
    import json

    import torch

    from fimlora.sweep.local import available_cpus

    threads, before = available_cpus() + 1, torch.get_num_threads()  # never the default
    path = write_spec(tmp_path, lora_grid(small_bert_dir, split_dir), {**TUNE, "trials": 1})
    _tune(capsys, path, "--threads", threads)
    assert torch.get_num_threads() == before  # this process's own setting is given back
    spec = load_spec(path)
    (cell,) = plan_cells(spec, parse_tune(spec))
    environment = json.loads((cell.directory / "trial-0000" / "lora" / "environment.json").read_text())
    assert environment["torch_threads"] == threads
