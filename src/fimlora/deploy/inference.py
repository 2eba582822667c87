"""Inference speed and memory of a trained model unmerged, merged, and of its base model.

A *workload* is a fixed set of inputs and what is counted:

* classification: forward passes over fixed batches of examples (no gradients, eval mode) →
  **examples/s**;
* causal LM: greedy generation of exactly ``new_tokens`` tokens (EOS suppressed) from a batch of prompts
  of equal length (no padding) → **generated tokens/s** (prompt tokens are not counted; the prefill is
  timed with the rest, as a user waiting for the answer sees it).

Every model first runs the workload once untimed (the warm-up), which is also where its peak memory is
measured; then the models take turns, ``repeats`` times with the order rotated so that a change of machine
load hits them alike, and each model's median wall time counts. Peak memory = the bytes of the model's
own weights (parameters and buffers, each storage once) + the most memory its workload held on top of
what was in use when it started: the CUDA allocator's peak on a GPU; on a CPU, process RSS sampled every
millisecond, a lower bound (memory the allocator reuses without returning it does not show).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fimlora.train import PeakMemory

REPEATS = 3
MEMORY_KINDS = {
    "cuda": "weights + CUDA allocator peak above the start of the pass",
    "cpu": "weights + sampled process RSS above the start of the pass (a lower bound)",
}


@dataclass
class Workload:
    """``run(model)`` does the work once and returns how many units it produced; ``unit`` names them."""

    run: Callable[[nn.Module], int]
    unit: str
    description: str


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
    return total


def directory_bytes(path: str | os.PathLike[str]) -> int:
    """Total size of the files below ``path`` (an adapter directory as it lies on disk), in bytes."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _timed(model: nn.Module, workload: Workload, device: torch.device) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    units = workload.run(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, units


@torch.no_grad()
def measure(models: Mapping[str, nn.Module], workload: Workload, *, repeats: int = REPEATS) -> dict[str, Any]:
    """Throughput and peak memory of each model on ``workload`` (module docstring).

    Returns ``{"unit", "workload", "repeats", "memory_kind", "models": {name: {"per_s", "seconds",
    "units", "peak_memory_bytes", "weights_bytes"}}}``; ``per_s`` = units / median wall seconds.
    """
    names = list(models)
    device = next(next(iter(models.values())).parameters()).device
    for model in models.values():
        model.eval()
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        # Sampled every millisecond: one forward pass of a small model holds its peak only briefly.
        with PeakMemory(device, interval_s=0.001) as peak:
            workload.run(models[name])
        out[name] = {"weights_bytes": weights_bytes(models[name]), "transient_bytes": peak.above_start_bytes}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    units: dict[str, int] = {}
    for index in range(repeats):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            elapsed, units[name] = _timed(models[name], workload, device)
            seconds[name].append(elapsed)
    for name in names:
        median = statistics.median(seconds[name])
        entry = out[name]
        entry.update(
            {
                "per_s": units[name] / median if median > 0 else float("nan"),
                "seconds": median,
                "units": units[name],
                "peak_memory_bytes": entry["weights_bytes"] + entry.pop("transient_bytes"),
            }
        )
    return {
        "unit": workload.unit,
        "workload": workload.description,
        "repeats": repeats,
        "device": str(device),
        "memory_kind": MEMORY_KINDS["cuda" if device.type == "cuda" else "cpu"],
        "models": out,
    }


def classification_workload(batches: list[dict[str, torch.Tensor]]) -> Workload:
    """Forward passes over ``batches`` (``input_ids``, ``attention_mask``), counted in examples."""
    count = sum(int(b["input_ids"].shape[0]) for b in batches)

    def run(model: nn.Module) -> int:
        device = next(model.parameters()).device
        for batch in batches:
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        return count

    width = max(int(b["input_ids"].shape[1]) for b in batches)
    return Workload(
        run, "examples/s", f"{count} examples in {len(batches)} batch(es), up to {width} tokens, forward only"
    )


def generation_workload(prompts: torch.Tensor, *, new_tokens: int, pad_token_id: int) -> Workload:
    """Greedy generation of exactly ``new_tokens`` tokens from each row of ``prompts`` (equal lengths,
    no padding), counted in generated tokens."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
        eos_token_id=None,
    )
    batch, length = prompts.shape

    def run(model: nn.Module) -> int:
        device = next(model.parameters()).device
        ids = prompts.to(device)
        out = model.generate(  # type: ignore[operator]
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
        return int(out.shape[0] * (out.shape[1] - length))

    return Workload(
        run,
        "tokens/s",
        f"{batch} prompt(s) × {length} tokens, {new_tokens} new tokens each, greedy, KV cache",
    )


def ratios(record: Mapping[str, Any]) -> dict[str, float | None]:
    """``merged_over_base`` and ``unmerged_over_base``: throughput relative to the base model's."""
    models = record.get("models") or {}
    base = (models.get("base") or {}).get("per_s")
    out: dict[str, float | None] = {}
    for name in ("merged", "unmerged"):
        value = (models.get(name) or {}).get("per_s")
        out[f"{name}_over_base"] = value / base if value and base else None
    return out
