"""Running a sweep idempotently: finished runs are skipped, unfinished ones (re-)run, failures reported."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from fimlora.errors import FimloraError
from fimlora.io import atomic_write_json
from fimlora.processes import launched_world_size
from fimlora.sweep.expand import SWEEP_FILE, PlannedRun, budget_label, expand
from fimlora.sweep.local import RunOutcome, RunTask, run_local
from fimlora.sweep.lock import store_holder, store_lock
from fimlora.sweep.spec import SweepSpec

Backend = Literal["local", "ray"]


@dataclass
class SweepReport:
    """What a sweep invocation found and did. ``outcomes`` is in completion order."""

    runs: list[PlannedRun]
    skipped: list[PlannedRun] = field(default_factory=list)
    outcomes: list[RunOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if not o.ok]


def primary_metric(result: dict[str, Any]) -> tuple[str, float] | None:
    """The headline metric of a result: accuracy (classification) or perplexity (causal LM)."""
    metrics = result.get("metrics") or {}
    for name in ("accuracy", "perplexity"):
        if isinstance(metrics.get(name), int | float):
            return name, float(metrics[name])
    return None


def outcome_line(run: PlannedRun, outcome: RunOutcome) -> str:
    """One log line per ended run: method, seed, budget, learning rate and the headline metric."""
    a = run.axes
    what = f"{run.method} seed={a['seed']} budget={budget_label(a['budget'])} lr={a['learning_rate']:g}"
    if not outcome.ok:
        return f"FAILED {run.key}: {what}: {outcome.error}"
    metric = primary_metric(outcome.result or {})
    shown = f"{metric[0]}={metric[1]:.4f}" if metric else "no metric"
    return f"done {run.key}: {what} {shown} ({outcome.seconds:.1f} s)"


_STATUS_WORDS = {
    "finished": "done",
    "running": "running",
    "failed": "failed",
    "interrupted": "re-run",
    "new": "run",
}


def plan_lines(spec: SweepSpec, runs: list[PlannedRun]) -> list[str]:
    """The dry-run listing: a summary line, then one line per run: ``done``, ``running`` (a sweep is
    executing it now), or to run: ``run`` (new), ``re-run`` (interrupted) or ``failed`` (the last
    attempt failed)."""
    statuses = [run.status for run in runs]
    done = statuses.count("finished")
    holder = store_holder(spec.output_path)
    running = statuses.count("running")
    lines = [
        f"sweep {spec.name}: {len(runs)} runs in {spec.output_path}: {done} done, "
        + (f"{running} running, " if running else "")
        + f"{len(runs) - done - running} to run ({statuses.count('interrupted')} interrupted, "
        f"{statuses.count('failed')} failed before)"
        + (f"; a sweep (pid {holder}) is running on this store now" if holder else "")
    ]
    width = max((len(run.key) for run in runs), default=0)
    for run, status in zip(runs, statuses, strict=True):
        lines.append(f"  {_STATUS_WORDS[status]:<6} {run.key:<{width}}  {run.describe()}")
    return lines


def check_finished_data(runs: list[PlannedRun], store: Path) -> None:
    """Refuse a sweep whose finished runs were made on other data than their dataset holds now (an edited
    file): re-running the rest would put two versions of the data into one table. The data is compared
    by content (:mod:`fimlora.data.identity`), each dataset hashed once."""
    from fimlora.data import DataIdentity, data_changes

    identities: dict[str, DataIdentity] = {}
    stale: dict[str, list[str]] = {}
    for run in runs:
        if not run.run_directory.is_finished:
            continue
        config = run.config
        token = json.dumps([config.dataset, config.dataset_options.hub_config], sort_keys=True)
        if token not in identities:
            identities[token] = config.data_identity()
        try:
            recorded = run.run_directory.read_result().get("data")
        except (OSError, ValueError, AttributeError):
            recorded = None
        changed = data_changes(recorded, identities[token])
        if changed:
            stale.setdefault(changed, []).append(run.key)
    if not stale:
        return
    count = sum(len(keys) for keys in stale.values())
    parts = []
    for reason, keys in list(stale.items())[:3]:
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        parts.append(f"{reason} (run {shown})")
    raise FimloraError(
        f"{count} finished run(s) in {store} were made on other data than the spec names now: "
        f"{'; '.join(parts)}. Restore the data, or give the sweep another store (--output-dir): one "
        "table must not mix two versions of the data."
    )


def run_sweep(
    spec: SweepSpec,
    *,
    dry_run: bool = False,
    backend: Backend = "local",
    workers: int | None = None,
    threads: int | None = None,
    ray_address: str | None = None,
    cpus_per_run: float | None = None,
    gpus_per_run: float | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    log_failure: Callable[[str], None] | None = None,
    preflight: bool = True,
    tuned: str | Path | None = None,
) -> SweepReport:
    """Expand ``spec`` (validating every run first), skip finished runs, execute the rest.

    ``tuned``: a ``tuned.yaml`` written by ``fimlora tune``: every run takes its cell's tuned settings
    and is scored on the test split (see :mod:`fimlora.tune.apply`).

    Before anything runs, every run still to do is checked for what would make it refuse to start
    (:mod:`fimlora.preflight`: dataset, model, target modules, max_length, budget), unless
    ``preflight`` is off; one FimloraError lists the runs that would fail. ``workers`` (local backend
    only, default 1) is the number of worker processes; 1 runs in this process; ``threads`` the torch
    threads of each (default: the CPUs divided among the workers). ``ray_address``,
    ``cpus_per_run`` (default 1) and ``gpus_per_run`` (default 0) apply to the Ray backend only. Never
    raises for a failed run: see :attr:`SweepReport.failed`; each failure goes to ``log_failure``
    (default: ``log``) as it happens and again in the closing summary.
    """
    log_failure = log_failure or log
    if launched_world_size() > 1:
        raise FimloraError(
            "fimlora sweep was started by a multi-process launcher (WORLD_SIZE > 1): every process would "
            "run the whole sweep. Launch `fimlora run CONFIG` with torchrun for one multi-GPU run, or "
            "spread a sweep's runs with --workers or --backend ray."
        )
    if backend == "local":
        unused = [
            flag
            for flag, value in (
                ("ray address", ray_address),
                ("cpus per run", cpus_per_run),
                ("gpus per run", gpus_per_run),
            )
            if value is not None
        ]
        if unused:
            raise FimloraError(f"{', '.join(unused)}: only for the Ray backend (--backend ray).")
        if workers is not None and workers < 1:
            raise FimloraError(f"workers must be at least 1, got {workers}.")
        if threads is not None and threads < 1:
            raise FimloraError(f"threads must be at least 1, got {threads}.")
    elif backend == "ray":
        if workers is not None or threads is not None:
            raise FimloraError(
                "workers, threads: only for the local backend; with Ray, runs in parallel are limited by "
                "cpus/gpus per run."
            )
        cpus = 1.0 if cpus_per_run is None else cpus_per_run
        gpus = 0.0 if gpus_per_run is None else gpus_per_run
        if cpus <= 0 or gpus < 0:
            raise FimloraError("cpus per run must be positive and gpus per run not negative.")
    else:
        raise FimloraError(f"Unknown backend {backend!r}; use local or ray.")

    store = spec.output_path
    if store.exists() and not store.is_dir():
        raise FimloraError(f"The sweep's output_dir {store} is a file, not a directory; give a directory.")
    if tuned is None:
        runs = expand(spec)
    else:
        from fimlora.tune.apply import expand_tuned

        runs = expand_tuned(spec, Path(tuned))
    check_finished_data(runs, store)
    if preflight:
        from fimlora.preflight import check_runs

        check_runs([(run.key, run.config) for run in runs if run.status != "finished"], what="run")
    if dry_run:
        for line in plan_lines(spec, runs):
            log(line)
        return SweepReport(runs=runs, skipped=[r for r in runs if r.status == "finished"])

    # Statuses are read under the store lock: no other sweep is writing runs now.
    with store_lock(spec.output_path):
        report = SweepReport(runs=runs)
        pending: list[PlannedRun] = []
        for run in runs:
            (report.skipped if run.status == "finished" else pending).append(run)
        for run in report.skipped:  # finished, but the sweep stopped before recording its coordinates
            if not run.run_directory.file(SWEEP_FILE).exists():
                atomic_write_json(run.run_directory.file(SWEEP_FILE), run.record(spec.name))
        log(
            f"sweep {spec.name}: {len(runs)} runs, {len(report.skipped)} already done, {len(pending)} to run "
            f"({backend} backend)"
        )
        if not pending:
            return report

        by_key = {run.key: run for run in pending}
        tasks = [RunTask.from_planned(run, spec.name) for run in pending]
        bar = tqdm(total=len(pending), unit="run", desc=spec.name, disable=not progress, file=sys.stderr)

        def on_outcome(outcome: RunOutcome) -> None:
            report.outcomes.append(outcome)
            with tqdm.external_write_mode(file=sys.stderr):
                (log if outcome.ok else log_failure)(outcome_line(by_key[outcome.key], outcome))
            bar.update(1)

        try:
            if backend == "ray":
                from fimlora.sweep.ray_backend import run_ray

                run_ray(
                    tasks,
                    address=ray_address,
                    cpus_per_run=1.0 if cpus_per_run is None else cpus_per_run,
                    gpus_per_run=0.0 if gpus_per_run is None else gpus_per_run,
                    on_outcome=on_outcome,
                )
            else:
                run_local(tasks, workers=workers or 1, on_outcome=on_outcome, threads=threads)
        finally:
            bar.close()
        failed = report.failed
        log(
            f"sweep {spec.name}: {len(report.outcomes) - len(failed)} finished, "
            f"{len(report.skipped)} skipped, {len(failed)} failed"
        )
        for outcome in failed:
            log_failure(f"  failed {outcome.key}: {outcome.error}")
        return report
