"""The :class:`TaskData` contract and the registry of built-in dataset loaders.

Conventions every loader (built-in, local file, hub) must meet, checked by :func:`check_task_data`:

- ``splits`` has exactly the keys ``"train"``, ``"validation"`` and ``"test"``, none of them empty;
- every split has a ``text`` column of strings; classification splits also have ``label`` (int ids
  ``0..K-1`` indexing ``label_names``); other columns (``domain``, ``genre``, ...) may remain;
- splits are a pure function of the source and ``seed``: the same seed gives identical splits.
- a loader may be told which splits it may materialise (``fimlora tune`` allows train and validation):
  the others are *sealed*: absent from ``splits``, and touching one raises (:class:`SealedSplits`).

Built-in loaders are registered lm-evaluation-harness style::

    @register_dataset("movie-reviews", task="classification")
    def load_movie_reviews(*, seed: int) -> TaskData: ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import datasets
import numpy as np

from fimlora.errors import FimloraError

Task = Literal["classification", "causal-lm"]
TASKS: tuple[str, ...] = get_args(Task)
SPLITS: tuple[str, str, str] = ("train", "validation", "test")

Loader = Callable[..., "TaskData"]


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' per-operation bars while loading: small files load in a blink, and their
    bars would bury an error message in front of the user."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


class SealedSplits(datasets.DatasetDict):
    """A ``DatasetDict`` holding only the splits a run may see; asking for a sealed one raises.

    The sealed splits were never materialised (a split file is not even opened), so code that reaches
    for one is a bug that would have read held-out data: it fails with a clear error instead.
    """

    def __init__(self, splits: Mapping[str, datasets.Dataset], sealed: Collection[str]) -> None:
        super().__init__(splits)
        self.sealed = frozenset(sealed)

    def __getitem__(self, key: Any) -> Any:
        if key in self.sealed:
            raise FimloraError(
                f"The {key} split is sealed here: only {', '.join(s for s in SPLITS if s in self)} may be "
                f"read (the {key} split is for final numbers, never for choosing settings)."
            )
        return super().__getitem__(key)


def sealed_splits(splits: Mapping[str, datasets.Dataset], allowed: Collection[str]) -> datasets.DatasetDict:
    """``splits`` restricted to ``allowed`` (a :class:`SealedSplits` when that leaves any out)."""
    unknown = sorted(set(allowed) - set(SPLITS))
    if unknown or "train" not in allowed:
        raise FimloraError(
            f"Splits to load must include train and be among {list(SPLITS)}, got {sorted(allowed)}."
        )
    kept = {name: splits[name] for name in SPLITS if name in allowed and name in splits}
    sealed = [name for name in SPLITS if name not in allowed]
    return SealedSplits(kept, sealed) if sealed else datasets.DatasetDict(kept)


def seal(data: TaskData, allowed: Collection[str] | None) -> TaskData:
    """``data`` with every split outside ``allowed`` sealed (``None``: all three kept)."""
    if allowed is None or set(SPLITS) <= set(allowed):
        return data
    return dataclasses.replace(data, splits=sealed_splits(data.splits, allowed))


@dataclass
class TaskData:
    """A dataset normalised for fimlora: three named splits and, for classification, the label names."""

    name: str
    task: Task
    splits: datasets.DatasetDict
    label_names: list[str] | None = None
    #: Evaluation rows whose text also occurs in an earlier split, per pair (``test_in_train``, …), and
    #: those dropped per split; set by :func:`fimlora.data.load_task_data` (:mod:`fimlora.data.duplicates`).
    duplicates: dict[str, int] | None = None
    dropped_duplicates: dict[str, int] | None = None

    @property
    def sealed(self) -> frozenset[str]:
        """Splits that were deliberately not loaded (see :class:`SealedSplits`)."""
        return getattr(self.splits, "sealed", frozenset())

    @property
    def num_labels(self) -> int:
        """Number of classes K (labels are ``0..K-1``); a FimloraError for a causal-lm dataset."""
        if self.task != "classification" or self.label_names is None:
            raise FimloraError(f"Dataset {self.name!r} is a {self.task} dataset and has no labels.")
        return len(self.label_names)


def split_fingerprints(data: TaskData) -> dict[str, str]:
    """A content hash per loaded split: sha256 of its texts (and label names, for classification), in row
    order; sealed splits are left out. Two runs whose training splits have the same fingerprint were
    trained on the same examples, whatever path or name the data came under."""
    import hashlib
    import json

    out = {}
    for split in SPLITS:
        if split not in data.splits or split in data.sealed:
            continue
        columns = data.splits[split]
        digest = hashlib.sha256()
        digest.update(json.dumps(columns["text"][:], ensure_ascii=False).encode("utf-8"))
        if data.task == "classification" and data.label_names is not None:
            labels = [data.label_names[i] for i in columns["label"][:]]
            digest.update(json.dumps(labels, ensure_ascii=False).encode("utf-8"))
        out[split] = digest.hexdigest()[:16]
    return out


@dataclass(frozen=True)
class _Entry:
    task: Task
    loader: Loader
    version: str | None = None


_REGISTRY: dict[str, _Entry] = {}


def check_task(task: str) -> Task:
    """Return ``task`` if it is a supported task name, else raise a FimloraError naming the valid ones."""
    if task not in TASKS:
        raise FimloraError(f"Unknown task {task!r}; use one of: {', '.join(TASKS)}.")
    return task  # type: ignore[return-value]


def register_dataset(name: str, task: str, *, version: str | None = None) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(*, seed: int) -> TaskData`` as the built-in dataset ``name``.

    ``version`` names the content the loader produces (its asset and rule, e.g. ``vader-3.3.2``): finished
    runs and cached Fishers of the dataset are reused only while it stays the same, so change it whenever
    the rows change (see :mod:`fimlora.data.identity`). None: fimlora's own version stands in for it.
    Names are unique; registering one twice is an error (so a plugin cannot silently replace a built-in).
    """
    checked = check_task(task)

    def decorator(loader: Loader) -> Loader:
        if name in _REGISTRY:
            raise FimloraError(f"A dataset named {name!r} is already registered; choose another name.")
        _REGISTRY[name] = _Entry(checked, loader, version)
        return loader

    return decorator


