"""Where a tuning stands (``fimlora tune SPEC --status``), read from its storage while workers may run.

A study that spans sessions is otherwise followed through worker logs. This reads the same record the
workers write, changes nothing (a SQLite file that does not exist yet is not created) and trains
nothing: per study, the trials that ended out of its budget, those running, the best so far and whether
it came from a probe, and which probe comes next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
    sqlite_file,
)
from fimlora.tune.study import quiet_optuna


@dataclass(frozen=True)
class StudyStatus:
    """One study's progress: ``counts`` by trial kind (empty: not started), ``best`` its best complete
    trial so far (None: none yet), ``best_probe`` the probe that trial tried (None: the sampler's)."""

    cell: Cell
    budget: int
    trials: int
    counts: dict[str, int]
    best: TunedCell | None
    best_probe: int | None

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
    for cell in cells:
        counts: dict[str, int] = {}
        best, best_probe = None, None
        if opened is not None and cell.study_name in names:
            study = optuna.load_study(study_name=cell.study_name, storage=opened)
            found = study.get_trials(deepcopy=False)
            counts = dict(kind_counts(found))
            summary = summarize_study(cell, study)
            if summary.best_number is not None:
                best = summary.entry
                (trial,) = (t for t in found if t.number == summary.best_number)
                probe = trial.user_attrs.get(PROBE_ATTR)
                best_probe = None if probe is None else int(probe)
        statuses.append(StudyStatus(cell, settings.budget, settings.trials, counts, best, best_probe))
    return public_url(url), statuses


def print_status(url: str, statuses: list[StudyStatus], log: Callable[[str], None] = print) -> None:
    ended = sum(s.ended for s in statuses)
    budget = sum(s.budget for s in statuses)
    log(f"tuning in {url}: {ended}/{budget} trials ended over {len(statuses)} studies")
    for status in statuses:
        log(f"  {status.describe()}")
