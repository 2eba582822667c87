"""The pipeline as one readable recipe: data → model → Fisher → allocation → adapter → train → evaluate.

Every method of an experiment gets a deep copy of the same freshly loaded base model (so the same
task head: its seeded random init, or with ``fisher.head: probe`` that head fitted on frozen features),
the same target modules, the same parameter budget, the same seed and the same training settings; only
the rank allocation differs.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback, set_seed

from fimlora.allocation import Allocation, allocate_ranks, uniform_rank_budget
from fimlora.config import PROBE_NEEDS_CLASSIFICATION, ExperimentConfig
from fimlora.data import (
    DataIdentity,
    TaskData,
    calibration_subset,
    data_changes,
    load_task_data,
    make_collator,
    quiet_datasets,
)
from fimlora.data.registry import split_fingerprints
from fimlora.data.tokenize import tokenize_splits, truncation_warning
from fimlora.deploy.records import deployment_records
from fimlora.errors import FimloraError
from fimlora.evaluate import evaluate
from fimlora.fisher import FisherResult, estimate_fisher
from fimlora.fisher.distributed import rank_and_world_size
from fimlora.fisher.result import META_FILE, TENSORS_FILE
from fimlora.head_probe import ProbeRecord, fit_head_probe
from fimlora.io import atomic_write_text, ensure_directory, ordinary_permissions
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
    NEEDS_SCORES,
    AdapterKind,
    AllocationRule,
    Component,
    OptimizerKind,
    peft_modules_to_save,
)
from fimlora.models import (
    LoadedModel,
    classification_head,
    load_model,
    max_sequence_length,
    resolve_target_modules,
    weight_shapes,
)
from fimlora.processes import (
    is_main_process,
    join_launched_processes,
    main_process_first,
    wait_for_everyone,
    world_size,
)
from fimlora.quantization import copy_sharing_frozen_tensors
from fimlora.resolved import describe, run_config_differences
from fimlora.runs import ADAPTER_DIR, RunDirectory, environment
from fimlora.train import PeriodicValidation, train

logger = logging.getLogger(__name__)

FISHER_DIR = "fisher"
VALIDATION_FILE = "validation.jsonl"
KFAC_DIR = "fisher-kfac"
# Written into every adapter directory: the base task model's transformers config (labels included).
MODEL_CONFIG_FILE = "model_config.json"
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
    identity: DataIdentity
    # Per split, the share of examples cut at train.max_length (classification; see tokenize_splits).
    truncated: dict[str, float] = field(default_factory=dict)
    fisher: FisherResult | None = None
    fisher_dir: Path | None = None
    kfac: FisherResult | None = None
    head_probe: ProbeRecord | None = None  # set when fisher.head is probe
    # Content hash of each loaded split (fimlora.data.registry.split_fingerprints), for result.json.
    data_fingerprint: dict[str, str] = field(default_factory=dict)
    # What every method shares after training (the base model's general-text loss and continuations).
    cache: dict[Any, Any] = field(default_factory=dict)


def config_data(config: ExperimentConfig, *, splits: Collection[str] | None = None) -> TaskData:
    """The dataset of ``config``, loaded as every run loads it (``splits``: see :func:`prepare`)."""
    options = config.dataset_options
    return load_task_data(
        config.dataset,
        seed=config.data_seed,  # the split: fixed across training seeds, so every seed sees one test set
        task=config.task,
        text_column=options.text_column,
        label_column=options.label_column,
        hub_config=options.hub_config,
        trust_remote_code=config.trust_remote_code,
        splits=splits,
        drop_eval_duplicates=options.drop_eval_duplicates,
    )


def prepare(
    config: ExperimentConfig,
    *,
    splits: Collection[str] | None = None,
    identity: DataIdentity | None = None,
    progress: bool = True,
) -> Prepared:
    """Load data and model, tokenize, resolve targets and the budget (no Fisher yet).

    ``splits``: the only splits that may be loaded (e.g. train and validation while tuning: the test
    split is then sealed, see :class:`fimlora.data.SealedSplits`); None loads all three. ``identity``:
    the data's content identity when the caller has taken it already (it is taken here otherwise).
    ``progress`` False hides ``datasets``' bars (tokenizing a large split shows one otherwise).
    """
    with contextlib.nullcontext() if progress else quiet_datasets():
        return _prepare(config, splits=splits, identity=identity)


def _prepare(
    config: ExperimentConfig, *, splits: Collection[str] | None, identity: DataIdentity | None
) -> Prepared:
    if identity is None:
        identity = config.data_identity(splits=splits)
    data = config_data(config, splits=splits)
    # The task head is initialised randomly at load time: seed first, or no run is reproducible.
    set_seed(config.seed)
    loaded = load_model(
        config.model,
        data.task,  # type: ignore[arg-type]
        label_names=data.label_names if data.task == "classification" else None,
        trust_remote_code=config.trust_remote_code,
        quantization=config.quantization,
    )
    check_max_length(config, max_sequence_length(loaded.model, loaded.tokenizer))
    targets = resolve_target_modules(loaded.model, config.target_modules)
    shapes = weight_shapes(loaded.model, targets)
    budget = check_budget(config, shapes)
    tokenized = tokenize_splits(data, loaded.tokenizer, max_length=config.train.max_length)
    warning = truncation_warning(tokenized.truncated, config.train.max_length)
    if warning:
        logger.warning(warning)
    collator = make_collator(loaded.tokenizer, data.task)
    prepared = Prepared(
        config,
        data,
        loaded,
        tokenized.splits,
        collator,
        targets,
        shapes,
        budget,
        identity=identity,
        truncated=tokenized.truncated,
    )
    prepared.data_fingerprint = split_fingerprints(data)
    if config.fisher.head == "probe":
        prepared.head_probe = probe_head(prepared)
    return prepared


def check_max_length(config: ExperimentConfig, limit: int | None) -> None:
    """``train.max_length`` must fit the model (its position embeddings, its tokenizer's limit): longer
    inputs would crash inside the model, or run it outside anything it was trained on."""
    if limit is not None and config.train.max_length > limit:
        raise FimloraError(
            f"train.max_length {config.train.max_length} exceeds what model {config.model!r} can take "
            f"({limit} tokens); lower train.max_length to at most {limit}."
        )


def check_budget(config: ExperimentConfig, shapes: dict[str, tuple[int, int]]) -> int:
    """The budget in trainable parameters; a FimloraError when r_min on every module alone exceeds it, or
    when it is more than full-rank adapters (capped by ``allocation.r_max``) can spend: every method
    would then train less than the budget it is credited with."""
    budget = config.budget.params or uniform_rank_budget(shapes, config.budget.reference_rank)
    r_max = config.allocation.r_max
    spendable = sum(_rank_cap(shape, r_max) * (shape[0] + shape[1]) for shape in shapes.values())
    if budget > spendable:
        given = (
            f"budget.params {budget:,}"
            if config.budget.params
            else f"budget.uniform_rank {config.budget.reference_rank} ({budget:,} parameters)"
        )
        cap = "at full rank" + (f" capped by allocation.r_max={r_max}" if r_max is not None else "")
        largest = max(_rank_cap(shape, r_max) for shape in shapes.values())
        raise FimloraError(
            f"The {given} is more than LoRA on the {len(shapes)} target modules can spend: "
            f"{spendable:,} parameters {cap} (uniform rank {largest} at most); lower the budget to at "
            f"most {spendable:,} parameters."
        )
    allocate_ranks(
        dict.fromkeys(shapes, 1.0),
        shapes,
        budget=budget,
        strategy="uniform",
        r_min=config.allocation.r_min,
        r_max=config.allocation.r_max,
    )
    return budget


def _rank_cap(shape: tuple[int, int], r_max: int | None) -> int:
    """The largest useful rank of a module: ``min(d_out, d_in)``, capped by ``r_max``."""
    return min(shape[0], shape[1], r_max if r_max is not None else shape[0])


def probe_head(prepared: Prepared) -> ProbeRecord:
    """Fit the classification head of ``prepared``'s base model in place (``fisher.head: probe``).

    The base model is what every method deep-copies, so the fitted head is every method's start.
    """
    config, loaded = prepared.config, prepared.loaded
    if prepared.data.task != "classification":
        raise FimloraError(f"{PROBE_NEEDS_CLASSIFICATION}.")
    head = classification_head(loaded.model)
    if head is None:
        raise FimloraError(
            f"fisher.head: probe: {config.model} has no classification head module "
            "(classifier or score); use fisher.head: random."
        )
    probe = config.fisher.probe
    return fit_head_probe(
        loaded.model,
        head,
        prepared.tokenized["train"],
        prepared.collator,
        num_examples=probe.num_examples,
        max_iter=probe.max_iter,
        l2=probe.l2,
        seed=config.seed,
        batch_size=config.fisher.batch_size,
    )


def _fisher_settings(
    config: ExperimentConfig,
    identity: DataIdentity,
    targets: list[str],
    statistic: str,
    with_gradient: bool,
) -> dict[str, Any]:
    """Everything the Fisher depends on (its fingerprint is a hash of this): the data by its content."""
    relevant = {
        "model": config.model,
        "dataset": config.dataset,
        "data": identity.fingerprint(),
        "dataset_options": config.dataset_options.model_dump(),
        "seed": config.seed,
        "data_seed": config.data_seed,
        # head and probe settings included: the Fisher is taken through the head
        "fisher": config.fisher.model_dump(exclude={"aggregation"}),
        "max_length": config.train.max_length,
        "targets": targets,
        "statistic": statistic,
        "with_gradient": with_gradient,
    }
    if world_size() > 1:  # MC labels are drawn per process: another split of the examples, another draw
        relevant["world_size"] = world_size()
    if config.quantization != "none":  # the Fisher of the dequantised weights (float32 caches stay valid)
        relevant["quantization"] = config.quantization
    return relevant


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _fisher_fingerprint(
    config: ExperimentConfig,
    targets: list[str],
    statistic: str,
    with_gradient: bool,
    identity: DataIdentity | None = None,
) -> str:
    """Hash of everything the Fisher depends on, so a cached Fisher is reused only when still valid."""
    identity = identity or config.data_identity()
    return _fingerprint(_fisher_settings(config, identity, targets, statistic, with_gradient))


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
    log: Callable[[str], None] | None = None,
    what: str = "Fisher",
) -> FisherResult:
    """Estimate the Fisher on the calibration subset of the training split, or reuse a valid cached one.

    ``directory`` is a cache: a Fisher there is reused only when it was computed with the same settings
    (its fingerprint) and its tensor file is intact (its checksum); otherwise it is recomputed and
    replaced. ``log`` is told which happened and why, naming the pass ``what``.
    """
    config = prepared.config
    settings = _fisher_settings(config, prepared.identity, prepared.targets, statistic, with_gradient)
    fingerprint = _fingerprint(settings)
    say = log or _silent
    reason = ""
    if (directory / META_FILE).is_file() or (directory / TENSORS_FILE).is_file():
        try:
            cached = FisherResult.load(directory)
        except FimloraError as exc:
            reason = f"the cached copy is unusable: {exc}"
        else:
            if cached.metadata.get("fingerprint") == fingerprint:
                say(f"{what} reused from {directory} ({cached.estimator}, {cached.num_examples} examples)")
                return cached
            before = cached.metadata.get("fingerprint_settings")
            changed = (
                [k for k in settings if before.get(k) != settings[k]] if isinstance(before, dict) else []
            )
            reason = f"settings changed since {directory} was written" + (
                f" ({', '.join(changed)})" if changed else ""
            )
    examples = min(config.fisher.num_examples, len(prepared.tokenized["train"]))
    computing = f"({config.fisher.estimator}) on {examples} calibration examples"
    say(f"{what} {computing}" + (f", recomputed: {reason}" if reason else ""))
    result = estimate_fisher(
        prepared.loaded.model,
        calibration_loader(prepared, shard=True),
        target_modules=prepared.targets,
        estimator=config.fisher.estimator,
        statistic=statistic,
        with_gradient=with_gradient,
        seed=config.seed,
        # Gradient checkpointing trades time for memory in every backward pass of the run: the Fisher
        # pass's recomputes each block's activations and back-propagates one example at a time.
        examples_per_backward=1 if config.train.gradient_checkpointing else None,
        checkpoint_blocks=config.train.gradient_checkpointing,
        progress=progress,
    )
    result.metadata.update(
        {
            "model": config.model,
            "dataset": config.dataset_label,
            "task": prepared.data.task,
            "fingerprint": fingerprint,
            "fingerprint_settings": settings,
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
        modules_to_save=peft_modules_to_save(prepared.loaded.head_modules, prepared.data.task),
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
        data_fingerprint=dict(prepared.data_fingerprint),
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
    rule: AllocationRule, adapter: AdapterKind, ctx: MethodContext, optimizer: OptimizerKind | None = None
) -> tuple[Allocation | None, int]:
    """The method's rank allocation and the parameters its adapter trains besides the ranks.

    A budget-matched adapter spends ``budget`` in true trainable parameters: fixed per-module extras
    (DoRA's magnitude vector, HydraLoRA's router) are paid first, and a rank costs what it trains under
    that adapter and optimizer (HydraLoRA: d_in + k·d_out; LoRA-FA, whose A is frozen: d_out).
    """
    if not adapter.rank_based:
        return None, 0
    rank_costs, budget, fixed = rank_budget(adapter, ctx, optimizer)
    try:
        return rule.allocate(ctx, ctx.shapes, budget, rank_costs), fixed
    except FimloraError as exc:
        extra = f" after its {fixed:,} fixed parameters" if fixed else ""
        raise FimloraError(f"Method {ctx.spec.name!r} (adapter {adapter.name}{extra}): {exc}") from None


def rank_budget(
    adapter: AdapterKind, ctx: MethodContext, optimizer: OptimizerKind | None = None
) -> tuple[dict[str, int] | None, int, int]:
    """What the ranks of a rank-based adapter may spend: ``(rank_costs, budget, fixed)``.

    ``fixed`` (DoRA's magnitudes, HydraLoRA's routers) is paid first out of a budget-matched budget;
    ``rank_costs`` is what one rank of each module trains under that adapter and optimizer, or None when
    every rank costs the plain LoRA ``d_out + d_in`` of its module.
    """
    costs = {}
    for name, shape in ctx.shapes.items():
        cost = adapter.cost(shape, ctx)
        costs[name] = cost if optimizer is None else optimizer.cost(cost, shape, ctx)
    fixed = sum(c.fixed for c in costs.values())
    budget = ctx.budget - fixed if adapter.budget_matched else ctx.budget
    if budget <= 0:
        raise FimloraError(
            f"Method {ctx.spec.name!r}: the adapter's fixed parameters ({fixed:,}) exceed the budget "
            f"({ctx.budget:,}); raise the budget."
        )
    per_rank = {name: c.per_rank for name, c in costs.items()}
    r_max = ctx.config.allocation.r_max
    spendable = sum(_rank_cap(shape, r_max) * per_rank[name] for name, shape in ctx.shapes.items())
    if adapter.budget_matched and budget > spendable:
        extra = f" after its {fixed:,} fixed parameters" if fixed else ""
        raise FimloraError(
            f"Method {ctx.spec.name!r} (adapter {adapter.name}): the budget of {ctx.budget:,} parameters"
            f"{extra} is more than its ranks can spend at full rank"
            + (f" capped by allocation.r_max={r_max}" if r_max is not None else "")
            + f" ({spendable:,} at most); lower the budget to at most {spendable + fixed:,} parameters."
        )
    plain = all(per_rank[n] == d_out + d_in for n, (d_out, d_in) in ctx.shapes.items())
    return (None if plain else per_rank), budget, fixed


@dataclass
class BuiltMethod:
    """A method ready to train: its components, context, allocation, wrapped model and optimizer.

    ``counts`` are taken after the optimizer was built (LoRA-FA's freezes A): the tensors that require a
    gradient, every one of them in the optimizer (``optimizer`` None: the Trainer's AdamW over exactly
    those tensors).
    """

    spec: MethodSpec
    rule: AllocationRule
    adapter: AdapterKind
    optimizer_kind: OptimizerKind
    ctx: MethodContext
    allocation: Allocation | None
    model: Any
    counts: dict[str, int]
    optimizer: torch.optim.Optimizer | None = None

    @property
    def components(self) -> list[Component]:
        return [self.rule, self.adapter, self.optimizer_kind]


def check_optimizer_covers_trainable(model: Any, optimizer: torch.optim.Optimizer | None, name: str) -> None:
    """Every tensor that requires a gradient is in ``optimizer`` (None: the Trainer's, which takes them all).

    Trainable counts are taken over tensors that require a gradient; one the optimizer leaves out would be
    counted but never trained.
    """
    if optimizer is None:
        return
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    idle = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in optimized]
    if idle:
        raise RuntimeError(
            f"{name}: {len(idle)} tensor(s) require a gradient but are not in the optimizer (e.g. "
            f"{idle[0]}); they would be counted as trained but never move."
        )


def build_method(prepared: Prepared, method: str) -> BuiltMethod:
    """Resolve ``method`` (a name in the config), allocate its ranks, wrap a copy of the base model and
    build its optimizer; count what trains once the optimizer exists."""
    config = prepared.config
    spec = resolve_method(config.methods[config.method_names.index(method)])
    rule, adapter = get_allocation(spec.allocation), get_adapter(spec.adapter)
    optimizer_kind = get_optimizer(spec.optimizer)
    ctx = method_context(prepared, spec)
    allocation, fixed_params = allocate_for(rule, adapter, ctx, optimizer_kind)
    base = prepared.loaded.model
    # The pristine base stays for every method; on a quantised base the copy shares its frozen tensors.
    copied = copy.deepcopy(base) if config.quantization == "none" else copy_sharing_frozen_tensors(base)
    model = adapter.build(copied, allocation, rule, ctx)
    optimizer = optimizer_kind.build(model, ctx)
    check_optimizer_covers_trainable(model, optimizer, spec.name)
    counts = adapter.trainable_counts(model, ctx)
    if allocation is not None and rule.static_ranks and adapter.budget_matched:
        expected = allocation.num_params + fixed_params
        if counts["adapter_params"] != expected:
            raise RuntimeError(
                f"{spec.name}: the adapter trains {counts['adapter_params']} parameters but the allocation "
                f"accounts for {expected}: the rank pattern did not apply as intended."
            )
    return BuiltMethod(spec, rule, adapter, optimizer_kind, ctx, allocation, model, counts, optimizer)


def _summed(losses: list[Callable[[], torch.Tensor]]) -> Callable[[], torch.Tensor] | None:
    if not losses:
        return None

    def total() -> torch.Tensor:
        value = losses[0]()
        for fn in losses[1:]:
            value = value + fn()
        return value

    return total


def evaluation_data(prepared: Prepared, split: str) -> Any:
    """The tokenized ``split``, cut to ``train.eval_examples`` by a seeded random subset when that is set.

    Both depend on ``data_seed`` only, so every training seed is scored on the same rows.
    """
    config = prepared.config
    data = prepared.tokenized[split]
    if config.train.eval_examples is not None:
        # A seeded random subset: the split keeps its source order, whose head need not be typical.
        data = data.shuffle(seed=config.data_seed).select(range(min(config.train.eval_examples, len(data))))
    return data


def run_method(
    prepared: Prepared,
    method_name: str,
    run: RunDirectory,
    *,
    progress: bool = True,
    on_validation: Callable[[int, dict[str, float]], None] | None = None,
    result_extras: Mapping[str, Any] | None = None,
    extra_callbacks: Sequence[TrainerCallback] = (),
) -> MethodOutcome:
    """Allocate, wrap, train, evaluate and save one method into its run directory.

    With ``train.eval_every`` set, the validation split is evaluated every that many steps during
    training (``validation.jsonl`` in the run) and each result is passed to ``on_validation(step,
    metrics)``, which may raise to stop the run (an Optuna pruner does). ``result_extras`` are added
    to ``result.json`` (e.g. where the hyperparameters came from). ``extra_callbacks`` watch the training
    (an analysis taking measurements, e.g. :mod:`fimlora.analysis.fisher_trajectory`); they must not
    change it.
    """
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
    optimizer = built.optimizer
    callbacks = [cb for c in components for cb in c.callbacks(model, ctx)] + list(extra_callbacks)
    if config.train.eval_every is not None:
        validation = evaluation_data(prepared, "validation")
        callbacks.append(
            PeriodicValidation(
                config.train.eval_every,
                lambda m: evaluate(
                    m,
                    validation,
                    prepared.collator,
                    prepared.data.task,
                    batch_size=config.train.eval_batch_size,
                    progress=False,
                ),
                run.file(VALIDATION_FILE),
                on_validation,
            )
        )
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
    eval_data = evaluation_data(prepared, config.train.eval_split)
    started = time.perf_counter()
    metrics = evaluate(
        model,
        eval_data,
        prepared.collator,
        prepared.data.task,
        batch_size=config.train.eval_batch_size,
        progress=progress,
        label_names=prepared.data.label_names,
    )
    eval_time_s = round(time.perf_counter() - started, 3)
    classes = metrics.pop("classes", None)

    def save(tmp: Path) -> None:
        adapter.save(model, tmp, ctx)
        # The task model's config (id2label/label2id included), under a name that does not make
        # transformers take the adapter directory for a complete model.
        atomic_write_text(tmp / MODEL_CONFIG_FILE, prepared.loaded.model.config.to_json_string())

    save_atomically(save, run.file(ADAPTER_DIR))
    # Methods whose adapter changes size while it trains (AdaLoRA, fisher-online) record what it ends with.
    effective = next(
        (r["final_params"] for r in records.values() if isinstance(r, dict) and "final_params" in r), None
    )
    deployment = deployment_records(prepared, model, adapter, run.file(ADAPTER_DIR))
    if "forgetting" in deployment:
        metrics["forgetting"] = deployment.pop("forgetting")
    result = {
        "method": spec.name,
        "method_spec": spec.to_dict(),
        "model": config.model,
        "dataset": config.dataset_label,
        "task": prepared.data.task,
        "seed": config.seed,
        "data_seed": config.data_seed,
        # What the weights were trained on, by content: the hindsight rule checks a source run by it.
        "data_fingerprint": dict(prepared.data_fingerprint),
        "eval_split": config.train.eval_split,
        "quantization": config.quantization,
        "gradient_checkpointing": config.train.gradient_checkpointing,
        "metrics": metrics,
        **({"classes": classes} if classes is not None else {}),
        **label_record(prepared.data.label_names),
        "eval_time_s": eval_time_s,
        "budget": prepared.budget,
        "budget_matched": adapter.budget_matched,
        **counts,
        # Trainable parameters the method ends with (AdaLoRA: unmasked triplets after pruning;
        # fisher-online: its adapter after the last re-allocation).
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
                "head": config.fisher.head,
            }
            if rule.needs and prepared.fisher is not None
            else None
        ),
        "task_head": _task_head_record(prepared),
        "data": data_record(prepared),
        "records": records,
        **(result_extras or {}),
        **deployment,
    }
    run.finish(result)
    wait_for_everyone()
    return MethodOutcome(result=result, model=model)


def data_record(prepared: Prepared) -> dict[str, Any]:
    """What ``result.json`` says about the data (``data``): its content identity (file digests, or a
    built-in's version), rows per split, the share of each split cut at ``train.max_length``
    (classification), and the evaluation rows whose text also occurs in an earlier split (counted, and
    dropped with ``dataset_options.drop_eval_duplicates``)."""
    data = prepared.data
    return {
        "identity": prepared.identity.record(),
        "rows": {split: len(data.splits[split]) for split in data.splits},
        "truncated": dict(prepared.truncated) or None,
        "duplicates": data.duplicates,
        "dropped_duplicates": data.dropped_duplicates,
    }


def label_record(label_names: list[str] | None) -> dict[str, Any]:
    """``id2label``/``label2id`` for result.json (JSON keys are strings: id2label's are the ids)."""
    if label_names is None:
        return {}
    return {
        "id2label": {str(i): name for i, name in enumerate(label_names)},
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


def _task_head_record(prepared: Prepared) -> dict[str, Any] | None:
    """How the task head every method started from was initialised (None: a causal LM's own head)."""
    if prepared.data.task != "classification":
        return None
    record: dict[str, Any] = {"init": prepared.config.fisher.head}
    if prepared.head_probe is not None:
        record["probe"] = prepared.head_probe.to_dict()
    return record


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
    if needs & {NEEDS_SCORES, NEEDS_DIAGONAL, NEEDS_GRADIENTS}:
        with_gradient = NEEDS_GRADIENTS in needs
        prepared.fisher_dir = out / FISHER_DIR
        prepared.fisher = compute_fisher(
            prepared,
            prepared.fisher_dir,
            # Per-module scores are the trace's: the same tr F as the diagonal's sum, without a float32
            # tensor per target weight (on a quantised base, several times the weights' own memory).
            statistic="diagonal" if NEEDS_DIAGONAL in needs else "trace",
            with_gradient=with_gradient,
            progress=progress,
            log=log,
            what="Fisher" + (" and gradients" if with_gradient else ""),
        )
    if NEEDS_KFAC in needs:
        prepared.kfac = compute_fisher(
            prepared,
            out / KFAC_DIR,
            statistic="kfac",
            with_gradient=True,
            progress=progress,
            log=log,
            what="K-FAC factors",
        )


def run_experiment(
    config: ExperimentConfig,
    *,
    progress: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    result_extras: Mapping[str, Any] | None = None,
) -> tuple[Prepared, list[dict]]:
    """Run every method of ``config``; a finished run is reused when it was made with the same
    result-affecting settings (:mod:`fimlora.resolved`) on the same data (:mod:`fimlora.data.identity`),
    and refused with a FimloraError naming the differing keys or data files otherwise; ``overwrite``
    re-runs every method.

    ``result_extras``: entries added to every method's ``result.json`` (see :func:`run_method`).
    ``progress`` False also hides ``datasets``' bars (loading, tokenizing). An ``output_dir`` this call
    created is removed again when it fails before writing anything into it.

    Started by ``torchrun``/``accelerate launch``, the processes share the work (see
    :mod:`fimlora.processes`); only the main one logs, shows progress and writes.
    """
    join_launched_processes()
    if not is_main_process():
        progress, log = False, _silent
    out = Path(config.output_dir)
    created = [path for path in (out, *out.parents) if not path.exists()]
    if is_main_process():
        ensure_directory(out, "output_dir")
    try:
        with contextlib.nullcontext() if progress else quiet_datasets():
            return _run_methods(config, progress=progress, overwrite=overwrite, log=log, extras=result_extras)
    except BaseException:
        if is_main_process():
            _remove_empty(created)
        raise


def _run_methods(
    config: ExperimentConfig,
    *,
    progress: bool,
    overwrite: bool,
    log: Callable[[str], None],
    extras: Mapping[str, Any] | None,
) -> tuple[Prepared, list[dict]]:
    out = Path(config.output_dir)
    names = config.method_names
    runs = {name: RunDirectory(out / name) for name in names}
    pending = [name for name in names if overwrite or not runs[name].is_finished]
    identity = config.data_identity()
    check_reusable(config, {name: runs[name] for name in names if name not in pending}, identity)
    with main_process_first():
        prepared = prepare(config, identity=identity, progress=progress)
    wait_for_everyone()  # every process decided on the same runs before the main one rewrites any
    needs: set[str] = set()
    for entry in config.methods:
        if method_name(entry) in pending:
            needs |= get_allocation(resolve_method(entry).allocation).needs
    calibrate(prepared, needs, progress=progress, log=log)
    results = []
    for name in names:
        if name not in pending:
            log(f"{name}: already finished in {runs[name].path} with the same settings, reusing its result")
            results.append(runs[name].read_result())
            continue
        log(f"{name}: training {config.train.steps} steps at a budget of {prepared.budget:,} parameters")
        outcome = run_method(prepared, name, runs[name], progress=progress, result_extras=extras)
        results.append(outcome.result)
    return prepared, results


def _remove_empty(created: list[Path]) -> None:
    """Remove the directories in ``created`` (deepest first) that are still empty."""
    for path in created:
        with contextlib.suppress(OSError):
            path.rmdir()


def check_reusable(
    config: ExperimentConfig, finished: dict[str, RunDirectory], identity: DataIdentity | None = None
) -> None:
    """Refuse to reuse finished runs made with other result-affecting settings than ``config``'s, or on
    other data than ``identity`` (taken from ``config`` when None)."""
    if finished and identity is None:
        identity = config.data_identity()
    stale = []
    for name, run in finished.items():
        diffs = run_config_differences(run.path, config.for_method(name))
        if diffs is None:
            stale.append(f"{name} (its config.yaml is missing or unreadable)")
            continue
        assert identity is not None
        changed = data_changes(_recorded_data(run), identity)
        reasons = ([describe(diffs)] if diffs else []) + ([changed] if changed else [])
        if reasons:
            stale.append(f"{name}: {'; '.join(reasons)}")
    if stale:
        raise FimloraError(
            f"{config.output_dir} holds finished run(s) made with other settings or data than this config: "
            f"{'; '.join(stale)}. Re-run with --overwrite to replace them, or choose another output_dir."
        )


def _recorded_data(run: RunDirectory) -> Any:
    try:
        return run.read_result().get("data")
    except (OSError, ValueError, AttributeError):
        return None


def _silent(_: str) -> None:
    pass
