"""Executing runs: one run per task, in this process or in a pool of spawned worker processes.

A run that raises is reported (its key, the error, and the traceback in ``<run>/failure.txt``) and the
others go on. Nothing is retried within a sweep: invoking the sweep again re-runs exactly the runs
without a result.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fimlora.io import atomic_write_json, atomic_write_text
from fimlora.sweep.expand import FAILURE_FILE, LOG_FILE, SWEEP_FILE, PlannedRun
from fimlora.sweep.lock import run_lock


@dataclass(frozen=True)
class RunTask:
    """What a worker needs to execute one run (plain data: pickles for processes and Ray alike)."""

    key: str
    method: str
    directory: str
    config: dict[str, Any]
    record: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)  # added to result.json

    @classmethod
    def from_planned(cls, run: PlannedRun, sweep_name: str) -> RunTask:
        return cls(
            key=run.key,
            method=run.method,
            directory=str(run.directory),
            config=run.config.model_dump(mode="json"),
            record=run.record(sweep_name),
            extras=run.extras,
        )


@dataclass
class RunOutcome:
    """How one executed run ended: ``finished`` with its result.json content, or ``failed`` with an error."""

    key: str
    status: str
    seconds: float
    result: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "finished"


def available_cpus() -> int:
    """CPUs this process may use (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    return max(1, available_cpus() // max(1, workers))


def execute_run(task: RunTask, threads: int | None = None) -> RunOutcome:
    """Run one grid point with :func:`fimlora.experiment.run_experiment`; never raises for a failed run.

    What the run prints goes to ``<directory>/run.log``; a failure's traceback to
    ``<directory>/failure.txt`` (removed by a later successful attempt). Once the run finished, its
    ``sweep.json`` (grid coordinates) is written next to its ``result.json``.
    """
    import torch

    from fimlora.config import parse_config
    from fimlora.experiment import run_experiment
    from fimlora.runs import RunDirectory

    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    directory = Path(task.directory)
    try:
        config = parse_config(task.config, source=f"run {task.key}")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / FAILURE_FILE).unlink(missing_ok=True)
        with (
            run_lock(directory),
            (directory / LOG_FILE).open("w", encoding="utf-8") as log,
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
        ):
            run_experiment(config, progress=False, log=print, result_extras=task.extras)
        run = RunDirectory(directory / task.method)
        result = run.read_result()
        atomic_write_json(run.file(SWEEP_FILE), task.record)
    except Exception as exc:
        lines = str(exc).strip().splitlines() or [""]
        message = f"{type(exc).__name__}: {lines[0]}" + (" […]" if len(lines) > 1 else "")
        with contextlib.suppress(OSError):
            atomic_write_text(directory / FAILURE_FILE, traceback.format_exc())
        return RunOutcome(task.key, "failed", time.perf_counter() - start, error=message)
    return RunOutcome(task.key, "finished", time.perf_counter() - start, result=result)


def _exit_with_parent(parent: int) -> None:
    """Stop this worker if the sweep process dies (e.g. SIGKILL): an orphan would keep writing runs."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def init_worker(threads: int, parent: int) -> None:
    """Worker set-up: ``threads`` torch threads, bitsandbytes only if a run quantises, and exit when the
    ``parent`` process dies."""
    import torch

    from fimlora import lazy_bitsandbytes

    lazy_bitsandbytes.defer()

    torch.set_num_threads(threads)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def run_local(
    tasks: Sequence[RunTask],
    *,
    workers: int,
    on_outcome: Callable[[RunOutcome], None],
    threads: int | None = None,
) -> list[RunOutcome]:
    """Execute ``tasks`` in ``min(workers, len(tasks))`` spawned processes, or in this one if that is 1.

    Each worker uses ``threads`` torch threads (default ``max(1, cpus // workers)``). ``on_outcome`` is
    called in this process as each run ends, in completion order.
    """
    workers = max(1, min(workers, len(tasks)))
    threads = threads or threads_per_worker(workers)
    outcomes: list[RunOutcome] = []
    if workers == 1:
        import torch

        previous = torch.get_num_threads()
        try:
            for task in tasks:
                outcome = execute_run(task, threads)
                outcomes.append(outcome)
                on_outcome(outcome)
        finally:
            torch.set_num_threads(previous)
        return outcomes

    context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=init_worker, initargs=(threads, os.getpid())
    )
    try:
        futures: dict[Future[RunOutcome], RunTask] = {
            executor.submit(execute_run, task): task for task in tasks
        }
        for future in as_completed(futures):
            task = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # the worker process died (killed, out of memory, crashed)
                outcome = RunOutcome(task.key, "failed", 0.0, error=f"worker process died: {exc!r}")
            outcomes.append(outcome)
            on_outcome(outcome)
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown(wait=True)
    return outcomes
