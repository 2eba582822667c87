"""User-supplied data: local CSV/JSON/JSONL files, and the column normalisation shared with hub datasets.

Column resolution (:func:`normalize_splits`):

- text: ``text_column`` if given, else the first of ``text``, ``sentence``, ``content`` that exists;
- label: ``label_column`` if given, else ``label`` or ``labels`` if present, else none;
- task: as given, else ``classification`` when a label column exists and ``causal-lm`` otherwise.

Labels become ids ``0..K-1``: a ``ClassLabel`` column keeps its ids and names; any other labels (strings,
ints, bools, integral floats) are mapped in sorted order of their distinct values across all splits, and
``label_names`` holds their string forms. Rows with a missing text or label are dropped (with a warning).

Splits: ``train`` must exist (a source with a single split uses it as train); ``validation`` may also be
called ``valid``, ``val`` or ``dev``. Missing validation/test splits are carved out of train with a seeded
split, 10% of train each (so 80/10/10 when both are missing). A provided split with no labels at all (e.g. a
GLUE-style test set with label -1) counts as missing.

Files must be UTF-8 (checked before ``datasets`` reads them: a file that is not is refused with its
name, line and byte).

Bringing your own splits: ``dataset`` may be a directory holding ``train.csv`` (or ``.json``/``.jsonl``)
and optionally ``validation.csv`` (``valid``/``val``/``dev``) and ``test.csv``, or a mapping
``{train: a.csv, validation: b.csv, test: c.csv}`` (one format for all files). A split that is given is
used as is; only the missing ones are carved from train. Loading may be restricted to some splits
(``allowed``): the files of the others are never opened, and a split that is provided but not allowed is
not carved either, so train is the same rows whether or not test is loaded. Label ids are assigned over
the splits actually loaded.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import datasets

from fimlora.data.registry import (
    SPLITS,
    SealedSplits,
    Task,
    TaskData,
    carve_splits,
    check_task,
    check_task_data,
    seal,
)
from fimlora.errors import FimloraError

logger = logging.getLogger(__name__)

FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json"}
DEFAULT_TEXT_COLUMNS = ("text", "sentence", "content")
DEFAULT_LABEL_COLUMNS = ("label", "labels")
SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}
CARVE_SHARE = 0.1


def looks_like_file(name: str) -> bool:
    """True if ``name`` should be treated as a local file path rather than a hub dataset id."""
    path = Path(name).expanduser()
    return path.suffix.lower() in FILE_BUILDERS or path.exists()


def check_split_mapping(mapping: Mapping[str, Any]) -> dict[str, str]:
    """A mapping split → file, with canonical split names; raises unless it names train and known splits."""
    canonical: dict[str, str] = {}
    for key, path in mapping.items():
        split = SPLIT_ALIASES.get(str(key).lower())
        if split is None:
            raise FimloraError(
                f"dataset mapping key {key!r} is not a split; use train, validation (or valid, val, dev) "
                "and test."
            )
        if split in canonical:
            raise FimloraError(f"dataset mapping names the {split} split twice; keep one file per split.")
        if not isinstance(path, str) or not path.strip():
            raise FimloraError(f"dataset mapping: the {split} split needs a file path, got {path!r}.")
        canonical[split] = path
    if "train" not in canonical:
        raise FimloraError(f"dataset mapping needs a train file, got only {sorted(canonical)}.")
    return canonical


def dataset_label(dataset: str | Mapping[str, Any]) -> str:
    """A dataset as one string: itself, or a split mapping as ``train=a.csv,validation=b.csv``."""
    if isinstance(dataset, str):
        return dataset
    files = check_split_mapping(dataset)
    return ",".join(f"{split}={files[split]}" for split in SPLITS if split in files)


def split_files_in(directory: Path) -> dict[str, Path]:
    """The split files of a dataset directory: ``train.csv``, ``validation.jsonl``, … (other files are
    ignored; the files are only listed here, never opened)."""
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        split = SPLIT_ALIASES.get(path.stem.lower())
        if split is None or path.suffix.lower() not in FILE_BUILDERS:
            continue
        if split in found:
            raise FimloraError(
                f"Dataset directory {str(directory)!r} has two {split} files ({found[split].name}, "
                f"{path.name}); keep one."
            )
        found[split] = path
    if "train" not in found:
        raise FimloraError(
            f"Dataset directory {str(directory)!r} has no train file; add train.csv, train.json or "
            "train.jsonl (and optionally validation.* and test.*)."
        )
    return found


def load_file_dataset(
    name: str,
    *,
    seed: int,
    task: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    allowed: Collection[str] | None = None,
) -> TaskData:
    """Load a local ``.csv``, ``.json`` (array or lines) or ``.jsonl`` file, or a directory of split
    files, as :class:`TaskData`; ``allowed``: the splits that may be loaded (None: all)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return load_split_files(
            split_files_in(path),
            name=name,
            seed=seed,
            task=task,
            text_column=text_column,
            label_column=label_column,
            allowed=allowed,
        )
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise FimloraError(
            f"{name!r} exists but is not a .csv, .json or .jsonl file; convert it to one of those formats."
        )
    check_data_file(path, name)
    check_utf8(path, name)
    raw = _load_raw(builder, {"train": path}, name)
    data = normalize_splits(
        raw, name=name, seed=seed, task=task, text_column=text_column, label_column=label_column
    )
    return seal(data, allowed)


