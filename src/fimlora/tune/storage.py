"""Where the studies live (Optuna's RDB storage) and how their trials count against the budget.

Default storage: ``sqlite:///<store>/tuning.db``, an embedded file, nothing to start. ``--storage URL``
(e.g. ``postgresql://user@host/db``, driver: ``pip install 'fimlora[postgres]'``, psycopg 3) lets
workers on several machines share the studies. ``tuned.yaml`` records the storage without a password,
and a SQLite file relative to the spec's directory (:func:`recorded_storage`).

Every trial ends in one of these kinds (the Optuna state, refined by the trial's user attributes):

- ``complete``, ``pruned``: as Optuna says;
- ``failed``: the run raised (diverging loss, invalid combination); the reason is its ``failure``;
- ``lost``: its process died (SIGKILL, power cut): Optuna's heartbeat marks it FAIL after
  2 × ``heartbeat_s`` of silence and enqueues a retry of the same parameters;
- ``surplus``: started by a worker after the study's budget was already taken by others; it never
  trained (FAIL, attribute ``surplus``);
- ``retried``: failed, then given again with the same parameters by ``fimlora tune --retry-failed``
  (a failure of fimlora's own, since fixed; the retry names it in its attribute ``retry_of``).

The budget of a study is ``trials`` trials that ran to a verdict: complete + pruned + failed. Lost,
surplus and retried trials do not count (their retries do); running and waiting ones hold a place until
they end.
"""

from __future__ import annotations

import functools
import os
import time
from collections import Counter
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Literal

FAILURE_ATTR = "failure"
SURPLUS_ATTR = "surplus"
#: On a trial enqueued by ``--retry-failed``: the number of the failed trial it stands in for.
RETRY_OF_ATTR = "retry_of"
#: The validation score of each seed the trial finished, ``{"0": 0.77, "1": 0.51}``.
SEED_SCORES_ATTR = "seed_scores"
#: On a trial at a probe's place (``tune.probes``): the probe's index.
PROBE_ATTR = "probe"
#: ``host:pid`` of the process that ran the trial.
WORKER_ATTR = "worker"
DB_FILE = "tuning.db"
#: Beside a SQLite storage file: held while a trial's state changes (:func:`claims_lock`).
CLAIMS_LOCK_SUFFIX = ".claims.lock"

TrialKind = Literal["complete", "pruned", "failed", "retried", "lost", "surplus", "running", "waiting"]
#: Kinds that count against a study's trial budget once ended, and the ones that hold a place meanwhile.
COUNTED: tuple[TrialKind, ...] = ("complete", "pruned", "failed")
PENDING: tuple[TrialKind, ...] = ("running", "waiting")


def default_storage(store: Path) -> str:
    """The SQLite file in the sweep's store."""
    return f"sqlite:///{(store / DB_FILE).resolve()}"


