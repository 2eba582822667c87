"""The pipeline as one readable recipe: data → model → Fisher → allocation → adapter → train → evaluate.

Every method of an experiment gets a deep copy of the same freshly loaded base model (so the same
randomly initialised task head), the same target modules, the same parameter budget, the same seed and
the same training settings; only the rank allocation differs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import set_seed

from fimlora.allocation import Allocation, allocate_ranks, uniform_rank_budget
from fimlora.config import ExperimentConfig
from fimlora.data import TaskData, calibration_subset, load_task_data, make_collator, tokenize_task_data
from fimlora.deploy.records import deployment_records
from fimlora.errors import FimloraError
from fimlora.evaluate import evaluate
from fimlora.fisher import FisherResult, estimate_fisher
from fimlora.fisher.distributed import rank_and_world_size
from fimlora.fisher.result import META_FILE, TENSORS_FILE
from fimlora.io import ordinary_permissions
from fimlora.methods import (
    MethodContext,
    MethodSpec,
    get_adapter,
    get_allocation,
    get_optimizer,
    method_name,
    resolve_method,
)
from fimlora.methods.base import (
    NEEDS_DIAGONAL,
    NEEDS_GRADIENTS,
    NEEDS_KFAC,
    AdapterKind,
    AllocationRule,
    Component,
    OptimizerKind,
)
from fimlora.models import LoadedModel, load_model, resolve_target_modules, weight_shapes
from fimlora.processes import (
    is_main_process,
    join_launched_processes,
    main_process_first,
    wait_for_everyone,
    world_size,
)
from fimlora.runs import RunDirectory, environment
from fimlora.train import train

FISHER_DIR = "fisher"
KFAC_DIR = "fisher-kfac"
_TASK_TYPES = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


@dataclass
class Prepared:
    """Everything shared by the methods of one experiment."""

    config: ExperimentConfig
    data: TaskData
    loaded: LoadedModel
    tokenized: Any
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    targets: list[str]
    shapes: dict[str, tuple[int, int]]
    budget: int
    fisher: FisherResult | None = None
    fisher_dir: Path | None = None
    kfac: FisherResult | None = None
    # What every method shares after training (the base model's general-text loss and continuations).
    cache: dict[Any, Any] = field(default_factory=dict)


def prepare(config: ExperimentConfig) -> Prepared:
    """Load data and model, tokenize, resolve targets and the budget (no Fisher yet)."""
    options = config.dataset_options
    data = load_task_data(
        config.dataset,
        seed=config.seed,
        task=config.task,
        text_column=options.text_column,
        label_column=options.label_column,
        hub_config=options.hub_config,
        trust_remote_code=config.trust_remote_code,
    )
    # The task head is initialised randomly at load time: seed first, or no run is reproducible.
    set_seed(config.seed)
    loaded = load_model(
        config.model,
        data.task,  # type: ignore[arg-type]
        num_labels=data.num_labels if data.task == "classification" else None,
        trust_remote_code=config.trust_remote_code,
    )
    targets = resolve_target_modules(loaded.model, config.target_modules)
    shapes = weight_shapes(loaded.model, targets)
    budget = config.budget.params or uniform_rank_budget(shapes, config.budget.reference_rank)
    # Fail before any expensive step if r_min alone does not fit the budget.
    allocate_ranks(
        dict.fromkeys(shapes, 1.0),
        shapes,
        budget=budget,
        strategy="uniform",
        r_min=config.allocation.r_min,
        r_max=config.allocation.r_max,
    )
    tokenized = tokenize_task_data(data, loaded.tokenizer, max_length=config.train.max_length)
    collator = make_collator(loaded.tokenizer, data.task)
    return Prepared(config, data, loaded, tokenized, collator, targets, shapes, budget)


def _fisher_fingerprint(
    config: ExperimentConfig, targets: list[str], statistic: str, with_gradient: bool
) -> str:
    """Hash of everything the Fisher depends on, so a cached Fisher is reused only when still valid."""
    relevant = {
        "model": config.model,
        "dataset": config.dataset,
        "dataset_options": config.dataset_options.model_dump(),
        "seed": config.seed,
        "fisher": config.fisher.model_dump(exclude={"aggregation"}),
        "max_length": config.train.max_length,
        "targets": targets,
        "statistic": statistic,
        "with_gradient": with_gradient,
    }
    if world_size() > 1:  # MC labels are drawn per process: another split of the examples, another draw
        relevant["world_size"] = world_size()
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def calibration_loader(prepared: Prepared, *, shard: bool = False) -> DataLoader:
    """The calibration batches: a seeded subset of the training split, shared by Fisher, EVA and LoRA-GA.

    ``shard``: this process's contiguous share of the subset when several processes split the pass (their
    sums are all-reduced); every process gets the whole subset otherwise.
    """
    config = prepared.config
    subset = calibration_subset(prepared.tokenized["train"], config.fisher.num_examples, seed=config.seed)
    rank, processes = rank_and_world_size()
    if shard and processes > 1:
        if len(subset) < processes:
            raise FimloraError(
                f"{len(subset)} calibration example(s) cannot be split over {processes} processes; "
                "raise fisher.num_examples."
            )
        subset = subset.shard(num_shards=processes, index=rank, contiguous=True)
    return DataLoader(subset, batch_size=config.fisher.batch_size, collate_fn=prepared.collator)


def compute_fisher(
    prepared: Prepared,
    directory: Path,
    *,
    statistic: str = "diagonal",
    with_gradient: bool = False,
    progress: bool = True,
) -> FisherResult:
    """Estimate the Fisher on the calibration subset of the training split, or reuse a valid cached one."""
    config = prepared.config
    fingerprint = _fisher_fingerprint(config, prepared.targets, statistic, with_gradient)
    if (directory / META_FILE).is_file():
        cached = FisherResult.load(directory)
        if cached.metadata.get("fingerprint") == fingerprint:
            return cached
    result = estimate_fisher(
        prepared.loaded.model,
        calibration_loader(prepared, shard=True),
        target_modules=prepared.targets,
        estimator=config.fisher.estimator,
        statistic=statistic,
        with_gradient=with_gradient,
        seed=config.seed,
        progress=progress,
    )
    result.metadata.update(
        {
            "model": config.model,
            "dataset": config.dataset,
            "task": prepared.data.task,
            "fingerprint": fingerprint,
        }
    )
    result.metadata["base_model_name_or_path"] = prepared.loaded.source
    if is_main_process():  # every process holds the same all-reduced result
        result.save(directory)
    wait_for_everyone()
    return result


def lora_config_for(prepared: Prepared, allocation: Allocation):  # -> peft.LoraConfig
    """The plain-LoRA ``LoraConfig`` of an allocation under this experiment's settings."""
    config = prepared.config
    return allocation.to_lora_config(
        lora_alpha=config.lora_alpha,
        scaling=config.lora.scaling,
        lora_dropout=config.lora.dropout,
        task_type=_TASK_TYPES[prepared.data.task],
        modules_to_save=prepared.loaded.head_modules or None,
    )


