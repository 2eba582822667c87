"""Shared plumbing of the benchmark scripts: thread setup, peak memory, timing, environment, output.

Imported by the scripts in this directory only (it is not part of the ``fimlora`` package).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def set_threads(threads: int) -> None:
    """Pin the intra-op thread pools to ``threads``; call before anything imports torch.

    ``OMP_WAIT_POLICY`` defaults to PASSIVE (idle OpenMP threads sleep instead of spinning): on a shared
    CPU a spinning thread that waits at a barrier for a descheduled sibling made 2-thread runs 3-5× slower
    than 1-thread runs here. Set it in the environment to override.
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# glibc malloc: make process RSS follow the live tensors while memory is measured on CPU
# ------------------------------------------------------------------------------------------------


def rss_tracks_tensors() -> contextlib.AbstractContextManager[bool]:
    """While active, every allocation ≥ 64 KiB is its own mmap, returned to the OS when freed.

    glibc otherwise keeps freed tensor memory in its heap (its mmap threshold grows to 32 MiB after the
    first large free), so RSS would stay at the high-water mark of whatever ran before and a peak-RSS
    *delta* would read ~0. Timing runs do not use this (page faults on every allocation would slow
    them); afterwards the threshold is set to 32 MiB, the value glibc's own adaptation converges to.
    Yields False where this is not glibc (then RSS deltas are a lower bound).
    """
    from fimlora import glibc_malloc

    return glibc_malloc.rss_follows_tensors()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident set size now, in bytes."""
    return _rss_bytes()


class PeakMemoryDelta:
    """Peak memory of a phase above what was in use when it started, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at entry (the allocator's exact
    peak of live tensors). CPU: process RSS sampled every ``interval_s`` from ``/proc/self/statm`` by a
    thread (as ``fimlora.train.PeakMemory``, at a finer interval) minus RSS at entry; use inside
    :func:`rss_tracks_tensors` so freed memory leaves RSS.
    """

    def __init__(self, device: Any, interval_s: float = 0.001) -> None:
        self.device = device
        self.interval_s = interval_s
        self.delta_bytes = 0
        self.peak_bytes = 0  # the absolute peak (allocator peak on CUDA, RSS on CPU)
        self._start = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated − memory_allocated at start"
        return f"process RSS sampled every {self.interval_s * 1e3:g} ms from /proc/self/statm − RSS at start"

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, _rss_bytes())

    def __enter__(self) -> PeakMemoryDelta:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            from fimlora import glibc_malloc

            glibc_malloc.trim()
            self._start = self._peak = _rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.peak_bytes = peak
        self.delta_bytes = max(0, peak - self._start)


def torch_device(name: str) -> Any | None:
    """``torch.device(name)``, or ``None`` (after saying why on stderr) for CUDA without a GPU."""
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda given but CUDA is not available", file=sys.stderr)
        return None
    return device


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any) -> tuple[float, float]:
    """Wall seconds and process CPU seconds (all threads) of ``fn()``, device synchronised around it.

    On a shared CPU the wall time also counts the time other processes held the cores; the CPU time
    counts only this process's work (plus any spinning of its idle OpenMP threads).
    """
    synchronize(device)
    cpu = time.process_time()
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# ------------------------------------------------------------------------------------------------
# Environment and output
# ------------------------------------------------------------------------------------------------


def device_name(device: Any, threads: int) -> str:
    """A human-readable name of the compute device (CPU model and thread count, or the GPU's name)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {threads} threads (CPU, {os.cpu_count()} cores visible)"


def slug(text: str) -> str:
    """``text`` as a file-name stem: lower case, runs of other characters turned into one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80]


def device_slug(device: Any, threads: int) -> str:
    import torch

    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return f"cpu-{threads}threads"


def environment(device: Any, threads: int) -> dict[str, Any]:
    """Versions, git revision, device and load average: enough to know what a result was measured on."""
    # fimlora first: PEFT then imports bitsandbytes without its kernel-hub chatter.
    importlib.import_module("fimlora")
    import peft
    import torch
    import transformers

    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        revision += " (uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        revision = "unknown"
    import hashlib

    import fimlora

    # The working tree may differ from the revision: fingerprint the Fisher code actually measured.
    fisher_dir = Path(fimlora.__file__).resolve().parent / "fisher"
    digest = hashlib.sha256()
    for source in sorted(fisher_dir.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    return {
        "device": device_name(device, threads),
        "device_type": device.type,
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "git_revision": revision,
        "fimlora_fisher_sha256": digest.hexdigest()[:16],
        "load_average_at_start": list(os.getloadavg()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def settings_of(args: Any, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The script's arguments as JSON values (paths as strings), for the results file."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in skip}


def write_results(args: Any, device: Any, kind: str, report: dict[str, Any], markdown: str) -> None:
    """``<output_dir>/<stem>-<kind>.{json,md}`` (stem: ``--tag`` or the device, ``-quick`` appended), and
    a line saying so with the run's wall time."""
    stem = args.tag or device_slug(device, args.threads) + ("-quick" if args.quick else "")
    write_json(args.output_dir / f"{stem}-{kind}.json", report)
    write_text(args.output_dir / f"{stem}-{kind}.md", markdown)
    print(f"wrote {args.output_dir / f'{stem}-{kind}.md'} and .json ({report['wall_s']:.0f} s in all)")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ratio: float | None, target: float) -> str:
    """``"1.12× PASS"`` / ``"1.45× MISS"`` against an upper bound ``target``; ``"—"`` when not measured."""
    if ratio is None or ratio != ratio:
        return "—"
    return f"{ratio:.2f}× {'PASS' if ratio <= target else 'MISS'}"


def ratio_text(ratio: float | None) -> str:
    return "—" if ratio is None or ratio != ratio else f"{ratio:.2f}×"