def engine_url(url: str) -> str:
    """``url`` with the PostgreSQL driver named: SQLAlchemy's plain ``postgresql://`` means psycopg2,
    fimlora's ``postgres`` extra installs psycopg 3; a URL that names its driver is kept."""
    if url.startswith(("postgresql://", "postgres://")):
        import importlib.util

        if importlib.util.find_spec("psycopg2") is None:
            return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_storage(url: str, *, heartbeat_s: int, attempts: int = 5) -> Any:
    """An ``optuna.storages.RDBStorage`` with heartbeats: a trial whose process died is failed after
    ``2 × heartbeat_s`` seconds of silence and retried (at most twice) with the same parameters.

    Processes that start together on an empty database race to create its tables; the loser's error
    is transient, so opening is retried (``attempts`` times).
    """
    import optuna
    import sqlalchemy.exc

    engine: dict[str, Any] = {}
    lock = claims_lock(url)
    if url.startswith("sqlite"):
        # Several local workers write one file: wait for the lock rather than fail at once.
        engine["connect_args"] = {"timeout": 60}
    kind = functools.partial(_fimlora_storage(), lock)
    for attempt in range(attempts):
        try:
            return kind(
                engine_url(url),
                engine_kwargs=engine,
                heartbeat_interval=heartbeat_s,
                grace_period=2 * heartbeat_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
            )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite ``url`` (None: another database, or SQLite in memory)."""
    if not url.startswith("sqlite:///") or url == "sqlite:///:memory:":
        return None
    return Path(url.removeprefix("sqlite:///"))


def claims_lock(url: str) -> Path | None:
    """The lock file that serialises trial state changes on the SQLite file of ``url`` (None: not a
    SQLite file)."""
    path = sqlite_file(url)
    return None if path is None else path.with_name(path.name + CLAIMS_LOCK_SUFFIX)


@functools.cache
def _fimlora_storage() -> type:
    """``RDBStorage`` with two repairs (the class is built on first use: Optuna loads lazily).

    - A trial whose heartbeat never arrived is stale too. Optuna creates a trial RUNNING and then starts
      its heartbeat thread; a process killed before that thread's first write left a trial that
      Optuna's check skips (it has no heartbeat to be late), so the study waited for it forever (seen
      under load: the trial's config was written, its heartbeat was not). Here such a trial is failed,
      and retried, once this process has seen it without a heartbeat for the grace period. That
      waiting is timed on this process's own monotonic clock, not against the trial's
      ``datetime_start``: Optuna writes that in the creating machine's local time, so across machines
      in other time zones (PostgreSQL) it would fail a trial in its first second, or never.
    - On SQLite (``lock`` not None), every trial state change holds :func:`claims_lock`. Optuna claims
      a waiting trial (an enqueued retry) by reading it WAITING and then writing RUNNING, and fails a
      stale one by reading RUNNING and writing FAIL; PostgreSQL makes each atomic (``SELECT … FOR
      UPDATE``), SQLite does not, so two local workers could both claim one retry and run it twice, or
      both fail one stale trial and enqueue two retries of it (seen: two workers ran one trial side by
      side, appending to one log).
    """
    import optuna
    from optuna.storages._rdb import models

    from fimlora.sweep.lock import exclusive

    class FimloraStorage(optuna.storages.RDBStorage):  # type: ignore[misc]
        def __init__(self, lock: Path | None, *args: Any, **kwargs: Any) -> None:
            self.claims_lock = lock
            # trial id -> when this storage first saw that trial RUNNING without a heartbeat (a worker
            # keeps one storage across its passes over the studies, so the waiting carries over).
            self.first_seen_silent: dict[int, float] = {}
            super().__init__(*args, **kwargs)

        def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
            if self.claims_lock is None:
                return bool(super().set_trial_state_values(trial_id, state, values))
            with exclusive(self.claims_lock):
                return bool(super().set_trial_state_values(trial_id, state, values))

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            stale = list(super()._get_stale_trial_ids(study_id))
            grace_s = self.grace_period or 2 * (self.heartbeat_interval or 0)
            now = time.monotonic()
            session = self.scoped_session()
            try:
                silent = [
                    trial.trial_id
                    for trial in session.query(models.TrialModel)
                    .filter(models.TrialModel.state == optuna.trial.TrialState.RUNNING)
                    .filter(models.TrialModel.study_id == study_id)
                    .all()
                    if not trial.heartbeats
                ]
            finally:
                session.close()
            for trial_id in silent:
                first_seen = self.first_seen_silent.setdefault(trial_id, now)
                if now - first_seen > grace_s:
                    stale.append(trial_id)
            return stale

    return FimloraStorage


def recorded_storage(url: str, spec_dir: Path) -> str:
    """The storage as ``tuned.yaml`` records it: without a password, and a SQLite file as a path
    relative to the spec's directory (``sqlite:///runs-tuned/tuning.db``), not of this machine."""
    path = sqlite_file(url)
    if path is not None and path.is_absolute():
        return f"sqlite:///{Path(os.path.relpath(path, spec_dir.resolve())).as_posix()}"
    return public_url(url)


def retried_numbers(trials: Iterable[Any]) -> frozenset[int]:
    """The failed trials of a study that a later trial retries (``retry_of``)."""
    return frozenset(int(t.user_attrs[RETRY_OF_ATTR]) for t in trials if RETRY_OF_ATTR in t.user_attrs)


def trial_kind(trial: Any, retried: Collection[int] = frozenset()) -> TrialKind:
    """The kind of an ``optuna.trial.FrozenTrial`` (see the module docstring); ``retried``: the study's
    :func:`retried_numbers`."""
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
    if trial.user_attrs.get(FAILURE_ATTR) is None:
        return "lost"
    return "retried" if trial.number in retried else "failed"


def kind_counts(trials: Iterable[Any]) -> Counter[str]:
    trials = list(trials)
    retried = retried_numbers(trials)
    return Counter(trial_kind(t, retried) for t in trials)


def taken(trials: Iterable[Any], *, before: int | None = None) -> int:
    """Places of the budget taken: counted and pending trials (numbered below ``before``, if given)."""
    trials = list(trials)
    retried = retried_numbers(trials)
    return sum(
        1
        for t in trials
        if (before is None or t.number < before) and trial_kind(t, retried) in (*COUNTED, *PENDING)
    )


def trial_step(seed_index: int, step: int, steps: int) -> int:
    """The step under which a trial reports its ``seed_index``-th seed's validation score at training
    ``step`` (its seeds train one after another, ``steps`` steps each)."""
    return seed_index * (steps + 1) + step


def seed_and_step(reported: int, steps: int) -> tuple[int, int]:
    """The inverse of :func:`trial_step`: ``(seed index, training step)``."""
    return divmod(reported, steps + 1)


def public_url(url: str) -> str:
    """``url`` without a password, for files and logs."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy understands: nothing to hide
        return url
