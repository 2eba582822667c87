"""Running the studies: Optuna's own ``study.optimize`` in each worker process, coordinated by the storage.

Every study gets a TPE sampler with the same seed, whose randomness for each trial is derived from that
seed and the trial's place in the budget (so a resumed study draws what an uninterrupted one would, and
parallel workers do not propose the same values), the same number of random start-up trials, the same
seed-by-seed median pruner (:mod:`fimlora.tune.search`) and the same budget of ``trials`` trials (see
:mod:`fimlora.tune.storage` for what counts). Each worker walks the cells in order and, for each,
optimises until the budget is taken; when the last places of a study are held by running trials (another
worker's, or a dead worker's that the heartbeat will fail and retry), it goes on with the next cells and
comes back to that study, waiting only once no cell has a trial left to start. Running ``fimlora tune``
again resumes every study where it stopped.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fimlora.errors import FimloraError
from fimlora.preflight import check_runs
from fimlora.processes import launched_world_size
from fimlora.sweep.local import init_worker, threads_per_worker
from fimlora.sweep.spec import SweepSpec
from fimlora.tune.cells import TUNING_SPLITS, Cell, plan_cells, tuning_seeds
from fimlora.tune.objective import Objective, PreparedCache, SetupError, SurplusTrial, format_params
from fimlora.tune.output import TuningSummary, summarize_study, write_outputs
from fimlora.tune.spec import METRIC_DIRECTIONS, TuneSettings, parse_tune
from fimlora.tune.storage import (
    COUNTED,
    FAILURE_ATTR,
    PROBE_ATTR,
    RETRY_OF_ATTR,
    default_storage,
    kind_counts,
    open_storage,
    public_url,
    recorded_storage,
    retried_numbers,
    taken,
    trial_kind,
)

#: The logger of ``optuna.study._optimize``, which reports every trial's end.
_OPTIMIZE_LOGGER = "optuna.study._optimize"


class _SurplusTrialFilter(logging.Filter):
    """Drops Optuna's report of a surplus trial: a failure with a traceback and a second line, where the
    trial only lost the race for a study's last place and trained nothing (see :class:`SurplusTrial`)."""

    def __init__(self) -> None:
        super().__init__()
        self.surplus: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        words = record.getMessage().split(maxsplit=2)
        number = words[1] if len(words) > 1 and words[0] == "Trial" else None
        if record.exc_info and isinstance(record.exc_info[1], SurplusTrial):
            if number is not None:
                self.surplus.add(number)
            return False
        return not (number in self.surplus and "failed with value" in record.getMessage())


def quiet_optuna() -> None:
    import optuna

    # fimlora logs one line per trial itself; heartbeats and the retry callback are "experimental".
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logger = logging.getLogger(_OPTIMIZE_LOGGER)
    if not any(isinstance(f, _SurplusTrialFilter) for f in logger.filters):
        logger.addFilter(_SurplusTrialFilter())


def create_studies(cells: Sequence[Cell], settings: TuneSettings, url: str) -> None:
    """Create every study (or find it again) before any worker starts, with its cell as attributes."""
    import optuna

    quiet_optuna()
    storage = open_storage(url, heartbeat_s=settings.heartbeat_s)
    for cell in cells:
        study = optuna.create_study(
            storage=storage,
            study_name=cell.study_name,
            direction="maximize" if METRIC_DIRECTIONS[cell.metric] else "minimize",
            load_if_exists=True,
        )
        if "cell" not in study.user_attrs:
            study.set_user_attr("cell", cell.record())
            study.set_user_attr("metric", cell.metric)
            study.set_user_attr("space", [p.describe() for p in cell.space])
            study.set_user_attr("seeds", list(cell.seeds))
            study.set_user_attr("aggregate", cell.aggregate)


