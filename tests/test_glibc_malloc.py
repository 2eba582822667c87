"""``fimlora.glibc_malloc``: with the threshold the fimlora command pins, blocks freed between long-lived
small allocations leave the process; with glibc's default they stay in its heap (the look-alike)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fimlora import glibc_malloc

pytestmark = pytest.mark.skipif(glibc_malloc.glibc() is None, reason="glibc's malloc")

# 100 blocks of 1 MiB (written, as a tensor's are), each followed by a small long-lived block, then all
# 100 freed: the MiB still resident. Through malloc directly, as PyTorch's CPU allocator allocates.
SCRIPT = textwrap.dedent(
    """
    import ctypes, sys
    from fimlora import glibc_malloc
    if sys.argv[1] == "pinned":
        glibc_malloc.pin_mmap_threshold(glibc_malloc.COMMAND_MMAP_THRESHOLD)
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    # Freed, a 16 MiB mapping makes glibc's default serve blocks below 16 MiB from its heap.
    libc.free(ctypes.c_void_p(libc.malloc(16 * 2**20)))
    before = rss()
    blocks, small = [], []
    for _ in range(100):
        blocks.append(libc.malloc(2**20))
        ctypes.memset(blocks[-1], 1, 2**20)
        small.append(libc.malloc(1024))
    for block in blocks:
        libc.free(ctypes.c_void_p(block))
    print((rss() - before) / 2**20)
    """
)


def _retained_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def test_freed_tensors_leave_the_process_once_the_threshold_is_pinned() -> None:
    assert _retained_mib("pinned") < 5
    assert _retained_mib("default") > 50  # what glibc's adaptive threshold keeps (of 100 MiB)


def test_the_fimlora_command_pins_it(monkeypatch) -> None:
    from fimlora import cli

    pinned: list[int] = []
    monkeypatch.setattr(glibc_malloc, "pin_mmap_threshold", lambda threshold, **_: pinned.append(threshold))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert pinned == [glibc_malloc.COMMAND_MMAP_THRESHOLD]
