"""Run directories: everything needed to reproduce and audit one trained method.

Layout of ``<output_dir>/<method>/``::

    config.yaml          resolved config of this run
    environment.json     package versions, git revision, seed, device, threads
    fisher.json          per-module Fisher scores used (+ fisher.safetensors, hard-linked to the
    fisher.safetensors   experiment's shared copy, when the method uses the Fisher)
    allocation.json      ranks per module, budget, parameter count
    adapter/             PEFT adapter (adapter_config.json + adapter_model.safetensors)
    metrics.jsonl        one line per training step
    result.json          written last, atomically: a run is finished iff this file exists

A directory without ``result.json`` is an unfinished run; starting that run again clears it first.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from fimlora.io import atomic_write_json, atomic_write_text

RESULT_FILE = "result.json"
CONFIG_FILE = "config.yaml"  # the run's resolved config, written when it starts
ADAPTER_DIR = "adapter"  # the trained adapter (or full model), saved when it finishes
_PACKAGES = ("fimlora", "torch", "transformers", "peft", "datasets", "accelerate", "safetensors", "numpy")


def git_revision(path: Path) -> str | None:
    """``HEAD`` of the repository holding ``path``, suffixed ``-dirty`` when files below ``path`` have
    uncommitted changes (the code a run imports, not, say, a tuning database a study keeps writing)."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def source_revision() -> str | None:
    """:func:`git_revision` of fimlora's own source, read once per process: a sweep or tuning worker runs
    the code it imported when it started, so a commit made while it runs must not relabel its later runs."""
    return git_revision(Path(__file__).resolve().parent)


def environment(seed: int) -> dict[str, Any]:
    import torch  # here, not at the top: reading run records (results, reports) needs no torch

    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "seed": seed,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_revision": source_revision(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "command": " ".join(sys.argv),
    }


class RunDirectory:
    """One run's directory; see the module docstring for its layout and the finished-ness rule."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def is_finished(self) -> bool:
        try:
            return json.loads(self.file(RESULT_FILE).read_text(encoding="utf-8")).get("status") == "finished"
        except (OSError, ValueError):
            return False

    def read_result(self) -> dict[str, Any]:
        return json.loads(self.file(RESULT_FILE).read_text(encoding="utf-8"))

    def start(self, config_yaml: str, env: dict[str, Any]) -> None:
        """Begin (or begin again) a run: leftovers of an unfinished attempt are removed first."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        atomic_write_text(self.file(CONFIG_FILE), config_yaml)
        atomic_write_json(self.file("environment.json"), env)

    def link(self, source: Path, name: str) -> None:
        """Hard-link a large shared file (e.g. the Fisher) into the run; copy where links are impossible."""
        target = self.file(name)
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    def finish(self, result: dict[str, Any]) -> None:
        atomic_write_json(self.file(RESULT_FILE), {"status": "finished", **result})


#: A split whose examples were cut at ``train.max_length`` more often than this (result.json
#: ``data.truncated``) is warned about when the run starts and flagged in the report.
TRUNCATION_WARN_SHARE = 0.1


# Methods whose ranks change after the allocation (AdaLoRA prunes while training, EVA redistributes at
# initialisation, fisher-online re-allocates while training) record the ranks they end with under one of
# these keys of result.json["records"][...].
RANK_RECORD_KEYS = ("final_ranks", "redistributed_ranks", "reallocated_ranks")


def trained_ranks(result: Mapping[str, Any]) -> tuple[dict[str, int], str] | None:
    """The ranks a method ended with when they differ from its allocation, and the record key they
    came from (see ``RANK_RECORD_KEYS``); ``None`` when the allocation's ranks are the trained ones."""
    records = result.get("records")
    if not isinstance(records, Mapping):
        return None
    for record in records.values():
        if not isinstance(record, Mapping):
            continue
        for key in RANK_RECORD_KEYS:
            ranks = record.get(key)
            if isinstance(ranks, Mapping) and ranks and all(_is_rank(v) for v in ranks.values()):
                return {str(name): int(rank) for name, rank in ranks.items()}, key
    return None


# Methods whose ranks move during training (AdaLoRA, fisher-online) record snapshots of them under this
# key of result.json["records"][...]: a list of {"step": optimizer steps done, "ranks": {module: rank}}.
RANK_HISTORY_KEY = "rank_history"


def rank_history(result: Mapping[str, Any]) -> list[tuple[int, dict[str, int]]] | None:
    """The ``(step, ranks)`` snapshots a dynamic method recorded (``RANK_HISTORY_KEY``), in step order;
    ``None`` when the run has fewer than two (its ranks did not move during training)."""
    records = result.get("records")
    if not isinstance(records, Mapping):
        return None
    for record in records.values():
        history = record.get(RANK_HISTORY_KEY) if isinstance(record, Mapping) else None
        if not isinstance(history, list):
            continue
        snapshots = []
        for entry in history:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("ranks"), Mapping):
                break
            step, ranks = entry.get("step"), entry["ranks"]
            if not isinstance(step, int) or not ranks or not all(_is_rank(v) for v in ranks.values()):
                break
            snapshots.append((step, {str(name): int(rank) for name, rank in ranks.items()}))
        else:
            if len(snapshots) >= 2:
                return sorted(snapshots, key=lambda snapshot: snapshot[0])
    return None


def rank_range(result: Mapping[str, Any]) -> tuple[dict[str, float | None], str] | None:
    """``{"min", "mean", "max"}`` of the ranks a run trained at the end, and where they come from
    (``"allocation"`` or a key of ``RANK_RECORD_KEYS``); ``None`` for methods without ranks (full FT)."""
    trained = trained_ranks(result)
    if trained is not None:
        values = list(trained[0].values())
        return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}, trained[1]
    alloc = result.get("allocation")
    if not isinstance(alloc, Mapping) or not alloc:
        return None
    return {key: alloc.get(f"{key}_rank") for key in ("min", "mean", "max")}, "allocation"


def _is_rank(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
