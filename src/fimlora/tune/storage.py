"""Where the studies live (Optuna's RDB storage) and how their trials count against the budget.

Default storage: ``sqlite:///<store>/tuning.db``, an embedded file, nothing to start. ``--storage URL``
(e.g. ``postgresql://host/db``) lets workers on several machines share the studies.

Every trial ends in one of these kinds (the Optuna state, refined by the trial's user attributes):

- ``complete``, ``pruned``: as Optuna says;
- ``failed``: the run raised (diverging loss, invalid combination); the reason is its ``failure``;
- ``lost``: its process died (SIGKILL, power cut): Optuna's heartbeat marks it FAIL after
  2 × ``heartbeat_s`` of silence and enqueues a retry of the same parameters;
- ``surplus``: started by a worker after the study's budget was already taken by others; it never
  trained (FAIL, attribute ``surplus``).

The budget of a study is ``trials`` trials that ran to a verdict: complete + pruned + failed. Lost and
surplus trials do not count; running and waiting ones hold a place until they end.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

FAILURE_ATTR = "failure"
SURPLUS_ATTR = "surplus"
DB_FILE = "tuning.db"

TrialKind = Literal["complete", "pruned", "failed", "lost", "surplus", "running", "waiting"]
#: Kinds that count against a study's trial budget once ended, and the ones that hold a place meanwhile.
COUNTED: tuple[TrialKind, ...] = ("complete", "pruned", "failed")
PENDING: tuple[TrialKind, ...] = ("running", "waiting")


def default_storage(store: Path) -> str:
    """The SQLite file in the sweep's store."""
    return f"sqlite:///{(store / DB_FILE).resolve()}"


def open_storage(url: str, *, heartbeat_s: int) -> Any:
    """An ``optuna.storages.RDBStorage`` with heartbeats: a trial whose process died is failed after
    ``2 × heartbeat_s`` seconds of silence and retried (at most twice) with the same parameters."""
    import optuna

    engine: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several local workers write one file: wait for the lock rather than fail at once.
        engine["connect_args"] = {"timeout": 60}
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine,
        heartbeat_interval=heartbeat_s,
        grace_period=2 * heartbeat_s,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
    )


def trial_kind(trial: Any) -> TrialKind:
    """The kind of an ``optuna.trial.FrozenTrial`` (see the module docstring)."""
    from optuna.trial import TrialState

    if trial.state == TrialState.COMPLETE:
        return "complete"
    if trial.state == TrialState.PRUNED:
        return "pruned"
    if trial.state == TrialState.RUNNING:
        return "running"
    if trial.state == TrialState.WAITING:
        return "waiting"
    if trial.user_attrs.get(SURPLUS_ATTR):
        return "surplus"
    return "failed" if trial.user_attrs.get(FAILURE_ATTR) is not None else "lost"


def kind_counts(trials: Iterable[Any]) -> Counter[str]:
    return Counter(trial_kind(t) for t in trials)


def taken(trials: Iterable[Any], *, before: int | None = None) -> int:
    """Places of the budget taken: counted and pending trials (numbered below ``before``, if given)."""
    return sum(
        1 for t in trials if (before is None or t.number < before) and trial_kind(t) in (*COUNTED, *PENDING)
    )


def public_url(url: str) -> str:
    """``url`` without a password, for files and logs."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy understands: nothing to hide
        return url
