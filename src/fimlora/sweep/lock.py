"""One sweep at a time per store: two sweeps would both see an unfinished run as theirs to (re-)run."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from fimlora.errors import FimloraError

LOCK_FILE = ".sweep.lock"


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
    store.mkdir(parents=True, exist_ok=True)
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
