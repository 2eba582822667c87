"""Running sweeps on tiny models: dry run, skip-done, resume, failures, local workers and Ray agree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from processes import fimlora_command, kill_when
from safetensors.torch import load_file

from fimlora.cli import main
from fimlora.errors import FimloraError
from fimlora.sweep import SWEEP_FILE, expand, load_spec, run_sweep
from fimlora.sweep.lock import LOCK_FILE


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def file_stamps(root: Path) -> dict[str, int]:
    """Modification times of the run files (not the lock, which each sweep invocation takes)."""
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and p.name != LOCK_FILE
    }


def assert_same_results(store_a: Path, store_b: Path, runs) -> None:
    """Same metrics, allocation and bit-identical adapter weights, run by run."""
    for run in runs:
        a, b = store_a / run.key / run.method, store_b / run.key / run.method
        result_a = json.loads((a / "result.json").read_text())
        result_b = json.loads((b / "result.json").read_text())
        assert result_a["metrics"] == result_b["metrics"], run.key
        assert result_a["allocation"] == result_b["allocation"], run.key
        weights_a = load_file(str(a / "adapter" / "adapter_model.safetensors"))
        weights_b = load_file(str(b / "adapter" / "adapter_model.safetensors"))
        assert weights_a.keys() == weights_b.keys()
        for name in weights_a:
            assert weights_a[name].equal(weights_b[name]), (run.key, name)


def spec_file(directory: Path, grid: dict, defaults: dict, output_dir: str = "runs") -> Path:
    path = directory / "sweep.yaml"
    spec = {"name": "tiny", "output_dir": output_dir, "defaults": defaults, "grid": grid}
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def grid(tiny_bert_dir, reviews_csv) -> dict:
    """Two tiny runs: lora and fim-lora at seed 0."""
    return {
        "model": [str(tiny_bert_dir)],
        "dataset": [str(reviews_csv)],
        "method": ["lora", "fim-lora"],
        "budget": [{"uniform_rank": 2}],
        "seed": [0],
        "learning_rate": [1e-2],
    }


@pytest.fixture(scope="module")
def serial(grid, defaults, tmp_path_factory):
    """The two runs, done once in this process (workers=1): (spec path, store, planned runs)."""
    path = spec_file(tmp_path_factory.mktemp("serial"), grid, defaults)
    spec = load_spec(path)
    report = run_sweep(spec, progress=False, log=lambda _: None)
    assert [o.status for o in report.outcomes] == ["finished", "finished"]
    return path, spec.output_path, expand(spec)


def test_dry_run_lists_and_runs_nothing(capsys, grid, defaults, tmp_path):
    path = spec_file(tmp_path, grid, defaults)
    code, out, _ = run_cli(capsys, "sweep", path, "--dry-run")
    assert code == 0
    assert "2 runs" in out and "0 done, 2 to run" in out
    runs = expand(load_spec(path))
    for run in runs:
        assert f"run    {run.key}" in out and f"method={run.method}" in out
    assert not (tmp_path / "runs").exists()


def test_finished_runs_are_skipped_and_untouched(capsys, serial):
    path, store, runs = serial
    for run in runs:
        assert run.run_directory.is_finished
        record = json.loads(run.run_directory.file(SWEEP_FILE).read_text())
        assert record == {"name": "tiny", "key": run.key, **run.axes}
        assert record["method"] == run.method and record["seed"] == 0 and record["learning_rate"] == 1e-2
        assert "Fisher" in (store / run.key / "run.log").read_text() or run.method == "lora"
    before = file_stamps(store)
    code, out, err = run_cli(capsys, "sweep", path)
    assert code == 0, err
    assert "2 already done, 0 to run" in out
    assert file_stamps(store) == before
    code, out, _ = run_cli(capsys, "sweep", path, "--dry-run")
    assert "2 done, 0 to run" in out


def test_an_interrupted_run_is_rerun_cleanly(capsys, serial, tmp_path):
    path, store, runs = serial
    copy = tmp_path / "runs"
    shutil.copytree(store, copy)
    spec_path = shutil.copy(path, tmp_path / "sweep.yaml")  # its output_dir "runs" → the copy
    kept, interrupted = runs
    unfinished = copy / interrupted.key / interrupted.method
    (unfinished / "result.json").unlink()
    (unfinished / "half-written.tmp").write_text("partial")
    # a run that finished just before its sweep was killed has no sweep.json yet: it is written now
    (copy / kept.key / kept.method / SWEEP_FILE).unlink()
    kept_stamps = file_stamps(copy / kept.key)

    code, out, _ = run_cli(capsys, "sweep", spec_path, "--dry-run")
    assert "1 done, 1 to run (1 interrupted, 0 failed before)" in out and f"re-run {interrupted.key}" in out
    code, out, err = run_cli(capsys, "sweep", spec_path, "--no-progress")
    assert code == 0, err
    assert f"done {interrupted.key}: fim-lora seed=0 budget=r2 lr=0.01 accuracy=" in out
    assert "1 finished, 1 skipped, 0 failed" in out
    assert not (unfinished / "half-written.tmp").exists()
    assert (copy / kept.key / kept.method / SWEEP_FILE).is_file()
    assert {
        k: v for k, v in file_stamps(copy / kept.key).items() if not k.endswith(SWEEP_FILE)
    } == kept_stamps
    assert_same_results(store, copy, runs)


def test_a_failing_run_does_not_stop_the_others(capsys, monkeypatch, grid, defaults, tmp_path):
    """A run that fails while it trains (nothing a pre-check could see): the other runs, exit code 1, and
    the failure on stderr."""
    import fimlora.experiment

    path = spec_file(tmp_path, {**grid, "learning_rate": [1e-2, 0.5], "method": ["lora"]}, defaults)
    good, bad = expand(load_spec(path))
    assert bad.config.train.learning_rate == 0.5
    real = fimlora.experiment.run_experiment

    def diverging(config, **kwargs):
        if config.train.learning_rate == 0.5:
            raise FimloraError("Training loss became nan at step 1; lower the learning rate.")
        return real(config, **kwargs)

    monkeypatch.setattr(fimlora.experiment, "run_experiment", diverging)
    code, out, err = run_cli(capsys, "sweep", path, "--no-progress")
    assert code == 1
    assert f"FAILED {bad.key}: lora seed=0" in err and "loss became nan" in err
    assert f"failed {bad.key}" in err and "FAILED" not in out
    assert f"done {good.key}" in out and "1 finished, 0 skipped, 1 failed" in out
    assert good.run_directory.is_finished and not bad.run_directory.is_finished
    assert "Traceback" in (bad.directory / "failure.txt").read_text()
    assert "Traceback" not in err
    code, out, _ = run_cli(capsys, "sweep", path, "--dry-run")
    assert "1 done, 1 to run (0 interrupted, 1 failed before)" in out and f"failed {bad.key}" in out


def test_runs_that_would_fail_stop_the_sweep_before_anything_runs(capsys, grid, defaults, tmp_path):
    missing = str(tmp_path / "no-such-data.csv")
    budgets = [{"uniform_rank": 2}, {"params": 100}]  # 100 parameters cannot give 24 modules rank 1
    changed = {**grid, "dataset": [*grid["dataset"], missing], "method": ["lora"], "budget": budgets}
    path = spec_file(tmp_path, changed, defaults)
    assert len(expand(load_spec(path))) == 4
    for extra in ([], ["--dry-run"]):
        code, _, err = run_cli(capsys, "sweep", path, "--no-progress", *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "3 of 4 run(s) would fail before training, so nothing was started" in err
        assert "no-such-data.csv' does not exist" in err and "A budget of 100 trainable parameters" in err
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_dry_run_tells_a_running_run_from_an_interrupted_one(capsys, grid, defaults, tmp_path):
    path = spec_file(tmp_path, grid, defaults)
    first, second = expand(load_spec(path))
    started = first.run_directory.path
    started.mkdir(parents=True)
    (started / "config.yaml").write_text("started\n", encoding="utf-8")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path\n"
            "from fimlora.sweep.lock import run_lock, store_lock\n"
            "with store_lock(Path(sys.argv[1])), run_lock(Path(sys.argv[2])):\n"
            "    print('locked', flush=True); time.sleep(60)",
            str(first.directory.parent),
            str(first.directory),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        code, out, _ = run_cli(capsys, "sweep", path, "--dry-run")
        assert code == 0
        assert "0 done, 1 running, 1 to run (0 interrupted, 0 failed before)" in out
        assert f"a sweep (pid {holder.pid}) is running on this store now" in out
        assert f"running {first.key}" in out and f"run    {second.key}" in out
    finally:
        holder.kill()  # the kernel drops both locks with their holder
        holder.wait()
    code, out, _ = run_cli(capsys, "sweep", path, "--dry-run")
    assert "0 done, 2 to run (1 interrupted, 0 failed before)" in out and f"re-run {first.key}" in out
    assert "is running on this store" not in out


def test_two_local_workers_give_the_same_results(serial, tmp_path):
    path, store, runs = serial
    spec = load_spec(shutil.copy(path, tmp_path / "sweep.yaml"))
    lines: list[str] = []
    report = run_sweep(spec, workers=2, progress=False, log=lines.append)
    assert [o.status for o in report.outcomes] == ["finished", "finished"], lines
    assert len([line for line in lines if line.startswith("done ")]) == 2
    assert_same_results(store, tmp_path / "runs", runs)


def test_threads_per_worker_are_what_was_asked_and_recorded(capsys, serial, tmp_path):
    # More threads than this machine's CPUs: never the default (the CPUs divided among the workers).
    from fimlora.sweep.local import available_cpus

    path, _, runs = serial
    threads = available_cpus() + 1
    spec_path = shutil.copy(path, tmp_path / "sweep.yaml")
    code, out, err = run_cli(capsys, "sweep", spec_path, "--workers", "2", "--threads", threads)
    assert code == 0, out + err
    for run in runs:
        environment = json.loads((tmp_path / "runs" / run.key / run.method / "environment.json").read_text())
        assert environment["torch_threads"] == threads, run.key
    code, _, err = run_cli(capsys, "sweep", spec_path, "--threads", "0")
    assert code == 2 and "threads must be at least 1" in err


def test_ray_backend(capsys, serial, tmp_path):
    ray = pytest.importorskip("ray")
    path, store, runs = serial
    spec_path = shutil.copy(path, tmp_path / "sweep.yaml")
    # A fresh local instance (never a cluster another process started); 2 CPUs per run: one Ray worker
    # runs both, so torch and friends are imported once.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code, out, err = run_cli(capsys, "sweep", spec_path, "--backend", "ray", "--cpus-per-run", "2")
        assert ray.is_initialized()  # a connection the caller made is left alone
        # Keys are stable across processes: another interpreter (another str hash seed) finds the same.
        elsewhere = ray.remote(lambda path: (os.getpid(), [r.key for r in expand(load_spec(path))]))
        pid, keys = ray.get(elsewhere.remote(spec_path))
        assert pid != os.getpid() and keys == [run.key for run in runs]
    finally:
        ray.shutdown()
    assert code == 0, out + err
    assert "2 finished, 0 skipped, 0 failed" in out
    assert_same_results(store, tmp_path / "runs", runs)
    code, out, _ = run_cli(capsys, "sweep", spec_path, "--backend", "ray", "--no-progress")
    assert code == 0 and "2 already done, 0 to run" in out and not ray.is_initialized()


def test_resume_after_the_sweep_process_is_killed(capsys, grid, defaults, tmp_path):
    """Kill a real sweep once its first run finished and its second started; rerun: only the second runs."""
    slow = {**defaults, "train": {**defaults["train"], "steps": 20}}
    path = spec_file(tmp_path, grid, slow)
    first, second = expand(load_spec(path))
    kill_when(
        fimlora_command("sweep", path, "--no-progress"),
        lambda: first.run_directory.is_finished and (second.run_directory.path / "config.yaml").exists(),
        timeout_s=120,
    )
    assert not second.run_directory.is_finished
    first_stamps = file_stamps(first.directory)

    code, out, err = run_cli(capsys, "sweep", path, "--no-progress")
    assert code == 0, err
    assert "1 already done, 1 to run" in out and f"done {second.key}" in out
    assert second.run_directory.is_finished
    assert file_stamps(first.directory) == first_stamps


def test_a_second_sweep_on_the_same_store_is_refused(capsys, serial, tmp_path):
    path, _, _ = serial
    spec_path = shutil.copy(path, tmp_path / "sweep.yaml")
    store = tmp_path / "runs"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from fimlora.sweep.lock import store_lock\n"
            "with store_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)",
            str(store),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        code, out, err = run_cli(capsys, "sweep", spec_path, "--no-progress")
        assert code != 0 and f"Another sweep (pid {holder.pid}) is running on" in err
        assert "Traceback" not in err
        assert not any(p.is_dir() for p in store.iterdir())  # nothing was started
        code, out, _ = run_cli(capsys, "sweep", spec_path, "--dry-run")  # looking is always allowed
        assert code == 0 and "0 done, 2 to run" in out
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with its holder, nothing stale remains
        holder.wait()
    code, out, err = run_cli(capsys, "sweep", spec_path, "--no-progress")
    assert code == 0, err
    assert "2 finished, 0 skipped, 0 failed" in out


def test_a_sweep_under_a_multi_process_launcher_is_refused(capsys, monkeypatch, grid, defaults, tmp_path):
    path = spec_file(tmp_path, grid, defaults)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(capsys, "sweep", path)
    assert code == 2 and "multi-process launcher" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_output_dir_option_puts_the_same_runs_in_another_store(capsys, serial, tmp_path):
    path, store, runs = serial
    other = tmp_path / "elsewhere"
    code, out, _ = run_cli(capsys, "sweep", path, "--dry-run", "--output-dir", other)
    assert code == 0 and f"in {other.resolve()}: 0 done, 2 to run" in out
    for run in runs:
        assert f"run    {run.key}" in out  # the keys do not depend on the store
    code, out, err = run_cli(capsys, "sweep", path, "--no-progress", "--output-dir", other)
    assert code == 0, err
    assert_same_results(store, other, runs)


def test_a_data_file_edited_in_place_is_refused_before_anything_runs(
    capsys, tiny_bert_dir, reviews_csv, defaults, tmp_path
):
    data = Path(shutil.copy(reviews_csv, tmp_path / "reviews.csv"))
    grid = {"model": [str(tiny_bert_dir)], "dataset": [str(data)], "method": ["lora"], "seed": [0, 1]}
    path = spec_file(tmp_path, grid, defaults)
    spec = load_spec(path)
    first, second = expand(spec)
    # One run finished, one still to do: running the second on edited data would mix the two versions.
    run_sweep(spec.model_copy(update={"grid": spec.grid.model_copy(update={"seed": [0]})}), progress=False,
              log=lambda _: None)  # fmt: skip
    assert first.run_directory.is_finished and not second.run_directory.path.exists()
    store = spec.output_path
    before = file_stamps(store)
    data.write_text(data.read_text(encoding="utf-8").replace("film", "movie", 1), encoding="utf-8")
    for argv in (["sweep", path], ["sweep", path, "--dry-run"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"data file {data} changed (sha256" in err and first.key in err and "--output-dir" in err
    assert file_stamps(store) == before and not second.run_directory.path.exists()
    # Another store takes the edited data whole: every run there reads the new version.
    code, _, err = run_cli(capsys, "sweep", path, "--output-dir", tmp_path / "edited")
    assert code == 0, err
