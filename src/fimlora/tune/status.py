"""Where a tuning stands (``fimlora tune SPEC --status``), read from its storage while workers may run.

A study that spans sessions is otherwise followed through worker logs. This reads the same record the
workers write, changes nothing (a SQLite file that does not exist yet is not created) and trains
nothing: per study, the trials that ended out of its budget, those running, the best so far and whether
it came from a probe, and which probe comes next; then what is left, in trials and in one worker's hours
at the wall time the ended trials took.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from statistics import fmean

from fimlora.sweep.spec import SweepSpec
from fimlora.tune.cells import Cell, plan_cells
from fimlora.tune.output import TunedCell, summarize_study
from fimlora.tune.spec import parse_tune
from fimlora.tune.storage import (
    COUNTED,
    PROBE_ATTR,
    default_storage,
    kind_counts,
    open_storage,
    public_url,
    retried_numbers,
    sqlite_file,
    trial_kind,
)
from fimlora.tune.study import quiet_optuna


@dataclass(frozen=True)
class StudyStatus:
    """One study's progress: ``counts`` by trial kind (empty: not started), ``best`` its best complete
    trial so far (None: none yet), ``best_probe`` the probe that trial tried (None: the sampler's);
    ``ended_s`` the wall seconds each ended trial took, ``running_s`` those each running one has run."""

    cell: Cell
    budget: int
    trials: int
    counts: dict[str, int]
    best: TunedCell | None
    best_probe: int | None
    ended_s: tuple[float, ...] = ()
    running_s: tuple[float, ...] = ()

    @property
    def ended(self) -> int:
        return sum(self.counts.get(kind, 0) for kind in COUNTED)

    def describe(self) -> str:
        from fimlora.tune.objective import format_params

        where = f"{self.cell.describe()}, study {self.cell.study_name}"
        if not self.counts:
            return f"{where}: not started (0/{self.budget})"
        line = (
            f"{where}: {self.ended}/{self.budget} ended ({self.counts.get('complete', 0)} complete, "
            f"{self.counts.get('pruned', 0)} pruned, {self.counts.get('failed', 0)} failed)"
        )
        if self.counts.get("running"):
            line += f", {self.counts['running']} running"
        if self.counts.get("waiting"):
            line += f", {self.counts['waiting']} waiting to be given again"
        if self.best is not None and self.best.params is not None and self.best.validation_score is not None:
            probe = "" if self.best_probe is None else f" (probe {self.best_probe})"
            line += (
                f"; best so far {self.best.metric} {self.best.validation_score:.4f} with "
                f"{format_params(self.best.params)}{probe}"
            )
        elif self.ended:
            line += "; no trial completed yet"
        if self.budget > self.trials and self.ended < self.budget:
            done = max(0, self.ended - self.trials)
            line += f"; probes tried {done} of {self.budget - self.trials}"
        return line


@dataclass(frozen=True)
class TimeLeft:
    """What a tuning has left: ``trials`` places of the budgets not ended (``running`` of them under way),
    ``seconds`` of one worker's wall time to end them. Each study's places cost the mean wall time of its
    ended trials (``mean_s`` is that mean over every study), less what its running trials have run; a study
    with no ended trial yet (``guessed``, described) is costed at ``mean_s``."""

    trials: int
    running: int
    seconds: float
    mean_s: float
    guessed: tuple[str, ...]

    def describe(self) -> str:
        hours = self.seconds / 3600
        line = f"left: {self.trials} trials ({self.running} running), ≈ {hours:.1f} h of one worker"
        if self.running > 1:
            line += f", ≈ {hours / self.running:.1f} h for the {self.running} workers running now"
        line += (
            f" (at each study's mean wall time per ended trial; {self.mean_s / 60:.1f} min over all studies, "
            "beside whatever else ran"
        )
        if self.guessed:
            line += f"; none ended yet in {', '.join(self.guessed)}: costed at that mean"
        return line + ")"


def time_left(statuses: Sequence[StudyStatus]) -> TimeLeft | None:
    """:class:`TimeLeft` of ``statuses``; None when nothing is left or no trial has ended to time it by."""
    every = [seconds for status in statuses for seconds in status.ended_s]
    if not every:
        return None
    overall = fmean(every)
    trials = running = 0
    seconds = 0.0
    guessed = []
    for status in statuses:
        places = max(0, status.budget - status.ended)
        if not places:
            continue
        mean_s = fmean(status.ended_s) if status.ended_s else overall
        if not status.ended_s:
            guessed.append(status.cell.describe())
        # A running trial still costs the mean less what it has run (nothing more once past it).
        seconds += places * mean_s - sum(min(run, mean_s) for run in status.running_s)
        trials += places
        running += len(status.running_s)
    if not trials:
        return None
    return TimeLeft(trials, running, seconds, overall, tuple(guessed))


def _wall_times(trials: Sequence, kinds: Sequence[str], now: datetime) -> tuple[list[float], list[float]]:
    """Seconds each ended trial took and each running one has run, by ``kinds`` (their trial kinds)."""
    ended, running = [], []
    for trial, kind in zip(trials, kinds, strict=True):
        if trial.datetime_start is None:
            continue
        if kind in COUNTED and trial.datetime_complete is not None:
            ended.append((trial.datetime_complete - trial.datetime_start).total_seconds())
        elif kind == "running":
            running.append(max(0.0, (now - trial.datetime_start).total_seconds()))
    return ended, running


def tuning_status(
    spec: SweepSpec, *, trials: int | None = None, seeds: int | None = None, storage: str | None = None
) -> tuple[str, list[StudyStatus]]:
    """The storage's URL (without a password) and every study's :class:`StudyStatus`, in cell order."""
    import optuna

    settings = parse_tune(spec, trials=trials, seeds=seeds)
    cells = plan_cells(spec, settings)
    url = storage or default_storage(spec.output_path)
    path = sqlite_file(url)
    names: set[str] = set()
    opened = None
    if path is None or path.is_file():
        quiet_optuna()
        opened = open_storage(url, heartbeat_s=settings.heartbeat_s)
        names = {s.study_name for s in optuna.study.get_all_study_summaries(opened, include_best_trial=False)}
    statuses = []
    now = datetime.now()  # Optuna stamps trials with the local clock
    for cell in cells:
        counts: dict[str, int] = {}
        best, best_probe = None, None
        ended_s: list[float] = []
        running_s: list[float] = []
        if opened is not None and cell.study_name in names:
            study = optuna.load_study(study_name=cell.study_name, storage=opened)
            found = study.get_trials(deepcopy=False)
            counts = dict(kind_counts(found))
            retried = retried_numbers(found)
            ended_s, running_s = _wall_times(found, [trial_kind(t, retried) for t in found], now)
            summary = summarize_study(cell, study)
            if summary.best_number is not None:
                best = summary.entry
                (trial,) = (t for t in found if t.number == summary.best_number)
                probe = trial.user_attrs.get(PROBE_ATTR)
                best_probe = None if probe is None else int(probe)
        statuses.append(
            StudyStatus(
                cell,
                settings.budget,
                settings.trials,
                counts,
                best,
                best_probe,
                tuple(ended_s),
                tuple(running_s),
            )
        )
    return public_url(url), statuses


def print_status(url: str, statuses: list[StudyStatus], log: Callable[[str], None] = print) -> None:
    ended = sum(s.ended for s in statuses)
    budget = sum(s.budget for s in statuses)
    log(f"tuning in {url}: {ended}/{budget} trials ended over {len(statuses)} studies")
    for status in statuses:
        log(f"  {status.describe()}")
    left = time_left(statuses)
    if left is not None:
        log(left.describe())
    elif places := sum(max(0, s.budget - s.ended) for s in statuses):
        # Nothing has ended to time the rest by; the count is still what the user asked.
        running = sum(len(s.running_s) for s in statuses)
        log(f"left: {places} trials ({running} running); no trial has ended yet, so no estimate of the time")
