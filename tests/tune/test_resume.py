"""A killed tuning resumes: a real SIGKILL of `fimlora tune` loses only the trial that was running, and the
rerun completes the study with the budget it was given; --trials extends it; workers share the budget."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from tune_runs import write_spec

from fimlora.cli import main
from fimlora.sweep import load_spec
from fimlora.tune import TUNED_FILE, parse_tune, plan_cells
from fimlora.tune.storage import default_storage, kind_counts, trial_kind


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def grid(model, data) -> dict:
    return {
        "model": [str(model)],
        "dataset": [str(data)],
        "method": ["lora"],
        "budget": [{"uniform_rank": 2}],
        "seed": [0],
    }


TUNE = {"trials": 3, "metric": "loss", "eval_every": 2, "heartbeat_s": 1, "sampler": {"startup_trials": 2}}


def test_a_killed_tuning_resumes_and_loses_only_the_running_trial(
    capsys, small_bert_dir, split_dir, tmp_path
):
    path = write_spec(tmp_path, grid(small_bert_dir, split_dir), TUNE)
    spec = load_spec(path)
    (cell,) = plan_cells(spec, parse_tune(spec))
    second = cell.directory / "trial-0001" / "lora" / "config.yaml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fimlora.cli", "tune", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 300
        while not second.exists():  # the first trial finished, the second is training
            assert proc.poll() is None, "the tuning ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    storage = default_storage(spec.output_path)
    study = optuna.load_study(study_name=cell.study_name, storage=storage)
    assert [trial_kind(t) for t in study.trials] == ["complete", "running"]
    first_result = cell.directory / "trial-0000" / "lora" / "result.json"
    first_stamp = first_result.stat().st_mtime_ns

    code, out, err = run_cli(capsys, "tune", path)
    assert code == 0, out + err
    trials = optuna.load_study(study_name=cell.study_name, storage=storage).trials
    counts = kind_counts(trials)
    assert counts["complete"] + counts["pruned"] + counts["failed"] == 3
    assert counts["lost"] == 1 and trial_kind(trials[1]) == "lost"  # only the trial that was running
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 1)
    assert retry.params == trials[1].params and trial_kind(retry) != "lost"  # re-run, same values
    assert first_result.stat().st_mtime_ns == first_stamp  # the finished trial was not touched
    (entry,) = yaml.safe_load((spec.output_path / TUNED_FILE).read_text())["cells"]
    assert sum(entry["trials"].values()) == 3

    # More trials extend the same study by exactly the difference.
    code, out, err = run_cli(capsys, "tune", path, "--trials", "4")
    assert code == 0, out + err
    assert out.count(" trial ") == 1
    counts = kind_counts(optuna.load_study(study_name=cell.study_name, storage=storage).trials)
    assert counts["complete"] + counts["pruned"] + counts["failed"] == 4
    document = yaml.safe_load((spec.output_path / TUNED_FILE).read_text())
    assert document["trials_per_study"] == 4 and sum(document["cells"][0]["trials"].values()) == 4


@pytest.mark.slow
def test_worker_processes_share_each_study_budget_exactly(capsys, small_bert_dir, split_dir, tmp_path):
    # A grace period of 10 s: on a loaded machine a live worker may be silent for a few seconds.
    path = write_spec(tmp_path, grid(small_bert_dir, split_dir), {**TUNE, "heartbeat_s": 5})
    code, out, err = run_cli(capsys, "tune", path, "--workers", "2")
    assert code == 0, out + err
    spec = load_spec(path)
    (cell,) = plan_cells(spec, parse_tune(spec))
    study = optuna.load_study(study_name=cell.study_name, storage=default_storage(spec.output_path))
    counts = kind_counts(study.trials)
    # Two workers race for the last place; the loser's trial is surplus, never trained, not counted.
    assert counts["complete"] + counts["pruned"] + counts["failed"] == 3
    assert not counts["lost"] and not counts["running"]
    trained = {json.dumps(t.params) for t in study.trials if trial_kind(t) != "surplus"}
    assert len(trained) == 3  # worker k samples with seed + k: no duplicate proposals