def probe_mismatch(trials: Sequence[Any], settings: TuneSettings) -> str | None:
    """How a study's ended trials disagree with ``settings`` about which places are probes (the sampler
    holds the first ``trials`` places, probe ``i`` place ``trials + i``), or None where they agree."""
    retried = retried_numbers(trials)
    for trial in sorted(trials, key=lambda t: t.number):
        if trial_kind(trial, retried) not in COUNTED:
            continue  # running: its values may not be drawn yet; it is checked once it has ended
        place = taken(trials, before=trial.number)
        tried = trial.user_attrs.get(PROBE_ATTR)
        index = place - settings.trials
        if index < 0:
            if tried is not None:
                return (
                    f"trial {trial.number} tried probe {tried}, but with tune.trials = {settings.trials} its "
                    f"place ({place}) is the sampler's"
                )
            continue
        if index >= len(settings.probes):
            continue
        want = settings.probes[index]
        if tried != index or any(trial.params.get(key) != value for key, value in want.items()):
            what = "the sampler's trial" if tried is None else f"probe {tried}"
            return (
                f"trial {trial.number} (place {place}) is {what} [{format_params(trial.params)}], where "
                f"tune.trials = {settings.trials} and tune.probes put probe {index} [{format_params(want)}]"
            )
    return None


def check_probe_places(cells: Sequence[Cell], settings: TuneSettings, url: str) -> None:
    """Refuse to go on with a study whose finished trials contradict ``tune.trials``/``tune.probes``
    (:func:`probe_mismatch`): its record would list probes it never tried, or run one twice."""
    import optuna

    storage = open_storage(url, heartbeat_s=settings.heartbeat_s)
    for cell in cells:
        study = optuna.load_study(study_name=cell.study_name, storage=storage)
        mismatch = probe_mismatch(study.get_trials(deepcopy=False), settings)
        if mismatch is not None:
            raise FimloraError(
                f"Tuning stopped: {cell.describe()}, study {cell.study_name}: {mismatch}. Probes are a "
                "study's last trials; give tune.trials and tune.probes the values the study ran with, or "
                "start a new study (docs/experiments.md, Tuning)."
            )


