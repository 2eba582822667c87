"""Hyperparameter tuning with Optuna: the same search for every method, on the validation split.

``fimlora tune SPEC`` reads a sweep spec with a ``tune:`` section (:mod:`fimlora.tune.spec`), makes one
study per cell of its grid (:mod:`fimlora.tune.cells`), runs them in one or more worker processes that
share an Optuna RDB storage (:mod:`fimlora.tune.study`, :mod:`fimlora.tune.storage`; trials:
:mod:`fimlora.tune.objective`) and writes ``tuned.yaml`` (:mod:`fimlora.tune.output`).
``fimlora sweep SPEC --tuned tuned.yaml`` then runs the final seeds on test (:mod:`fimlora.tune.apply`).
The test split is sealed while tuning: it is never loaded.
"""

from fimlora.tune.apply import expand_tuned
from fimlora.tune.cells import Cell, plan_cells
from fimlora.tune.output import TRIALS_FILE, TUNED_FILE, TunedFile, load_tuned
from fimlora.tune.spec import TuneSettings, parse_tune
from fimlora.tune.study import TuningReport, run_tuning

__all__ = [
    "TRIALS_FILE",
    "TUNED_FILE",
    "Cell",
    "TuneSettings",
    "TunedFile",
    "TuningReport",
    "expand_tuned",
    "load_tuned",
    "parse_tune",
    "plan_cells",
    "run_tuning",
]
