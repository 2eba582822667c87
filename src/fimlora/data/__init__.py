"""Datasets for fimlora as ``datasets.Dataset`` splits, plus tokenization and batching.

:func:`load_task_data` resolves a name in this order:

1. a registered built-in (:func:`available_datasets`; see :mod:`fimlora.data.builtin`);
2. a local ``.csv``, ``.json`` or ``.jsonl`` file, or a directory of split files, or a mapping split →
   file (:mod:`fimlora.data.files`);
3. a Hugging Face hub dataset id (:mod:`fimlora.data.hub`; needs network access).

Whatever the source, the result is a :class:`TaskData` with ``train``/``validation``/``test`` splits,
a ``text`` column and, for classification, a ``label`` column of ids ``0..K-1``. Asked for fewer splits
(``splits=("train", "validation")`` while tuning), the others are sealed: local split files outside it
are never opened, and reading a sealed split raises.

Every load counts the evaluation rows whose text also occurs in an earlier split
(:mod:`fimlora.data.duplicates`); what a dataset *is*, by content (file digests, a built-in's version),
is :func:`data_identity` (:mod:`fimlora.data.identity`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from fimlora.data import builtin as _builtin  # noqa: F401  (registers the built-in datasets)
from fimlora.data.duplicates import with_duplicates
from fimlora.data.files import (
    check_split_mapping,
    dataset_label,
    load_file_dataset,
    load_split_files,
    looks_like_file,
)
from fimlora.data.hub import load_hub_dataset
from fimlora.data.identity import DataIdentity, data_changes, data_identity
from fimlora.data.registry import (
    TASKS,
    SealedSplits,
    Task,
    TaskData,
    available_datasets,
    check_task,
    load_builtin,
    quiet_datasets,
    register_dataset,
    registered_task,
    seal,
    sealed_splits,
)
from fimlora.data.tokenize import calibration_subset, make_collator, tokenize_task_data
from fimlora.errors import FimloraError

__all__ = [
    "TASKS",
    "DataIdentity",
    "SealedSplits",
    "Task",
    "TaskData",
    "available_datasets",
    "calibration_subset",
    "data_changes",
    "data_identity",
    "dataset_label",
    "load_task_data",
    "make_collator",
    "register_dataset",
    "tokenize_task_data",
]


def load_task_data(
    name: str | Mapping[str, str],
    *,
    seed: int = 0,
    task: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    hub_config: str | None = None,
    trust_remote_code: bool = False,
    splits: Collection[str] | None = None,
    drop_eval_duplicates: bool = False,
) -> TaskData:
    """Load dataset ``name`` (built-in, local file or directory, split mapping, or hub id) as
    :class:`TaskData` with seeded splits, its cross-split duplicates counted (and with
    ``drop_eval_duplicates`` dropped from validation and test; :mod:`fimlora.data.duplicates`).

    ``task`` defaults to the built-in's task, or for files/hub to classification when a label column
    exists and causal-lm otherwise. ``text_column``/``label_column`` name the user's columns;
    ``hub_config`` and ``trust_remote_code`` are passed to ``datasets.load_dataset`` for hub ids.
    ``splits``: the splits that may be loaded (must include train; None: all three); the rest are sealed.
    """
    data = _load(
        name,
        seed=seed,
        task=task,
        text_column=text_column,
        label_column=label_column,
        hub_config=hub_config,
        trust_remote_code=trust_remote_code,
        splits=splits,
    )
    return with_duplicates(data, drop=drop_eval_duplicates)


def _load(
    name: str | Mapping[str, str],
    *,
    seed: int,
    task: str | None,
    text_column: str | None,
    label_column: str | None,
    hub_config: str | None,
    trust_remote_code: bool,
    splits: Collection[str] | None,
) -> TaskData:
    if task is not None:
        check_task(task)
    if splits is not None:
        sealed_splits({}, splits)  # validates the names before anything is read
    if not isinstance(name, str):
        if hub_config is not None:
            raise FimloraError("hub_config applies only to hub datasets, not to a mapping of split files.")
        label = dataset_label(name)
        with quiet_datasets():
            return load_split_files(
                check_split_mapping(name),
                name=label,
                seed=seed,
                task=task,
                text_column=text_column,
                label_column=label_column,
                allowed=splits,
            )
    builtin_task = registered_task(name)
    if builtin_task is not None:
        if task is not None and task != builtin_task:
            raise FimloraError(
                f"Built-in dataset {name!r} is a {builtin_task} dataset, not {task}; drop the "
                "task option or choose another dataset."
            )
        extras = {"text_column": text_column, "label_column": label_column, "hub_config": hub_config}
        given = [key for key, value in extras.items() if value is not None]
        if given:
            raise FimloraError(
                f"Option(s) {', '.join(given)} apply only to local files and hub datasets, "
                f"not to the built-in dataset {name!r}; remove them."
            )
        return seal(load_builtin(name, seed=seed), splits)
    if looks_like_file(name):
        if hub_config is not None:
            raise FimloraError(
                f"hub_config applies only to hub datasets, not to the local file {name!r}; remove it."
            )
        with quiet_datasets():
            return load_file_dataset(
                name,
                seed=seed,
                task=task,
                text_column=text_column,
                label_column=label_column,
                allowed=splits,
            )
    data = load_hub_dataset(
        name,
        seed=seed,
        task=task,
        text_column=text_column,
        label_column=label_column,
        hub_config=hub_config,
        trust_remote_code=trust_remote_code,
    )
    return seal(data, splits)
