"""File I/O: atomic writes (a reader sees the old file or the complete new one, never half of one),
digests, and reading the JSON files fimlora writes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fimlora.errors import FimloraError


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary sibling of ``path``, then rename it onto ``path``.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        ordinary_permissions(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # the rename must not land before the data does

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_json_and_records(
    out: str | os.PathLike[str], json_name: str, obj: Any, csv_name: str, records: list[dict[str, Any]]
) -> dict[str, Path]:
    """An analysis's two files in ``out``, each atomically: ``json_name`` (everything) and ``csv_name``
    (``records``, one row each). Returns ``{"json": path, "csv": path}``."""
    import pandas as pd

    directory = Path(out)
    frame = pd.DataFrame(records)
    return {
        "json": atomic_write_json(directory / json_name, obj),
        "csv": atomic_write(directory / csv_name, lambda tmp: frame.to_csv(tmp, index=False)),
    }


def ordinary_permissions(path: Path) -> None:
    """Give a file or directory made by ``tempfile`` (owner-only) the mode a plain ``open``/``mkdir``
    would have given it under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def ensure_directory(path: str | os.PathLike[str], what: str) -> Path:
    """Create directory ``path`` (and its parents) if needed; a path that is a file or cannot be created
    is a one-line ``FimloraError`` naming ``what`` it was meant to be (e.g. ``"output_dir"``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FimloraError(f"{what} {path} is a file, not a directory; give a directory path.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            reason = f"{blocker} is a file"
        raise FimloraError(f"Cannot create {what} {path}: {reason}; give a writable directory.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FimloraError(f"{what} {path} is not writable; give a writable directory.")
    return path


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (files may be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_json_of_kind(path: str | os.PathLike[str], kind: str) -> dict[str, Any] | None:
    """The JSON object at ``path`` if it declares ``"kind": kind``; None if it is missing, unreadable or
    another kind of file (the analysis outputs name their kind so that a reader can tell them apart)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == kind else None