@dataclass
class MethodOutcome:
    result: dict[str, Any]
    model: Any  # the trained model, in eval mode


def method_context(prepared: Prepared, spec: MethodSpec) -> MethodContext:
    config = prepared.config
    return MethodContext(
        config=config,
        spec=spec,
        task=prepared.data.task,
        targets=list(prepared.targets),
        shapes=dict(prepared.shapes),
        budget=prepared.budget,
        head_modules=list(prepared.loaded.head_modules),
        base_name_or_path=prepared.loaded.source,
        seed=config.seed,
        base_model=prepared.loaded.model,
        fisher=prepared.fisher,
        kfac=prepared.kfac,
        calibration_batches=lambda: calibration_loader(prepared),
        calibration_shard=lambda: calibration_loader(prepared, shard=True),
        train_texts=lambda: list(prepared.data.splits["train"]["text"][:]),
        domain_batches=_domain_batches(prepared),
    )


def _domain_batches(
    prepared: Prepared, per_domain: int = 256
) -> Callable[[], dict[str, Iterable[dict[str, torch.Tensor]]]] | None:
    """Evaluation batches grouped by the split's ``domain`` column (classification rows stay aligned)."""
    split = prepared.config.train.eval_split
    raw = prepared.data.splits[split]
    if prepared.data.task != "classification" or "domain" not in raw.column_names:
        return None

    def batches() -> dict[str, Iterable[dict[str, torch.Tensor]]]:
        domains = raw["domain"][:]
        out: dict[str, Iterable[dict[str, torch.Tensor]]] = {}
        for domain in sorted(set(domains)):
            rows = [i for i, d in enumerate(domains) if d == domain][:per_domain]
            subset = prepared.tokenized[split].select(rows)
            out[domain] = DataLoader(subset, batch_size=64, collate_fn=prepared.collator)
        return out

    return batches


