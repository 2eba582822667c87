"""Summing a Fisher pass's accumulators over the ranks of a ``torch.distributed`` process group.

Every statistic of :func:`fimlora.fisher.estimate_fisher` is a sum over examples (or tokens) divided by
a count, so a distributed pass sums the per-rank sums and counts, then divides: each rank ends with the
result a single process would get on the union of the shards (up to floating-point summation order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a default process group is initialised (and has more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group, ``(0, 1)`` outside distributed runs."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor in place over all ranks (a no-op outside distributed runs).

    NCCL reduces only CUDA tensors: CPU tensors go through the current CUDA device and back.
    """
    if not is_distributed():
        return
    via_cuda = dist.get_backend() == "nccl"
    for tensor in tensors:
        if via_cuda and tensor.device.type != "cuda":
            staged = tensor.to(f"cuda:{torch.cuda.current_device()}")
            dist.all_reduce(staged, op=dist.ReduceOp.SUM)
            tensor.copy_(staged)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
