"""Sweeps: a grid of experiments declared in one YAML spec, run idempotently on local workers or Ray.

``load_spec`` → ``expand`` (every run validated up front) → ``run_sweep`` (finished runs skipped).
See :mod:`fimlora.sweep.spec` for the file format and :mod:`fimlora.sweep.expand` for the run store.
"""

from fimlora.sweep.expand import SWEEP_FILE, PlannedRun, config_hash, expand
from fimlora.sweep.local import RunOutcome, RunTask, execute_run
from fimlora.sweep.runner import SweepReport, run_sweep
from fimlora.sweep.spec import SweepSpec, load_spec, method_name, parse_spec

__all__ = [
    "SWEEP_FILE",
    "PlannedRun",
    "RunOutcome",
    "RunTask",
    "SweepReport",
    "SweepSpec",
    "config_hash",
    "execute_run",
    "expand",
    "load_spec",
    "method_name",
    "parse_spec",
    "run_sweep",
]