def allocate_for(
    rule: AllocationRule, adapter: AdapterKind, ctx: MethodContext
) -> tuple[Allocation | None, int]:
    """The method's rank allocation and the parameters its adapter trains besides the ranks.

    A budget-matched adapter spends ``budget`` in true trainable parameters: fixed per-module extras
    (DoRA's magnitude vector, HydraLoRA's router) are paid first, and a rank costs what it costs in that
    adapter (HydraLoRA: d_in + k·d_out).
    """
    if not adapter.rank_based:
        return None, 0
    costs = {name: adapter.cost(shape, ctx) for name, shape in ctx.shapes.items()}
    fixed = sum(c.fixed for c in costs.values())
    budget = ctx.budget - fixed if adapter.budget_matched else ctx.budget
    if budget <= 0:
        raise FimloraError(
            f"Method {ctx.spec.name!r}: the adapter's fixed parameters ({fixed:,}) exceed the budget "
            f"({ctx.budget:,}); raise the budget."
        )
    shapes = {name: c.per_rank_shape for name, c in costs.items()}
    try:
        return rule.allocate(ctx, shapes, budget), fixed
    except FimloraError as exc:
        extra = f" after its {fixed:,} fixed parameters" if fixed else ""
        raise FimloraError(f"Method {ctx.spec.name!r} (adapter {adapter.name}{extra}): {exc}") from None


@dataclass
class BuiltMethod:
    """A method ready to train: its components, context, allocation and wrapped model."""

    spec: MethodSpec
    rule: AllocationRule
    adapter: AdapterKind
    optimizer_kind: OptimizerKind
    ctx: MethodContext
    allocation: Allocation | None
    model: Any
    counts: dict[str, int]

    @property
    def components(self) -> list[Component]:
        return [self.rule, self.adapter, self.optimizer_kind]


def build_method(prepared: Prepared, method: str) -> BuiltMethod:
    """Resolve ``method`` (a name in the config), allocate its ranks and wrap a copy of the base model."""
    config = prepared.config
    spec = resolve_method(config.methods[config.method_names.index(method)])
    rule, adapter = get_allocation(spec.allocation), get_adapter(spec.adapter)
    ctx = method_context(prepared, spec)
    allocation, fixed_params = allocate_for(rule, adapter, ctx)
    model = adapter.build(copy.deepcopy(prepared.loaded.model), allocation, rule, ctx)
    counts = adapter.trainable_counts(model, ctx)
    if allocation is not None and rule.static_ranks and adapter.budget_matched:
        expected = allocation.num_params + fixed_params
        if counts["adapter_params"] != expected:
            raise RuntimeError(
                f"{spec.name}: the adapter trains {counts['adapter_params']} parameters but the allocation "
                f"accounts for {expected}: the rank pattern did not apply as intended."
            )
    return BuiltMethod(spec, rule, adapter, get_optimizer(spec.optimizer), ctx, allocation, model, counts)


def _summed(losses: list[Callable[[], torch.Tensor]]) -> Callable[[], torch.Tensor] | None:
    if not losses:
        return None

    def total() -> torch.Tensor:
        value = losses[0]()
        for fn in losses[1:]:
            value = value + fn()
        return value

    return total


def run_method(
    prepared: Prepared, method_name: str, run: RunDirectory, *, progress: bool = True
) -> MethodOutcome:
    """Allocate, wrap, train, evaluate and save one method into its run directory."""
    config = prepared.config
    main = is_main_process()
    if main:
        run.start(config.for_method(method_name).to_yaml(), environment(config.seed))
    built = build_method(prepared, method_name)
    spec, rule, adapter, ctx, model = built.spec, built.rule, built.adapter, built.ctx, built.model
    allocation, counts, components = built.allocation, built.counts, built.components
    if main and allocation is not None:
        allocation.save(run.file("allocation.json"))
    if main and rule.needs and prepared.fisher_dir is not None:
        shutil.copy2(prepared.fisher_dir / META_FILE, run.file(META_FILE))
        run.link(prepared.fisher_dir / TENSORS_FILE, TENSORS_FILE)
    optimizer = built.optimizer_kind.build(model, ctx)
    callbacks = [cb for c in components for cb in c.callbacks(model, ctx)]
    losses = [fn for c in components if (fn := c.extra_loss(model, ctx)) is not None]
    learning_rate = config.train.learning_rate
    if not adapter.rank_based:
        learning_rate *= config.method_options.full_ft.lr_scale
    with tempfile.TemporaryDirectory(prefix="fimlora-trainer-") as work_dir:
        outcome = train(
            model,
            prepared.tokenized["train"],
            prepared.collator,
            config.train,
            seed=config.seed,
            work_dir=Path(work_dir),
            metrics_path=run.file("metrics.jsonl"),
            progress=progress,
            optimizer=optimizer,
            callbacks=callbacks,
            extra_loss=_summed(losses),
            learning_rate=learning_rate,
            logging_dir=run.file("logs"),
            loss_per_token=prepared.data.task == "causal-lm",
        )
    records: dict[str, Any] = {}
    for component in components:
        records.update(component.finalize(model, ctx))
    if not main:
        wait_for_everyone()  # the main process evaluates and writes the run
        return MethodOutcome(result=run.read_result(), model=model)
    eval_data = prepared.tokenized[config.train.eval_split]
    if config.train.eval_examples is not None:
        # A seeded random subset: the split keeps its source order, whose head need not be typical.
        eval_data = eval_data.shuffle(seed=config.seed).select(
            range(min(config.train.eval_examples, len(eval_data)))
        )
    metrics = evaluate(
        model,
        eval_data,
        prepared.collator,
        prepared.data.task,
        batch_size=config.train.eval_batch_size,
        progress=progress,
    )
    save_atomically(lambda tmp: adapter.save(model, tmp, ctx), run.file("adapter"))
    deployment = deployment_records(prepared, model, adapter, run.file("adapter"))
    if "forgetting" in deployment:
        metrics["forgetting"] = deployment.pop("forgetting")
    effective = records.get("adalora", {}).get("final_params") if spec.allocation == "adalora" else None
    result = {
        "method": spec.name,
        "method_spec": spec.to_dict(),
        "model": config.model,
        "dataset": config.dataset,
        "task": prepared.data.task,
        "seed": config.seed,
        "eval_split": config.train.eval_split,
        "metrics": metrics,
        "budget": prepared.budget,
        "budget_matched": adapter.budget_matched,
        **counts,
        # Trainable parameters the method ends with (AdaLoRA: unmasked triplets after pruning).
        "effective_adapter_params": counts["adapter_params"] if effective is None else effective,
        "num_target_modules": len(prepared.targets),
        "allocation": allocation.summary() if allocation is not None else None,
        "lora_alpha": config.lora_alpha,
        "scaling": config.lora.scaling,
        "learning_rate": learning_rate,
        "train": outcome.to_dict(),
        "fisher": (
            {
                "estimator": prepared.fisher.estimator,
                "num_examples": prepared.fisher.num_examples,
                "aggregation": config.fisher.aggregation,
            }
            if rule.needs and prepared.fisher is not None
            else None
        ),
        "records": records,
        **deployment,
    }
    run.finish(result)
    wait_for_everyone()
    return MethodOutcome(result=result, model=model)