def _ensure_builtins() -> None:
    # Imported lazily: builtin.py imports this module to register itself.
    importlib.import_module("fimlora.data.builtin")


def available_datasets() -> list[str]:
    """Sorted names of the registered built-in datasets."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def registered_task(name: str) -> Task | None:
    """The task of built-in dataset ``name``, or None if ``name`` is not registered."""
    _ensure_builtins()
    entry = _REGISTRY.get(name)
    return entry.task if entry else None


def registered_version(name: str) -> str | None:
    """The content version of built-in dataset ``name`` (see :func:`register_dataset`); None if not
    registered."""
    _ensure_builtins()
    entry = _REGISTRY.get(name)
    if entry is None:
        return None
    if entry.version is not None:
        return entry.version
    from fimlora import __version__

    return f"fimlora-{__version__}"


def load_builtin(name: str, *, seed: int) -> TaskData:
    """Run the registered loader for ``name`` and check what it returns against the contract."""
    _ensure_builtins()
    entry = _REGISTRY[name]
    data = entry.loader(seed=seed)
    if data.task != entry.task:
        raise FimloraError(
            f"Built-in dataset {name!r} is registered as {entry.task} but its loader "
            f"returned {data.task} data; this is a bug in its loader."
        )
    return check_task_data(data)


def split_three_ways(
    dataset: datasets.Dataset,
    *,
    seed: int,
    fractions: tuple[float, float] = (0.1, 0.1),
    source: str,
) -> datasets.DatasetDict:
    """Split one dataset into train/validation/test with a seeded permutation.

    ``fractions`` are the validation and test shares (default 80/10/10); see :func:`carve_splits`.
    """
    parts = carve_splits(
        dataset, {"validation": fractions[0], "test": fractions[1]}, seed=seed, source=source
    )
    return datasets.DatasetDict({split: parts[split] for split in SPLITS})


def carve_splits(
    dataset: datasets.Dataset, shares: dict[str, float], *, seed: int, source: str
) -> dict[str, datasets.Dataset]:
    """Carve the splits named in ``shares`` out of ``dataset``; what remains is returned as ``"train"``.

    Each carved split gets ``round(share * n)`` rows but at least one, and train must keep at least one.
    The rows are chosen by a permutation drawn from ``numpy.random.default_rng(seed)`` (carved splits
    taken in the order of ``shares``) and keep their original relative order within each split, so the
    result depends only on the rows and ``seed``.
    """
    n = len(dataset)
    sizes = {split: max(1, round(share * n)) for split, share in shares.items()}
    if n - sum(sizes.values()) < 1:
        raise FimloraError(
            f"{source} has only {n} usable example(s), too few to make train, validation and test "
            "splits; provide more data."
        )
    order = np.random.default_rng(seed).permutation(n)
    names = [*sizes, "train"]
    assigned = np.empty(n, dtype=np.int64)
    start = 0
    for k, size in enumerate(sizes.values()):
        assigned[order[start : start + size]] = k
        start += size
    assigned[order[start:]] = len(names) - 1
    if "text" in dataset.column_names:
        assigned = _keep_duplicates_together(dataset["text"][:], order, assigned)
    return {split: dataset.select(np.flatnonzero(assigned == k)) for k, split in enumerate(names)}


def _keep_duplicates_together(texts: Sequence[str], order: np.ndarray, assigned: np.ndarray) -> np.ndarray:
    """Every copy of a text goes where its first copy in the permutation went: a snippet duplicated in
    the source (the VADER files have a few) never sits in train and test at once."""
    first_split: dict[str, int] = {}
    result = assigned.copy()
    for row in order:
        result[row] = first_split.setdefault(texts[row], int(assigned[row]))
    return result


def check_task_data(data: TaskData) -> TaskData:
    """Validate ``data`` against the module conventions; return it unchanged or raise FimloraError."""
    check_task(data.task)
    present = [split for split in SPLITS if split in data.splits]
    if sorted(data.splits) != sorted(set(SPLITS) - data.sealed):
        raise FimloraError(
            f"Dataset {data.name!r} has splits {sorted(data.splits)}; expected exactly {list(SPLITS)}"
            + (f" less the sealed {sorted(data.sealed)}." if data.sealed else ".")
        )
    for split in present:
        ds = data.splits[split]
        if len(ds) == 0:
            raise FimloraError(
                f"The {split} split of dataset {data.name!r} is empty; provide more data "
                "or a non-empty split."
            )
        _require_columns(ds, ["text"] + (["label"] if data.task == "classification" else []), data.name)
    if data.task == "classification":
        if not data.label_names or len(data.label_names) < 2:
            raise FimloraError(
                f"Classification dataset {data.name!r} has {len(data.label_names or [])} "
                "distinct label(s); at least 2 are needed."
            )
        k = len(data.label_names)
        for split in present:
            labels = np.asarray(data.splits[split]["label"][:])
            if labels.size and (labels.min() < 0 or labels.max() >= k):
                raise FimloraError(
                    f"The {split} split of {data.name!r} has label ids outside 0..{k - 1}; "
                    "this is a bug in its loader."
                )
    elif data.label_names is not None:
        raise FimloraError(
            f"Causal-LM dataset {data.name!r} must not have label names; this is a bug in its loader."
        )
    return data


def _require_columns(ds: datasets.Dataset, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise FimloraError(f"Dataset {name!r} lacks column(s) {missing}; it has {ds.column_names}.")
