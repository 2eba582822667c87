"""Killing a real `fimlora` process at a chosen moment (SIGKILL: no handler runs, as in a power cut)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

# Every process alike (one thread): the same run gives bit-identical numbers in each of them.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def fimlora_command(*argv: object) -> list[str]:
    return [sys.executable, "-m", "fimlora.cli", *map(str, argv)]


def kill_when(argv: list[str], ready: Callable[[], bool], *, timeout_s: float = 300) -> None:
    """Start ``argv`` and SIGKILL it as soon as ``ready()`` holds; fail if it ends or times out first."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert proc.poll() is None, "the process ended before it could be interrupted"
            assert time.monotonic() < deadline, "the moment to interrupt never came"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
