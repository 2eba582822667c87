"""Tuning across machines: two `fimlora tune` processes share one study on a real PostgreSQL server (started
here, from the `pgserver` wheel: nothing pre-installed; as root it runs the server as an unprivileged
user). Each cell ends with exactly its trials, no trial runs twice, and a SIGKILL of one process loses
no finished trial: its running trial is retried by the other."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
import yaml
from tune_runs import write_spec

from fimlora.sweep import load_spec
from fimlora.tune import TUNED_FILE, parse_tune, plan_cells
from fimlora.tune.storage import WORKER_ATTR, engine_url, kind_counts, trial_kind

TRIALS = 4
TUNE = {
    "trials": TRIALS,
    "metric": "loss",
    "eval_every": 2,
    "heartbeat_s": 2,  # a killed process's trial is failed and retried after 4 s of silence
    "sampler": {"startup_trials": 2},
}
# A log line of a trial that ran to its verdict: "lora r1 (model, data) trial 3 [lr=0.01]: loss 0.69 (1 s)".
FINISHED = re.compile(r"^(lora r\d) \(.*\) trial (\d+) \[[^\]]*\]: (loss|pruned|failed)", re.MULTILINE)


@pytest.fixture(scope="module")
def postgres_url():
    import pgserver

    # Not below pytest's private temporary directory: the server's own user must reach its data directory.
    server = pgserver.get_server(Path(tempfile.mkdtemp(prefix="fimlora-postgres-")), cleanup_mode="delete")
    try:
        yield server.get_uri()  # postgresql://postgres:@/postgres?host=<socket directory>
    finally:
        server.cleanup()


def test_two_processes_share_the_studies_and_a_killed_one_loses_no_finished_trial(
    small_bert_dir, split_dir, tmp_path, postgres_url
):
    grid = {
        "model": [str(small_bert_dir)],
        "dataset": [str(split_dir)],
        "method": ["lora"],
        "budget": [{"uniform_rank": 1}, {"uniform_rank": 2}],  # two cells
        "seed": [0],
    }
    path = write_spec(tmp_path, grid, TUNE)
    spec = load_spec(path)
    cells = plan_cells(spec, parse_tune(spec))
    command = [sys.executable, "-m", "fimlora.cli", "tune", str(path), "--storage", postgres_url]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # b's log survives its kill
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("a", "b")}
    # Started together on an empty database: both create the tables and the studies.
    a, b = (subprocess.Popen(command, stdout=logs[n], stderr=subprocess.STDOUT, env=env) for n in ("a", "b"))
    # One storage for every read below, made once the processes have started (so that they still find
    # an empty database): a URL per load_study opened a new connection pool each time, and polling every
    # 50 ms under load ran the server out of connections ("too many clients already").
    storage = None
    try:
        deadline = time.monotonic() + 150
        finished_before: dict[tuple[str, int], float] = {}
        while True:  # until b trains a trial while some trial has finished
            assert a.poll() is None and b.poll() is None, "a tuning ended before b could be killed"
            assert time.monotonic() < deadline, "b never ran a trial"
            try:
                storage = storage or optuna.storages.RDBStorage(engine_url(postgres_url))
                studies = {
                    c.study_name: optuna.load_study(study_name=c.study_name, storage=storage) for c in cells
                }
            except (KeyError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError):
                time.sleep(0.2)  # not created yet (the tables, or the studies)
                continue
            trials = {name: study.get_trials() for name, study in studies.items()}
            of_b = [
                t
                for ts in trials.values()
                for t in ts
                if t.user_attrs.get(WORKER_ATTR, "").endswith(f":{b.pid}")
            ]
            # b has run a trial to its verdict and has just started another (so it dies mid-trial, not in
            # the instant the trial ends): whatever the two processes' relative speed.
            b_finished = any(t.state.is_finished() for t in of_b)
            running_b = [
                t
                for t in of_b
                if t.state == optuna.trial.TrialState.RUNNING
                and t.datetime_start is not None
                and (datetime.now() - t.datetime_start).total_seconds() < 0.3
            ]
            finished_before = {
                (name, t.number): t.value
                for name, ts in trials.items()
                for t in ts
                if trial_kind(t) == "complete"
            }
            if running_b and b_finished and finished_before:
                b.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        b.wait()
        assert a.wait(timeout=150) == 0
    finally:
        for proc in (a, b):
            proc.kill()
            proc.wait()
        for log in logs.values():
            log.close()
    output = {name: (tmp_path / f"{name}.log").read_text() for name in ("a", "b")}
    assert "Traceback" not in output["a"], output["a"]

    runs = {name: {m.group(1, 2) for m in FINISHED.finditer(text)} for name, text in output.items()}
    lost_total = 0
    for cell in cells:
        trials = optuna.load_study(study_name=cell.study_name, storage=storage).get_trials()
        counts = kind_counts(trials)
        # Exactly the spec's trials, nothing left running or waiting.
        assert counts["complete"] + counts["pruned"] + counts["failed"] == TRIALS, counts
        assert not counts["running"] and not counts["waiting"]
        counted = [t for t in trials if trial_kind(t) in ("complete", "pruned", "failed")]
        assert len({str(t.params) for t in counted}) == TRIALS  # no trial's values run twice
        for lost in (t for t in trials if trial_kind(t) == "lost"):  # b's trial, retried by a
            assert lost.user_attrs[WORKER_ATTR].endswith(f":{b.pid}")
            (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
            assert retry.params == lost.params and retry.user_attrs[WORKER_ATTR].endswith(f":{a.pid}")
            lost_total += 1
        # Every trial that had finished when b was killed is still there, unchanged, and counts.
        for (name, number), value in finished_before.items():
            if name == cell.study_name:
                (same,) = [t for t in trials if t.number == number]
                assert trial_kind(same) == "complete" and same.value == value
    assert lost_total == 1
    # Each process logs the trials it ran to a verdict: none was run by both, and together they ran every
    # counted trial (b's lost one excepted).
    assert runs["a"] and runs["b"] and not runs["a"] & runs["b"]
    assert len(runs["a"] | runs["b"]) == len(cells) * TRIALS
    document = yaml.safe_load((spec.output_path / TUNED_FILE).read_text())
    assert document["storage"].startswith("postgresql://postgres:***@/postgres?host=")  # password hidden
    assert sum(c["trials"]["lost"] for c in document["cells"]) == 1
