"""What a run would refuse at its start, checked for many runs before any of them starts (sweeps).

For each config: the dataset exists and loads (which gives the task and the labels), the model exists
(its architecture is built without weights, on the ``meta`` device), the target modules resolve,
``train.max_length`` fits the model, and the budget pays for ``r_min`` on every target module after each
method's fixed parameters (DoRA's magnitudes, HydraLoRA's routers), and a hindsight method's source run
is finished and compatible (or another pending run of the sweep will make it). These are the checks of
:func:`fimlora.experiment.prepare` and :func:`fimlora.experiment.allocate_for`, run on the same code.
Datasets and models are loaded once per distinct setting, not once per run. What depends on training
data beyond that (HydraLoRA's automatic head count, a Fisher) is checked when the run starts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from fimlora.allocation import allocate_ranks
from fimlora.config import ExperimentConfig
from fimlora.data import TaskData, quiet_datasets
from fimlora.data.registry import split_fingerprints
from fimlora.errors import FimloraError
from fimlora.experiment import check_budget, check_max_length, config_data, rank_budget
from fimlora.methods import MethodContext, get_adapter, get_allocation, get_optimizer, resolve_method
from fimlora.models import load_model_shell, max_sequence_length, resolve_target_modules, weight_shapes


class _NeedsTrainingData(Exception):
    """Raised into a method that asks for the training texts: its check waits for the run itself."""


def _needs_training_data() -> list[str]:
    raise _NeedsTrainingData


class PlannedRun(NamedTuple):
    """A run the same sweep will make: what a hindsight source selector could later find."""

    method: str
    seed: int
    output_dir: Path


def _check_hindsight_source(ctx: MethodContext, planned: Collection[PlannedRun]) -> None:
    """The hindsight run's refusal of its source, unless a pending run of the sweep will make it (a source
    listed before ``hindsight-lora`` in one grid, run with one worker)."""
    from fimlora.config import HindsightSource
    from fimlora.methods.allocations.hindsight import resolve_source

    try:
        resolve_source(ctx)
    except FimloraError:
        named = ctx.options.hindsight.source_for(ctx.spec.name)
        if isinstance(named, HindsightSource):
            store = Path(named.store if named.store is not None else ctx.config.output_dir).resolve()
            seed = ctx.seed if named.seed == "same" else int(named.seed)
            if any(
                p.method == named.method and p.seed == seed and p.output_dir.resolve().is_relative_to(store)
                for p in planned
            ):
                return
        elif named is not None and any(
            Path(named).resolve() == (p.output_dir / p.method).resolve() for p in planned
        ):
            return
        raise


class _Cache:
    """Datasets and model shells by the settings they depend on; a failure is cached like a result."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        token = json.dumps(key, sort_keys=True, default=str)
        if token not in self.values:
            try:
                self.values[token] = load()
            except FimloraError as exc:
                self.values[token] = exc
        value = self.values[token]
        if isinstance(value, FimloraError):
            raise value
        return value


def check_config(
    config: ExperimentConfig,
    cache: _Cache | None = None,
    planned: Collection[PlannedRun] = (),
    splits: Collection[str] | None = None,
) -> None:
    """Raise the FimloraError that the run of ``config`` would raise before training, if any.
    ``planned``: the runs the same sweep will make before or beside this one; ``splits``: the only
    splits that may be loaded (tuning: not test)."""
    cache = cache or _Cache()
    options = config.dataset_options
    data_key = (
        "data",
        config.dataset,
        config.data_seed,
        config.task,
        options.model_dump(),
        config.trust_remote_code,
        None if splits is None else tuple(sorted(splits)),
    )
    data: TaskData = cache.get(data_key, lambda: _load_data(config, splits))
    num_labels = data.num_labels if data.task == "classification" else None
    model, tokenizer = cache.get(
        ("model", config.model, data.task, num_labels, config.trust_remote_code),
        lambda: load_model_shell(
            config.model,
            data.task,
            num_labels=num_labels,
            trust_remote_code=config.trust_remote_code,
        ),
    )
    check_max_length(config, max_sequence_length(model, tokenizer))
    targets = resolve_target_modules(model, config.target_modules)
    shapes = weight_shapes(model, targets)
    budget = check_budget(config, shapes)
    for entry in config.methods:
        spec = resolve_method(entry)
        adapter = get_adapter(spec.adapter)
        if not adapter.rank_based:
            continue
        ctx = MethodContext(
            config=config,
            spec=spec,
            task=data.task,
            targets=targets,
            shapes=shapes,
            budget=budget,
            head_modules=[],
            base_name_or_path=config.model,
            seed=config.seed,
            train_texts=_needs_training_data,
        )
        if get_allocation(spec.allocation).reads_source_run:
            ctx.data_fingerprint = cache.get(("fingerprint", *data_key), lambda: split_fingerprints(data))
            _check_hindsight_source(ctx, planned)
        try:
            rank_costs, left, fixed = rank_budget(adapter, ctx, get_optimizer(spec.optimizer))
        except _NeedsTrainingData:
            continue
        try:
            allocate_ranks(
                dict.fromkeys(shapes, 1.0),
                shapes,
                budget=left,
                strategy="uniform",
                r_min=config.allocation.r_min,
                r_max=config.allocation.r_max,
                rank_costs=rank_costs,
            )
        except FimloraError as exc:
            extra = f" after its {fixed:,} fixed parameters" if fixed else ""
            raise FimloraError(f"Method {spec.name!r} (adapter {adapter.name}{extra}): {exc}") from None


def _load_data(config: ExperimentConfig, splits: Collection[str] | None) -> TaskData:
    with quiet_datasets():
        return config_data(config, splits=splits)


def check_runs(
    runs: Sequence[tuple[str, ExperimentConfig]],
    *,
    what: str = "run",
    splits: Collection[str] | None = None,
) -> None:
    """:func:`check_config` for every ``(label, config)``; one FimloraError listing the runs that would
    fail, grouped by reason (at most three labels and three reasons shown)."""
    cache = _Cache()
    planned = [
        PlannedRun(m, config.seed, Path(config.output_dir)) for _, config in runs for m in config.method_names
    ]
    failures: dict[str, list[str]] = {}
    for label, config in runs:
        try:
            check_config(config, cache, planned, splits)
        except FimloraError as exc:
            failures.setdefault(str(exc).rstrip("."), []).append(label)
    if not failures:
        return
    count = sum(len(labels) for labels in failures.values())
    parts = []
    for reason, labels in list(failures.items())[:3]:
        shown = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
        parts.append(f"{shown}: {reason}")
    more = f"; and {len(failures) - 3} other reason(s)" if len(failures) > 3 else ""
    raise FimloraError(
        f"{count} of {len(runs)} {what}(s) would fail before training, so nothing was started: "
        + "; ".join(parts)
        + more
        + "."
    )
