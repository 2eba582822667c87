"""One experiment across several processes (``torchrun`` / ``accelerate launch``): who writes, who waits.

Under a launcher every process runs the whole pipeline. All of them take part in the Fisher pass (each on
its shard of the calibration examples; the sums are all-reduced, see :mod:`fimlora.fisher.distributed`)
and in training (the Trainer's DistributedDataParallel, ``train.batch_size`` split across processes).
Only the main process evaluates and writes run directories; the others wait for it at a barrier, so
every process sees the same finished runs before the next method starts. A single process (no
launcher) is the ordinary case: every function here is then a no-op or answers for rank 0 of 1.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# torch is imported inside the functions: `launched_world_size` serves commands that never load it
# (e.g. `fimlora sweep --dry-run`).


def launched_world_size() -> int:
    """The number of processes a launcher started (its ``WORLD_SIZE``; 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def join_launched_processes() -> None:
    """Initialise the process group the launcher describes, before the Fisher pass needs it.

    Through accelerate's ``PartialState``, the object the Trainer uses later: it picks the backend
    (NCCL on GPUs, gloo on CPUs), binds each process to its GPU, and the Trainer reuses the group.
    """
    from fimlora.fisher.distributed import is_distributed

    if launched_world_size() <= 1 or is_distributed():
        return
    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    from fimlora.fisher.distributed import rank_and_world_size

    return rank_and_world_size()[0] == 0


def world_size() -> int:
    from fimlora.fisher.distributed import rank_and_world_size

    return rank_and_world_size()[1]


def wait_for_everyone() -> None:
    from fimlora.fisher.distributed import is_distributed

    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first (filling caches: datasets, converted checkpoints), then the
    others, which find them ready instead of writing the same files at once."""
    if not is_main_process():
        wait_for_everyone()
    try:
        yield
    finally:
        if is_main_process():
            wait_for_everyone()
