"""glibc's malloc and freed tensors: give each tensor its own mapping, returned to the OS when freed.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves requests below its mmap
threshold from its heap and, by default, raises that threshold to the size of any mapped block that is
freed (up to 32 MiB on 64-bit systems). After the first large tensor is freed, tensors up to that size
come from the heap; freed, they stay there, and the holes they leave between longer-lived blocks are
reused only by requests that fit. Over a quantised load (a float tensor read, quantised and freed per
layer) or a Fisher pass (activations of several sizes per block, every batch) the heap grows by hundreds
of megabytes the process holds without using (benchmarks/README.md, "Whole-process memory": SmolLM2's
``fimlora run`` peaks hundreds of MB higher with glibc's default).

:func:`pin_mmap_threshold` fixes the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the
adaptation off): every block of at least that size is its own mapping and leaves RSS when freed. The
``fimlora`` command pins it at :data:`COMMAND_MMAP_THRESHOLD` for its own process; importing fimlora
changes nothing. The price is a page fault per page of every such tensor (system time: a few percent
of a Fisher pass on SmolLM2).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from typing import Any

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# What the fimlora command pins: 256 KiB, above the many small allocations of Python objects and
# bookkeeping, below every activation or weight block of a model worth measuring.
COMMAND_MMAP_THRESHOLD = 256 * 1024

# The values glibc's own adaptation converges to after large blocks were freed (malloc.c:
# DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, and twice that for trimming).
CONVERGED_MMAP_THRESHOLD = 32 * 1024 * 1024
CONVERGED_TRIM_THRESHOLD = 64 * 1024 * 1024


@functools.cache
def glibc() -> Any | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (glibc only)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def pin_mmap_threshold(threshold: int, *, trim_threshold: int | None = None) -> bool:
    """Every allocation of at least ``threshold`` bytes gets its own mapping, unmapped when freed.

    ``trim_threshold``: also fix how much free memory at the top of the heap glibc keeps (default:
    unchanged). Returns False (and changes nothing) where the C library is not glibc.
    """
    libc = glibc()
    if libc is None:
        return False
    libc.mallopt(M_MMAP_THRESHOLD, threshold)
    if trim_threshold is not None:
        libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
    return True


def trim() -> None:
    """Return the heap's free pages to the OS now (glibc's ``malloc_trim(0)``; nothing elsewhere)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def rss_follows_tensors() -> Iterator[bool]:
    """While active, every allocation of at least 64 KiB is its own mapping and the heap is trimmed at
    128 KiB: process RSS follows the live tensors (for measuring a peak as a difference of RSS).

    Afterwards the thresholds are those glibc's adaptation converges to. Yields False (and changes
    nothing) where this is not glibc; RSS differences are then a lower bound.
    """
    if not pin_mmap_threshold(64 * 1024, trim_threshold=128 * 1024):
        yield False
        return
    trim()
    try:
        yield True
    finally:
        pin_mmap_threshold(CONVERGED_MMAP_THRESHOLD, trim_threshold=CONVERGED_TRIM_THRESHOLD)
