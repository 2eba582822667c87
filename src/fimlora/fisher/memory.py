"""Peak memory of a Fisher pass against a plain forward+backward, on one synthetic wide layer.

The case the estimator's chunking is built for: one ``nn.Linear(width, width, bias=False)`` applied to
``batch_size`` sequences of ``seq_len`` tokens (inputs drawn once, N(0, 1)), whose outputs are the logits
of a per-token cross-entropy over ``width`` classes (a causal-LM loss, so every token carries a label).
"Plain" is what training that layer costs: forward, loss, backward into ``weight.grad``. "Fisher" is
:func:`fimlora.fisher.estimate_fisher` on the same batch. Both count only memory allocated during the
call, above what the model and the batch already hold.

How memory is measured (``PeakMemory.method`` says which):

- CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the start (exact, live tensors).
- CPU: process RSS read from ``/proc/self/statm`` every millisecond by a thread, minus RSS at the start.
  glibc would keep freed tensors in its heap (so a later call would reuse them and show no growth); while
  measuring, allocations ≥ 64 KiB are made their own mappings and returned on free, so RSS follows the
  live tensors. Sampling can miss a peak shorter than a millisecond: the CPU figures are lower bounds.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from fimlora import glibc_malloc
from fimlora.fisher.estimator import DEFAULT_MAX_CHUNK_ELEMENTS, estimate_fisher
from fimlora.fisher.losses import per_example_loss


@dataclass(frozen=True)
class PeakMemory:
    """Peak bytes allocated during each call, above what was in use when it started."""

    plain_bytes: int
    fisher_bytes: int
    method: str

    @property
    def ratio(self) -> float:
        """Fisher peak / plain peak."""
        return self.fisher_bytes / self.plain_bytes if self.plain_bytes else float("nan")


class _SyntheticLayer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        # A ModuleList of identical blocks is what target-module resolution takes for the transformer.
        self.blocks = nn.ModuleList([nn.Linear(width, width, bias=False)])

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> SimpleNamespace:
        # ``input_ids`` carries the layer's float inputs (B, T, width).
        return SimpleNamespace(logits=self.blocks[0](input_ids))


def synthetic_layer_memory(
    *,
    statistic: str = "diagonal",
    with_gradient: bool = False,
    width: int = 4096,
    seq_len: int = 2048,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    seed: int = 0,
) -> PeakMemory:
    """Peak memory of ``estimate_fisher(statistic=..., with_gradient=...)`` and of a plain fwd+bwd.

    On the synthetic layer of the module docstring (default: 4096 × 4096, one sequence of 2048 tokens;
    float32). Memory in bytes; the ratio is what the estimator's chunking is judged by.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _SyntheticLayer(width).to(device).eval()
    inputs = torch.randn(batch_size, seq_len, width, generator=generator).to(device)
    labels = torch.randint(0, width, (batch_size, seq_len), generator=generator).to(device)
    batch = {
        "input_ids": inputs,
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device),
        "labels": labels,
    }

    def plain(batch: dict[str, torch.Tensor]) -> None:
        model.requires_grad_(True)
        per_example_loss(model(batch["input_ids"]).logits, batch["labels"]).sum().backward()
        model.zero_grad(set_to_none=True)

    def fisher(batch: dict[str, torch.Tensor]) -> None:
        estimate_fisher(
            model,
            [batch],
            statistic=statistic,
            with_gradient=with_gradient,
            max_chunk_elements=max_chunk_elements,
            progress=False,
        )

    # Kernels and thread pools start on a small batch, outside the measurement.
    small = {k: v[:, : min(seq_len, 8)] for k, v in batch.items()}
    plain(small)
    fisher(small)
    plain_bytes, method = _peak_bytes(lambda: plain(batch), device)
    fisher_bytes, _ = _peak_bytes(lambda: fisher(batch), device)
    return PeakMemory(plain_bytes=plain_bytes, fisher_bytes=fisher_bytes, method=method)


def _peak_bytes(fn: Callable[[], None], device: torch.device) -> tuple[int, str]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return max(0, peak - start), "torch.cuda.max_memory_allocated − memory_allocated at start"
    with glibc_malloc.rss_follows_tensors() as exact:
        start = _rss_bytes()
        peak = start
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.001):
                peak = max(peak, _rss_bytes())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            fn()
        finally:
            stop.set()
            thread.join()
        peak = max(peak, _rss_bytes())
    method = "process RSS sampled every 1 ms − RSS at start" + ("" if exact else " (not glibc: lower bound)")
    return max(0, peak - start), method


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        import psutil

        return int(psutil.Process().memory_info().rss)