def load_split_files(
    files: Mapping[str, str | Path],
    *,
    name: str,
    seed: int,
    task: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    allowed: Collection[str] | None = None,
) -> TaskData:
    """Load one file per split (canonical split names → paths); only the ``allowed`` splits' files are
    opened, the splits that are missing and allowed are carved from train."""
    builders = {split: FILE_BUILDERS.get(Path(p).suffix.lower()) for split, p in files.items()}
    odd = [str(files[split]) for split, builder in builders.items() if builder is None]
    if odd:
        raise FimloraError(f"Dataset {name!r}: {odd[0]!r} is not a .csv, .json or .jsonl file.")
    if len(set(builders.values())) > 1:
        raise FimloraError(
            f"Dataset {name!r} mixes file formats ({', '.join(str(p) for p in files.values())}); use one "
            "format for every split."
        )
    allowed_set = set(SPLITS) if allowed is None else set(allowed)
    chosen = {split: Path(p).expanduser() for split, p in files.items() if split in allowed_set}
    for split, path in chosen.items():
        check_data_file(path, str(files[split]))
        check_utf8(path, str(files[split]))
    raw = _load_raw(next(iter(builders.values())) or "csv", chosen, name)
    sealed = [split for split in files if split not in allowed_set]
    data = normalize_splits(
        raw,
        name=name,
        seed=seed,
        task=task,
        text_column=text_column,
        label_column=label_column,
        sealed=sealed,
    )
    return seal(data, allowed)


def check_data_file(path: Path, name: str) -> None:
    """A FimloraError unless ``path`` (shown as ``name``) is a non-empty file."""
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the working directory, {Path.cwd()})"
        raise FimloraError(f"Data file {name!r} does not exist{where}; check the path.")
    if path.stat().st_size == 0:
        raise FimloraError(f"Data file {name!r} is empty; it needs a header (CSV) or records (JSON).")


