"""Expansion: a sweep spec → one resolved, validated :class:`ExperimentConfig` per grid point.

Each run lives in ``<sweep output>/<key>/``, where ``key`` is a readable prefix plus a short hash of the
resolved config (everything except ``output_dir``)::

    <sweep output>/fim-lora-r4-s0-3f9c0a1b2d/
        run.log               what the run printed (latest attempt)
        failure.txt           traceback of the latest attempt, if it failed
        .running              locked while a sweep executes the run (see fimlora.sweep.lock)
        fisher/               the run's Fisher (methods that use one)
        fim-lora/             the run directory (fimlora.runs): config.yaml (resolved), result.json, …
            sweep.json        sweep name, key and grid coordinates; written once the run finished

The key depends only on what the run computes: the same settings give the same key from any spec, in
any grid order, in any process, so runs are found again when a grid grows. Renaming the sweep or moving
its store does not change keys; changing any setting, including an experiment default, does.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fimlora.config import ExperimentConfig, key_view, parse_config
from fimlora.errors import FimloraError
from fimlora.runs import RunDirectory
from fimlora.sweep.lock import RUN_LOCK_FILE, is_locked
from fimlora.sweep.spec import SweepSpec, method_name

SWEEP_FILE = "sweep.json"
FAILURE_FILE = "failure.txt"
LOG_FILE = "run.log"
KEY_HASH_CHARS = 10

RunStatus = Literal["finished", "running", "failed", "interrupted", "new"]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``, recursively for nested mappings (neither is modified)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_hash(config: ExperimentConfig) -> str:
    """Short, stable hash of a resolved config, ignoring ``output_dir`` and fields added at their default
    (:func:`fimlora.config.key_view`; sha256 of canonical JSON)."""
    canonical = json.dumps(key_view(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:KEY_HASH_CHARS]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-") or "run"


def budget_label(budget: dict[str, Any]) -> str:
    """``{uniform_rank: 4}`` → ``r4``; ``{params: 1000}`` → ``p1000``; ``{}`` → ``r8`` (the default)."""
    if budget.get("params") is not None:
        return f"p{budget['params']}"
    return f"r{budget.get('uniform_rank') or 8}"


@dataclass(frozen=True)
class PlannedRun:
    """One grid point: its key, its coordinates and its resolved config (``output_dir`` = its directory)."""

    key: str
    method: str
    axes: dict[str, Any]
    config: ExperimentConfig
    #: Entries added to the run's result.json (``fimlora sweep --tuned``: where each setting came from).
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def run_directory(self) -> RunDirectory:
        """Where the method's result lands: ``<directory>/<method name>/``."""
        return RunDirectory(self.directory / self.method)

    @property
    def status(self) -> RunStatus:
        """``finished`` (result.json written), ``running`` (a sweep is executing it now), ``failed`` (the
        last attempt raised), ``interrupted`` (started, never finished, nobody running it) or ``new``.
        Every status but ``finished`` means: to run."""
        if self.run_directory.is_finished:
            return "finished"
        if is_locked(self.directory / RUN_LOCK_FILE):
            return "running"
        if (self.directory / FAILURE_FILE).exists():
            return "failed"
        return "interrupted" if self.run_directory.path.exists() else "new"

    def describe(self) -> str:
        """``method=fim-lora budget=r4 seed=0 lr=0.001 model=… dataset=…``."""
        a = self.axes
        return (
            f"method={self.method} budget={budget_label(a['budget'])} seed={a['seed']} "
            f"lr={a['learning_rate']:g} model={a['model']} dataset={self.config.dataset_label}"
        )

    def record(self, sweep_name: str) -> dict[str, Any]:
        """The content of ``sweep.json``: sweep name, key and the grid coordinates (all six axes, whether
        or not the grid varies them). The full resolved config is ``config.yaml`` next to it."""
        return {"name": sweep_name, "key": self.key, **self.axes}


def _grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Cartesian product of the set axes; seed outermost and method innermost, so a partly done sweep
    has every method for its first seeds."""
    axes = spec.grid.axes()
    order = [a for a in ("seed", "learning_rate", "budget", "model", "dataset", "method") if a in axes]
    return [dict(zip(order, values, strict=True)) for values in itertools.product(*(axes[a] for a in order))]


def _point_overrides(point: dict[str, Any]) -> dict[str, Any]:
    overrides: dict[str, Any] = {"methods": [point["method"]]}
    for axis in ("model", "dataset", "budget", "seed"):
        if axis in point:
            overrides[axis] = point[axis]
    if "learning_rate" in point:
        overrides["train"] = {"learning_rate": point["learning_rate"]}
    return overrides


#: ``adjust(settings, config) -> (settings, extras)``: rewrites a grid point's settings (the spec's
#: mapping, before defaults) once its config resolved, and names what its result.json should add.
Adjust = Callable[[dict[str, Any], ExperimentConfig], tuple[dict[str, Any], dict[str, Any]]]


def expand(spec: SweepSpec, *, adjust: Adjust | None = None) -> list[PlannedRun]:
    """Every run of the sweep, each validated as an ExperimentConfig (bad specs fail here, before any run).

    ``adjust`` rewrites each grid point's settings (``fimlora sweep --tuned`` applies tuned values).
    Raises :class:`FimloraError` naming the offending grid point, or when two grid points resolve to the
    same run.
    """
    store = spec.output_path
    runs: dict[str, PlannedRun] = {}
    for point in _grid_points(spec):
        data = deep_merge(spec.defaults, _point_overrides(point))
        name = method_name(point["method"])
        label = " ".join(
            f"{axis}={budget_label(v) if axis == 'budget' else v}"
            for axis, v in point.items()
            if axis != "method"
        )
        source = f"sweep {spec.name!r}, run method={name}" + (f" {label}" if label else "")
        config = parse_config(data, source=source)
        extras: dict[str, Any] = {}
        if adjust is not None:
            data, extras = adjust(data, config)
            config = parse_config(data, source=source)
        key = f"{_slug(name)}-{budget_label(config.budget.model_dump())}-s{config.seed}-{config_hash(config)}"
        if key in runs:
            raise FimloraError(
                f"Invalid sweep {spec.name!r}: two grid points resolve to the same run ({key}); "
                "remove the repeated value from the grid."
            )
        config = config.model_copy(update={"output_dir": str(store / key)})
        axes = {
            "model": config.model,
            "dataset": config.dataset,
            "method": point["method"],
            "budget": config.budget.model_dump(mode="json"),
            "seed": config.seed,
            "learning_rate": config.train.learning_rate,
        }
        runs[key] = PlannedRun(key=key, method=name, axes=axes, config=config, extras=extras)
    return list(runs.values())
