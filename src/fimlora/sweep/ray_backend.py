"""Executing runs as Ray tasks: one task per run, results written to the same store.

The store must be on a filesystem every Ray node sees at the same path, and fimlora must be installed on
every node. Ray is an optional dependency (``pip install 'fimlora[ray]'``), imported only here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fimlora.errors import FimloraError
from fimlora.sweep.local import RunOutcome, RunTask, execute_run


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise FimloraError(
            "The Ray backend needs Ray: pip install 'fimlora[ray]' (or use --backend local)."
        ) from None
    return ray


def run_ray(
    tasks: Sequence[RunTask],
    *,
    address: str | None,
    cpus_per_run: float,
    gpus_per_run: float,
    on_outcome: Callable[[RunOutcome], None],
) -> list[RunOutcome]:
    """Execute ``tasks`` as Ray tasks reserving ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs each.

    Uses the Ray connection this process already has; otherwise ``ray.init(address)``, where no address
    starts a new local instance (``"auto"`` joins a running one) that is shut down at the end. A task whose
    worker dies is reported as failed, not retried. Torch threads per run = ``max(1, int(cpus_per_run))``.
    """
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise FimloraError(
                f"Cannot start or reach Ray at {address or 'a new local instance'}: {exc}"
            ) from None
        started = True
    remote = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(execute_run)
    threads = max(1, int(cpus_per_run))
    pending: dict[Any, RunTask] = {remote.remote(task, threads): task for task in tasks}
    outcomes: list[RunOutcome] = []
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                task = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as exc:  # the worker died or the task could not be scheduled
                    outcome = RunOutcome(task.key, "failed", 0.0, error=f"Ray task failed: {exc}")
                outcomes.append(outcome)
                on_outcome(outcome)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
    return outcomes
