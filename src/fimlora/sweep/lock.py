"""One sweep at a time per store: two sweeps would both see an unfinished run as theirs to (re-)run.

Each run also holds a lock on its own directory while it executes, so that a reader (``--dry-run``) can
tell a run in progress from one that was interrupted: the kernel drops the lock when its holder ends or
dies, so a killed run reads as interrupted at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from fimlora.errors import FimloraError
from fimlora.io import ensure_directory

LOCK_FILE = ".sweep.lock"
RUN_LOCK_FILE = ".running"


@contextlib.contextmanager
def store_lock(store: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``store`` for the duration; fail at once if another holds it.

    ``flock`` is released by the kernel when its holder dies, so a killed sweep never leaves a stale
    lock behind. The file keeps the holder's pid for the error message only. Where ``fcntl`` does not
    exist (Windows) the sweep runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    ensure_directory(store, "sweep output_dir")
    path = store / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise FimloraError(
                f"Another sweep (pid {holder}) is running on {store}; wait for it to end, or give this "
                "sweep another output_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (created if missing), waiting for it; the
    kernel drops it when its holder dies. Unlocked where ``fcntl`` does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Hold a lock on one run's ``directory`` while it executes (see :func:`is_locked`)."""
    with exclusive(directory / RUN_LOCK_FILE):
        yield


def is_locked(path: Path) -> bool:
    """Whether some live process holds the lock file ``path`` (never true where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def store_holder(store: Path) -> str | None:
    """The pid of the sweep running on ``store``, or None when none is."""
    path = store / LOCK_FILE
    if not is_locked(path):
        return None
    try:
        return path.read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"