def retry_failed_trials(
    cells: Sequence[Cell], settings: TuneSettings, url: str, log: Callable[[str], None] = print
) -> int:
    """Give every failed trial of ``cells``' studies again, with its parameters (``--retry-failed``):
    for a failure of fimlora's own that has since been fixed, so that the study's budget is spent on
    trials that trained. The failed trial stays in the record as ``retried`` and no longer counts; its
    retry names it (``retry_of``). Returns how many were enqueued."""
    import optuna

    create_studies(cells, settings, url)
    storage = open_storage(url, heartbeat_s=settings.heartbeat_s)
    enqueued = 0
    for cell in cells:
        study = optuna.load_study(study_name=cell.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        retried = retried_numbers(trials)
        for trial in trials:
            if trial_kind(trial, retried) != "failed":
                continue
            study.enqueue_trial(dict(trial.params), user_attrs={RETRY_OF_ATTR: trial.number})
            enqueued += 1
            log(
                f"  {cell.describe()}: trial {trial.number} [{format_params(trial.params)}] failed "
                f"({trial.user_attrs.get(FAILURE_ATTR)}); given again"
            )
    return enqueued


def tune_cell(
    cell: Cell,
    settings: TuneSettings,
    storage: Any,
    cache: PreparedCache,
    *,
    log: Callable[[str], None] = print,
) -> bool:
    """Optimise ``cell``'s study until ``settings.budget`` trials (its trials, then its probes) ran to a
    verdict (returns True), or until its places left are all held by running trials (returns False: come
    back later; meanwhile a worker has other cells to tune rather than sleep beside this one)."""
    import optuna

    from fimlora.tune.search import pruner, sampler

    study = optuna.load_study(
        study_name=cell.study_name,
        storage=storage,
        sampler=sampler(settings),
        pruner=pruner(settings, cell.config.train.steps),
    )
    budget = settings.budget
    objective = Objective(cell, budget, cache, log, probes_from=settings.trials)

    def stop_when_taken(study: Any, _trial: Any) -> None:
        trials = study.get_trials(deepcopy=False)
        if taken(trials) >= budget and not kind_counts(trials)["waiting"]:
            study.stop()

    ready = False
    while True:
        trials = study.get_trials(deepcopy=False)
        counts = kind_counts(trials)
        if sum(counts[k] for k in COUNTED) >= budget:
            return True
        if taken(trials) >= budget and not counts["waiting"]:
            # The last places are held by running trials: another worker's, or a dead one's that the
            # heartbeat fails (and re-enqueues) once it has been silent for the grace period.
            optuna.storages.fail_stale_trials(study)
            if not kind_counts(study.get_trials(deepcopy=False))["waiting"]:
                return False
            continue
        if not ready:  # only a study with trials to run loads the model
            objective.setup()
            ready = True
        try:
            study.optimize(
                objective,
                callbacks=[stop_when_taken],
                catch=(FimloraError, RuntimeError, SurplusTrial),
                gc_after_trial=True,
            )
        except ValueError:
            # Optuna cannot record a trial that was ended elsewhere while this process ran it (failed
            # by another worker's heartbeat check, its retry runs it again; or finished by another
            # worker): go on with the study rather than end every worker's tuning.
            if not (objective.ended_elsewhere or _lost(study, objective.number)):
                raise


def _lost(study: Any, number: int | None) -> bool:
    """Whether trial ``number`` of ``study`` was failed by a heartbeat check (see storage)."""
    if number is None:
        return False
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    return trial is not None and trial_kind(trial) == "lost"


@dataclass(frozen=True)
class WorkerTask:
    """What a worker process needs (plain, picklable data)."""

    cells: tuple[Cell, ...]
    settings: TuneSettings
    url: str
    worker: int


def tune_worker(task: WorkerTask, log: Callable[[str], None] = print) -> None:
    """Tune every cell in order (a worker process's whole job). A cell whose last places are held by
    running trials is passed over and visited again after the others, until every cell's budget ended."""
    quiet_optuna()
    storage = open_storage(task.url, heartbeat_s=task.settings.heartbeat_s)
    cache = PreparedCache(capacity=task.settings.seeds)
    held = list(task.cells)
    while True:
        try:
            held = [cell for cell in held if not tune_cell(cell, task.settings, storage, cache, log=log)]
        except SetupError as exc:
            raise FimloraError(f"Tuning stopped: {exc}") from None
        if not held:
            return
        time.sleep(min(5.0, task.settings.heartbeat_s / 2))


def _prefixed_print(prefix: str) -> Callable[[str], None]:
    def log(line: str) -> None:
        print(f"{prefix}{line}", flush=True)

    return log


def _run_worker(task: WorkerTask) -> None:
    tune_worker(task, log=_prefixed_print(f"[worker {task.worker}] "))


def run_workers(
    cells: Sequence[Cell],
    settings: TuneSettings,
    url: str,
    *,
    workers: int,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Tune all ``cells`` in ``workers`` processes sharing the storage at ``url`` (1: this process), each
    with ``threads`` torch threads (default: the CPUs divided among the workers)."""
    if workers < 1:
        raise FimloraError(f"--workers must be at least 1, got {workers}.")
    if threads is not None and threads < 1:
        raise FimloraError(f"--threads must be at least 1, got {threads}.")
    threads = threads or threads_per_worker(workers)
    create_studies(cells, settings, url)
    check_probe_places(cells, settings, url)
    tasks = [WorkerTask(tuple(cells), settings, url, worker) for worker in range(workers)]
    if workers == 1:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            tune_worker(tasks[0], log=log)
        finally:
            torch.set_num_threads(previous)
        return
    executor = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(threads, os.getpid()),
    )
    try:
        for future in as_completed([executor.submit(_run_worker, task) for task in tasks]):
            try:
                future.result()
            except BrokenProcessPool as exc:
                raise FimloraError(
                    f"A tuning worker process died ({exc}); run fimlora tune again to resume."
                ) from None
    except BaseException:
        # The other workers stop with this process (init_worker watches it); their trials are lost.
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown(wait=True)


@dataclass
class TuningReport:
    """What ``fimlora tune`` did: one summary per study and the files it wrote."""

    summaries: list[TuningSummary]
    tuned_file: Path
    trials_file: Path
    storage: str


def run_tuning(
    spec: SweepSpec,
    *,
    trials: int | None = None,
    seeds: int | None = None,
    workers: int = 1,
    threads: int | None = None,
    storage: str | None = None,
    retry_failed: bool = False,
    log: Callable[[str], None] = print,
) -> TuningReport:
    """Tune every cell of ``spec`` (resuming studies already in the storage), then write ``tuned.yaml``
    and ``tuning-trials.csv`` into its store. ``trials`` overrides the spec's count for every study,
    ``seeds`` its seeds per trial; ``threads`` the torch threads of each of the ``workers`` processes
    (default: the CPUs divided among them); ``storage`` is an Optuna RDB URL (default:
    ``sqlite:///<store>/tuning.db``); ``retry_failed``: first give every failed trial again
    (:func:`retry_failed_trials`)."""
    import optuna

    if launched_world_size() > 1:
        raise FimloraError(
            "fimlora tune was started by a multi-process launcher (WORLD_SIZE > 1): every process would "
            "run the whole tuning. Use --workers, or start fimlora tune on each machine with --storage."
        )
    settings = parse_tune(spec, trials=trials, seeds=seeds)
    cells = plan_cells(spec, settings)
    # What would fail every trial of a cell before training (a hindsight source not made yet, a budget
    # too small) stops here, before any trial is spent on it; the test split stays unread.
    check_runs([(cell.describe(), cell.config) for cell in cells], what="tuning cell", splits=TUNING_SPLITS)
    store = spec.output_path
    store.mkdir(parents=True, exist_ok=True)
    url = storage or default_storage(store)
    seed_list = tuning_seeds(spec, settings)
    at = (
        f"seeds {', '.join(map(str, seed_list))}, scored by their {settings.aggregate}"
        if len(seed_list) > 1
        else f"seed {seed_list[0]}"
    )
    probes = f" + {len(settings.probes)} probes" if settings.probes else ""
    log(
        f"tune {spec.name}: {len(cells)} studies × {settings.trials} trials{probes} on the validation split, "
        f"trials at {at} (storage {public_url(url)}, {workers} worker{'s' if workers != 1 else ''})"
    )
    for cell in cells:
        dims = ", ".join(
            f"{p.key} ∈ {list(p.choices)}"
            if p.choices is not None
            else f"{p.key} ∈ [{p.low:g}, {p.high:g}]" + (" log" if p.log else "")
            for p in cell.space
        )
        log(f"  {cell.describe()}: {dims}; study {cell.study_name}")
    if retry_failed:
        count = retry_failed_trials(cells, settings, url, log)
        log(f"  {count} failed trial(s) given again" if count else "  no failed trial to give again")
    run_workers(cells, settings, url, workers=workers, threads=threads, log=log)
    quiet_optuna()
    opened = open_storage(url, heartbeat_s=settings.heartbeat_s)
    summaries = [
        summarize_study(cell, optuna.load_study(study_name=cell.study_name, storage=opened)) for cell in cells
    ]
    tuned_file, trials_file = write_outputs(
        store,
        name=spec.name,
        seeds=seed_list,
        aggregate=settings.aggregate,
        trials=settings.budget,
        probes=settings.probes,
        storage=recorded_storage(url, spec.base_dir),
        summaries=summaries,
    )
    return TuningReport(summaries, tuned_file, trials_file, url)
