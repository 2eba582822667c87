"""Two gloo processes, each on its own shard, return what one process returns on the union of the data."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fisher.fisher_testing import assert_close_relative, padded_batches
from tiny_models import make_tiny_bert

from fimlora import estimate_fisher
from fimlora.fisher import FisherResult

RUNS = {"diagonal": {}, "trace": {"with_gradient": True}, "kfac": {"with_gradient": True}}


def data():
    return padded_batches([5, 9, 3, 12, 7, 4, 8, 6, 10, 2], num_labels=3, batch_size=2)


def _worker(rank: int, world_size: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        model = make_tiny_bert(num_labels=3)
        shard = data()[rank::world_size]
        for statistic, options in RUNS.items():
            result = estimate_fisher(model, shard, statistic=statistic, progress=False, **options)
            result.save(os.path.join(out_dir, f"{statistic}-rank{rank}"))
    finally:
        dist.destroy_process_group()


def _tensors(result: FisherResult) -> dict[str, torch.Tensor]:
    out = {}
    for name in result.shapes:
        if result.diagonal is not None:
            out[f"diag/{name}"] = result.diagonal[name]
        if result.traces is not None:
            out[f"trace/{name}"] = torch.tensor(result.traces[name])
        if result.kfac is not None:
            out[f"A/{name}"], out[f"S/{name}"] = result.kfac[name]
        if result.gradients is not None:
            out[f"grad/{name}"] = result.gradients[name]
    return out


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_equal_one_process_on_the_union(tmp_path):
    world_size = 2
    # Forked ranks inherit the imported torch and transformers (spawned ones spend ~10 s importing them);
    # each sets one intra-op thread first, as DataLoader workers do.
    mp.start_processes(
        _worker,
        args=(world_size, str(tmp_path / "rendezvous"), str(tmp_path)),
        nprocs=world_size,
        join=True,
        start_method="fork" if sys.platform == "linux" else "spawn",
    )
    model = make_tiny_bert(num_labels=3)
    for statistic, options in RUNS.items():
        single = estimate_fisher(model, data(), statistic=statistic, progress=False, **options)
        ranks = [FisherResult.load(tmp_path / f"{statistic}-rank{r}") for r in range(world_size)]
        for result in ranks:
            assert result.num_examples == single.num_examples == 10
            assert result.metadata["world_size"] == world_size
            assert result.metadata.get("num_tokens") == single.metadata.get("num_tokens")
            assert_close_relative(_tensors(result), _tensors(single), tol=1e-6)
        # Every rank holds the same numbers, bit for bit.
        first, second = (_tensors(r) for r in ranks)
        assert all(torch.equal(first[k], second[k]) for k in first)
