"""What a dataset *is*, by content: the identity that decides whether a finished run, a cached Fisher, a
sweep run or a tuning study still holds for the data now on disk.

- local files (one file, a directory of split files, a mapping split → file): the SHA-256 of each
  file's bytes. Only the files of the splits that may be loaded count: a sealed split's file (the test
  file while tuning) is never opened, so editing it changes nothing that was computed without it.
- a built-in dataset: its name and the version of its content declared when it was registered (the
  asset it is read from and the loader's rule, e.g. ``vader-3.3.2``).
- a hub dataset: its id and ``hub_config``; the hub's revision is not pinned (a known limitation).

The settings that shape the splits (``data_seed``, ``dataset_options``, ``task``) are part of the config
and are compared with it; this module covers what the config cannot see: the bytes behind a name.

:meth:`DataIdentity.fingerprint` is content only (a moved file with the same bytes has the same
fingerprint); :meth:`DataIdentity.record` adds the paths and sizes for ``result.json`` (``data``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fimlora.data.files import (
    check_data_file,
    check_split_mapping,
    dataset_label,
    looks_like_file,
    split_files_in,
)
from fimlora.data.registry import SPLITS, registered_task, registered_version
from fimlora.io import sha256_file

Source = Literal["files", "builtin", "hub"]
#: Hex digits of a SHA-256 shown in messages (the record keeps all 64).
SHORT_DIGEST = 12
#: The "split" of a single data file whose validation and test splits are carved out of it.
WHOLE_FILE = "file"


@dataclass(frozen=True)
class DataFile:
    """One local data file: the split it holds (or :data:`WHOLE_FILE`), its path as configured, its
    SHA-256 and size in bytes."""

    split: str
    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class DataIdentity:
    """The content identity of a dataset (see the module docstring)."""

    source: Source
    name: str
    files: tuple[DataFile, ...] = ()
    revision: str | None = None

    def fingerprint(self) -> dict[str, Any]:
        """Content only: what a cache key or a reuse decision compares."""
        if self.source == "files":
            return {"source": "files", "sha256": {f.split: f.sha256 for f in self.files}}
        return {"source": self.source, "name": self.name, "revision": self.revision}

    def record(self) -> dict[str, Any]:
        """The fingerprint plus paths and sizes, for ``result.json``."""
        return {
            "source": self.source,
            "name": self.name,
            "revision": self.revision,
            "files": [
                {"split": f.split, "path": f.path, "sha256": f.sha256, "bytes": f.bytes} for f in self.files
            ],
        }

    @classmethod
    def from_record(cls, record: Any) -> DataIdentity | None:
        """The version a ``result.json`` recorded (None when it recorded none, or something unreadable)."""
        if not isinstance(record, Mapping) or record.get("source") not in ("files", "builtin", "hub"):
            return None
        try:
            files = tuple(
                DataFile(str(f["split"]), str(f["path"]), str(f["sha256"]), int(f["bytes"]))
                for f in record.get("files") or []
            )
        except (KeyError, TypeError, ValueError):
            return None
        revision = record.get("revision")
        return cls(
            record["source"], str(record.get("name", "")), files, None if revision is None else str(revision)
        )


def data_identity(
    dataset: str | Mapping[str, str],
    *,
    hub_config: str | None = None,
    splits: Collection[str] | None = None,
) -> DataIdentity:
    """The content identity of ``dataset`` as :func:`fimlora.data.load_task_data` would resolve it;
    ``splits``: the splits that may be loaded (None: all). Hashes local files (a FimloraError when one
    is missing or empty, worded as loading it would be)."""
    allowed = set(SPLITS) if splits is None else set(splits)
    if not isinstance(dataset, str):
        chosen = {s: p for s, p in check_split_mapping(dataset).items() if s in allowed}
        return _files_version(
            dataset_label(dataset), {s: (p, Path(p).expanduser()) for s, p in chosen.items()}
        )
    if registered_task(dataset) is not None:
        return DataIdentity("builtin", dataset, revision=registered_version(dataset))
    if looks_like_file(dataset):
        path = Path(dataset).expanduser()
        if path.is_dir():
            found = {s: p for s, p in split_files_in(path).items() if s in allowed}
            return _files_version(dataset, {s: (str(p), p) for s, p in found.items()})
        return _files_version(dataset, {WHOLE_FILE: (dataset, path)})
    return DataIdentity("hub", dataset, revision=hub_config)


def _files_version(name: str, files: Mapping[str, tuple[str, Path]]) -> DataIdentity:
    entries = []
    for split in [*SPLITS, WHOLE_FILE]:
        if split not in files:
            continue
        shown, path = files[split]
        check_data_file(path, shown)
        entries.append(DataFile(split, shown, sha256_file(path), path.stat().st_size))
    return DataIdentity("files", name, tuple(entries))


def data_changes(stored: Any, current: DataIdentity) -> str | None:
    """How the data a finished run recorded (its ``result.json`` ``data`` entry) differs from
    ``current``, naming the files; None when it is the same data.

    A run made before runs recorded their data: a built-in or hub dataset is taken as unchanged (nothing
    but the name identified it then, and the config compares the name); local files are refused, since
    nothing shows which bytes the run read.
    """
    before = DataIdentity.from_record(stored.get("identity") if isinstance(stored, Mapping) else None)
    if before is None:
        if current.source == "files":
            return (
                f"its data files ({', '.join(f.path for f in current.files)}) were not recorded by the "
                "fimlora that made it, so nothing shows they are unchanged"
            )
        return None
    if before.fingerprint() == current.fingerprint():
        return None
    if before.source == "files" and current.source == "files":
        old = {f.split: f for f in before.files}
        new = {f.split: f for f in current.files}
        changed = [f"{f.path} (added)" for split, f in new.items() if split not in old]
        changed += [f"{f.path} (no longer used)" for split, f in old.items() if split not in new]
        changed += [
            f"{f.path} changed (sha256 {old[split].sha256[:SHORT_DIGEST]}… → {f.sha256[:SHORT_DIGEST]}…)"
            for split, f in new.items()
            if split in old and old[split].sha256 != f.sha256
        ]
        if changed:
            return "data file " + ", ".join(changed)
    return f"data {describe_identity(before)} → {describe_identity(current)}"


def describe_identity(version: DataIdentity) -> str:
    """``reviews.csv sha256 1a2b3c4d5e6f…``, ``movie-reviews (vader-3.3.2)``: one version in a few words."""
    if version.source == "files":
        return ", ".join(f"{f.path} sha256 {f.sha256[:SHORT_DIGEST]}…" for f in version.files)
    return f"{version.name} ({version.revision or 'no revision'})"