def check_utf8(path: Path, name: str, chunk_bytes: int = 1 << 20) -> None:
    """A FimloraError naming the file, line and byte unless ``path`` is UTF-8 text (``datasets`` reads
    only UTF-8, and its own error names neither the file nor the problem)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                # The decoder may hold back a few bytes of an unfinished character from the last chunk.
                held = len(exc.object) - len(chunk)
                line += chunk[: max(exc.start - held, 0)].count(b"\n")
                bad = exc.object[exc.start : exc.start + 1].hex()
                raise FimloraError(
                    f"Data file {name!r} is not UTF-8 text: byte 0x{bad} at line {line} (byte "
                    f"{offset - held + exc.start}) is not valid UTF-8 ({exc.reason}); save the file as UTF-8."
                ) from None
            if not chunk:
                return
            offset += len(chunk)
            line += chunk.count(b"\n")


def _load_raw(builder: str, files: Mapping[str, Path], name: str) -> datasets.DatasetDict:
    builder_logger = logging.getLogger("datasets")
    level = builder_logger.level
    # datasets logs a failed file at ERROR before raising; the error below says it once, in one line.
    builder_logger.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files={s: str(p.resolve()) for s, p in files.items()})
    except Exception as exc:
        reason = _first_line(_root_cause(exc))
        if "corresponds to no data" in reason:
            # datasets' wording when the file parses but holds no records (e.g. a CSV with only a header).
            raise FimloraError(f"Data file {name!r} has no data rows; add some examples.") from exc
        raise FimloraError(
            f"Could not read {name!r} as {builder.upper()}: {reason}; fix the file's format."
        ) from exc
    finally:
        builder_logger.setLevel(level)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause of ``exc``: datasets wraps a parser's error in a generic one ("An error
    occurred while generating the dataset") that says nothing about the file."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def normalize_splits(
    raw: datasets.DatasetDict,
    *,
    name: str,
    seed: int,
    task: str | None,
    text_column: str | None,
    label_column: str | None,
    sealed: Collection[str] = (),
) -> TaskData:
    """Turn a source's splits with arbitrary columns into :class:`TaskData` (see module docstring).

    ``sealed``: splits the source provides but that were deliberately not loaded; they are neither
    carved nor present in the result (a :class:`~fimlora.data.registry.SealedSplits`).
    """
    splits = _canonical_splits(raw, name)
    columns = splits["train"].column_names
    text_col = _pick_column(columns, text_column, DEFAULT_TEXT_COLUMNS, "text", name)
    if text_col is None:
        raise FimloraError(
            f"Dataset {name!r} has no text column (looked for {list(DEFAULT_TEXT_COLUMNS)}); available "
            f"columns: {columns}; pass text_column."
        )
    label_col = _pick_column(columns, label_column, DEFAULT_LABEL_COLUMNS, "label", name)
    inferred: Task = "classification" if label_col else "causal-lm"
    resolved = inferred if task is None else check_task(task)
    if resolved == "classification" and label_col is None:
        raise FimloraError(
            f"Dataset {name!r} has no label column (looked for {list(DEFAULT_LABEL_COLUMNS)}; "
            f"available columns: {columns}); pass label_column or use task='causal-lm'."
        )
    if resolved == "classification" and label_col == text_col:
        raise FimloraError(
            f"Dataset {name!r}: the text and the label column are both {text_col!r}; give two different "
            f"columns (available: {columns})."
        )
    if resolved == "causal-lm":
        if label_column is not None:
            raise FimloraError(
                f"label_column={label_column!r} was given but the task is causal-lm, which "
                "uses no labels; drop label_column or use task='classification'."
            )
        label_col = None

    for split, ds in splits.items():
        wanted = [text_col] + ([label_col] if label_col else [])
        missing = [c for c in wanted if c not in ds.column_names]
        if missing:
            raise FimloraError(
                f"The {split} split of {name!r} lacks column(s) {missing}; available columns: "
                f"{ds.column_names}."
            )
        splits[split] = _rename(ds, {text_col: "text", **({label_col: "label"} if label_col else {})})
        _require_string_text(splits[split], text_col, name)

    splits = {split: _drop_missing(ds, "text", name, split) for split, ds in splits.items()}
    label_names = None
    if resolved == "classification":
        splits, label_names = _encode_labels(splits, name)
        class_label = datasets.ClassLabel(names=label_names)
        splits = {
            split: _drop_missing(ds, "label", name, split).cast_column("label", class_label)
            for split, ds in splits.items()
        }
        for split in ("validation", "test"):
            # An unlabeled evaluation split is useless for classification: replace it by a carved one.
            if split in splits and len(splits[split]) == 0 and len(raw[_raw_name(raw, split)]) > 0:
                logger.warning("the %s split of %s has no labels; carving a new one from train", split, name)
                del splits[split]

    if len(splits["train"]) == 0:
        raise FimloraError(
            f"Dataset {name!r} has no usable training examples (empty, or every row lacks a "
            "text or label); provide a non-empty dataset."
        )
    shares = {split: CARVE_SHARE for split in ("validation", "test") if split not in splits}
    shares = {split: share for split, share in shares.items() if split not in sealed}
    if shares:
        carved = carve_splits(splits["train"], shares, seed=seed, source=f"Dataset {name!r}")
        splits.update(carved)
    kept = {s: splits[s] for s in SPLITS if s in splits}
    result = SealedSplits(kept, sealed) if sealed else datasets.DatasetDict(kept)
    return check_task_data(TaskData(name, resolved, result, label_names))


def _canonical_splits(raw: datasets.DatasetDict, name: str) -> dict[str, datasets.Dataset]:
    found: dict[str, datasets.Dataset] = {}
    for split, ds in raw.items():
        canonical = SPLIT_ALIASES.get(str(split).lower())
        if canonical is None and len(raw) == 1:
            canonical = "train"
        if canonical is None:
            logger.warning("ignoring split %r of %s (not train/validation/test)", split, name)
            continue
        if canonical in found:
            raise FimloraError(
                f"Dataset {name!r} has two splits that both mean {canonical!r} ({list(raw)}); keep only one."
            )
        found[canonical] = ds
    if "train" not in found:
        raise FimloraError(f"Dataset {name!r} has no train split (it has {list(raw)}); provide one.")
    return found


def _raw_name(raw: datasets.DatasetDict, canonical: str) -> str:
    return next(str(s) for s in raw if SPLIT_ALIASES.get(str(s).lower()) == canonical)


def _pick_column(
    columns: list[str], requested: str | None, defaults: tuple[str, ...], role: str, name: str
) -> str | None:
    """The requested column (which must exist), else the first default present, else None."""
    if requested is not None:
        if requested not in columns:
            raise FimloraError(
                f"Dataset {name!r} has no {role} column {requested!r}; available columns: {columns}."
            )
        return requested
    return next((c for c in defaults if c in columns), None)


def _rename(ds: datasets.Dataset, mapping: dict[str, str]) -> datasets.Dataset:
    # A source column already called "text"/"label" that is *not* the chosen one would collide; it is
    # dropped, since the user explicitly picked another column for that role. A column that is itself
    # chosen (text_column: label, label_column: text: the two swapped) is renamed, never dropped, via a
    # temporary name so that the two renames cannot collide.
    clashes = [
        new for old, new in mapping.items() if new != old and new in ds.column_names and new not in mapping
    ]
    if clashes:
        ds = ds.remove_columns(clashes)
    moves = {old: new for old, new in mapping.items() if old != new}
    temporary = {old: f"__fimlora_{new}" for old, new in moves.items()}
    return ds.rename_columns(temporary).rename_columns({temporary[old]: new for old, new in moves.items()})


def _require_string_text(ds: datasets.Dataset, source_column: str, name: str) -> None:
    feature = ds.features["text"]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "null")):
        raise FimloraError(
            f"Column {source_column!r} of {name!r} holds {feature}, not text; choose a text "
            "column with text_column."
        )


def _drop_missing(ds: datasets.Dataset, column: str, name: str, split: str) -> datasets.Dataset:
    # Slicing reads the column in one batch; iterating a Column would format row by row.
    values = ds[column][:]
    if column == "text":
        keep = [i for i, v in enumerate(values) if v is not None and v.strip()]
    else:
        keep = [i for i, v in enumerate(values) if v is not None and v >= 0]
    if len(keep) < len(ds):
        logger.warning(
            "dropping %d of %d %s rows of %s with a missing %s",
            len(ds) - len(keep),
            len(ds),
            split,
            name,
            column,
        )
        ds = ds.select(keep)
    return ds


def _encode_labels(
    splits: dict[str, datasets.Dataset], name: str
) -> tuple[dict[str, datasets.Dataset], list[str]]:
    """Map labels to ids 0..K-1; returns the new splits (missing labels as -1) and the label names."""
    feature = splits["train"].features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return splits, list(feature.names)
    if not isinstance(feature, datasets.Value):
        raise FimloraError(
            f"The label column of {name!r} holds {feature}; expected one class per row "
            "(a string, integer or boolean)."
        )
    distinct: set = set()
    for ds in splits.values():
        distinct.update(v for v in ds.unique("label") if v is not None)
    if any(isinstance(v, float) for v in distinct):
        if not all(float(v).is_integer() for v in distinct):
            raise FimloraError(
                f"The label column of {name!r} holds non-integer numbers (regression "
                "targets?); only classification labels are supported."
            )
        distinct = {int(v) for v in distinct}
    try:
        ordered = sorted(distinct)
    except TypeError as exc:
        raise FimloraError(
            f"The label column of {name!r} mixes value types ({sorted(map(repr, distinct))[:5]}"
            "...); make every label the same type."
        ) from exc
    rows = sum(len(ds) for ds in splits.values())
    if len(ordered) > 1000 or (len(ordered) > 10 and len(ordered) > rows // 2):
        # Most rows a class of their own: a text, an id or a regression target, not a class label.
        texts = len(set().union(*(set(ds["text"][:]) for ds in splits.values())))
        hint = (
            f"; the text column has only {texts} distinct value(s): are text_column and label_column swapped?"
            if texts < len(ordered)
            else "; that looks like an id or a regression target, not a class label."
        )
        raise FimloraError(
            f"The label column of {name!r} has {len(ordered)} distinct values in {rows} rows{hint}"
        )
    ids = {value: i for i, value in enumerate(ordered)}
    names = [str(v) for v in ordered]
    encoded = {}
    for split, ds in splits.items():
        # None becomes -1 so that _drop_missing removes it like a ClassLabel's "no label".
        column = [-1 if v is None else ids[int(v) if isinstance(v, float) else v] for v in ds["label"][:]]
        encoded[split] = ds.remove_columns("label").add_column(
            "label", column, feature=datasets.Value("int64")
        )
    return encoded, names


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].rstrip(".")