def save_adapter(model: Any, directory: Path) -> None:
    """``save_pretrained`` atomically (see :func:`save_atomically`)."""
    save_atomically(lambda tmp: model.save_pretrained(str(tmp)), directory)


def save_atomically(write: Callable[[Path], None], directory: Path) -> None:
    """``write`` into a temporary sibling, then rename: no half-written adapter directory."""
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=directory.parent))
    try:
        write(tmp)
        ordinary_permissions(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def calibrate(
    prepared: Prepared, needs: set[str], *, progress: bool = True, log: Callable[[str], None] = print
) -> None:
    """Run (or reuse from the output directory) the calibration passes the methods ``needs``."""
    config = prepared.config
    out = Path(config.output_dir)
    if needs & {NEEDS_DIAGONAL, NEEDS_GRADIENTS}:
        with_gradient = NEEDS_GRADIENTS in needs
        what = "Fisher" + (" and gradients" if with_gradient else "")
        log(f"{what} ({config.fisher.estimator}) on {config.fisher.num_examples} calibration examples")
        prepared.fisher_dir = out / FISHER_DIR
        prepared.fisher = compute_fisher(
            prepared, prepared.fisher_dir, with_gradient=with_gradient, progress=progress
        )
    if NEEDS_KFAC in needs:
        log(f"K-FAC factors ({config.fisher.estimator}) on {config.fisher.num_examples} calibration examples")
        prepared.kfac = compute_fisher(
            prepared, out / KFAC_DIR, statistic="kfac", with_gradient=True, progress=progress
        )


def run_experiment(
    config: ExperimentConfig,
    *,
    progress: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[Prepared, list[dict]]:
    """Run every method of ``config``; finished runs are reused unless ``overwrite``.

    Started by ``torchrun``/``accelerate launch``, the processes share the work (see
    :mod:`fimlora.processes`); only the main one logs, shows progress and writes.
    """
    join_launched_processes()
    if not is_main_process():
        progress, log = False, _silent
    out = Path(config.output_dir)
    with main_process_first():
        prepared = prepare(config)
    names = config.method_names
    runs = {name: RunDirectory(out / name) for name in names}
    pending = [name for name in names if overwrite or not runs[name].is_finished]
    wait_for_everyone()  # every process decided on the same runs before the main one rewrites any
    needs: set[str] = set()
    for entry in config.methods:
        if method_name(entry) in pending:
            needs |= get_allocation(resolve_method(entry).allocation).needs
    calibrate(prepared, needs, progress=progress, log=log)
    results = []
    for name in names:
        if name not in pending:
            log(f"{name}: already finished in {runs[name].path}, reusing its result")
            results.append(runs[name].read_result())
            continue
        log(f"{name}: training {config.train.steps} steps at a budget of {prepared.budget:,} parameters")
        results.append(run_method(prepared, name, runs[name], progress=progress).result)
    return prepared, results


def _silent(_: str) -> None:
    pass
