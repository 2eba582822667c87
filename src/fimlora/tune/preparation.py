"""What the preparation step reads from a config, and which of it a search may vary.

A trial reuses the data and model that :func:`fimlora.experiment.prepare` made for an earlier trial of
its process whenever its preparation inputs are the same (:class:`fimlora.tune.objective.PreparedCache`).
So every config key that ``prepare`` reads is either

- part of that cache key and *honoured* when searched (:data:`HONOURED`: a trial with another value
  prepares again), or
- *refused* as a search dimension (:data:`REFUSED`): the keys that define the data, the model and the
  budget (a tuned ``data_seed`` would score trials on another split than the final runs, and carry
  test rows into the tuning), and the protocol's own settings.

:data:`PREPARATION_KEYS` lists them all; ``tests/tune/test_preparation.py`` records every config field
that ``prepare`` actually reads and fails when one is missing here, so a new field cannot slip past.
"""

from __future__ import annotations

import json
from typing import Any

from fimlora.config import ExperimentConfig

#: Keys (and, for a mapping, every key below them) that define the data, the model or the budget.
DATA_KEYS: dict[str, str] = {
    "model": "the model",
    "quantization": "the base model's precision",
    "trust_remote_code": "how the model and data load",
    "dataset": "the data (its files or name, including split files)",
    "dataset_options": "the data (its columns)",
    "data_seed": "the train/validation/test split",
    "task": "the task",
    "budget": "the budget every method is compared at",
    "target_modules": "the modules the budget is spread over",
}
#: Keys that belong to the tuning protocol or the grid rather than to a run's hyperparameters.
PROTOCOL_KEYS: dict[str, str] = {
    "seed": "the seeds of the trials (tune.seed, tune.seeds)",
    "methods": "the cell",
    "output_dir": "where trials are written",
    "train.eval_split": "the split trials are scored on",
    "train.eval_examples": "the validation examples (tune.eval_examples)",
    "train.eval_every": "the pruner's validation steps (tune.eval_every)",
    "train.eval_batch_size": "nothing a trial's score depends on",
    "train.report_to": "nothing a trial's score depends on",
}
REFUSED: dict[str, str] = {**DATA_KEYS, **PROTOCOL_KEYS}
#: Read by ``prepare`` and honoured when searched: part of the prepared-data cache key.
HONOURED: tuple[str, ...] = (
    "train.max_length",  # tokenisation
    "allocation.r_min",  # the budget check
    "allocation.r_max",
    "fisher.head",  # fisher.head: probe fits the task head in prepare()
    "fisher.probe",
    "fisher.batch_size",  # the probe's feature batches
)
#: Everything ``prepare`` reads: the cache key.
PREPARATION_KEYS: tuple[str, ...] = (*DATA_KEYS, "seed", *HONOURED)


def covers(key: str, prefix: str) -> bool:
    """Whether dotted ``key`` is ``prefix`` or lies below it (``dataset.train`` below ``dataset``)."""
    return key == prefix or key.startswith(prefix + ".")


def refusal(key: str) -> str | None:
    """Why ``key`` cannot be a search dimension, or None when it can."""
    for prefix, what in REFUSED.items():
        if covers(key, prefix):
            return f"{prefix} defines {what}"
    return None


def preparation_key(config: ExperimentConfig) -> str:
    """A canonical string of every value ``prepare`` reads from ``config``."""
    data = config.model_dump(mode="json")
    return json.dumps({key: _lookup(data, key) for key in PREPARATION_KEYS}, sort_keys=True)


def _lookup(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node
