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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import set_seed

from fimlora.allocation import Allocation, allocate_ranks, uniform_rank_budget
from fimlora.config import ExperimentConfig
from fimlora.data import TaskData, calibration_subset, load_task_data, make_collator, tokenize_task_data
from fimlora.evaluate import evaluate
from fimlora.fisher import FisherResult, estimate_fisher
from fimlora.fisher.result import META_FILE, TENSORS_FILE
from fimlora.io import ordinary_permissions
from fimlora.methods import AllocationRequest, get_method
from fimlora.models import LoadedModel, load_model, resolve_target_modules, weight_shapes
from fimlora.runs import RunDirectory, environment
from fimlora.train import build_peft_model, parameter_counts, train

FISHER_DIR = "fisher"
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


def _fisher_fingerprint(config: ExperimentConfig, targets: list[str]) -> str:
    """Hash of everything the Fisher depends on, so a cached Fisher is reused only when still valid."""
    relevant = {
        "model": config.model,
        "dataset": config.dataset,
        "dataset_options": config.dataset_options.model_dump(),
        "seed": config.seed,
        "fisher": config.fisher.model_dump(exclude={"aggregation"}),
        "max_length": config.train.max_length,
        "targets": targets,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def compute_fisher(prepared: Prepared, directory: Path, *, progress: bool = True) -> FisherResult:
    """Estimate the Fisher on the calibration subset of the training split, or reuse a valid cached one."""
    config = prepared.config
    fingerprint = _fisher_fingerprint(config, prepared.targets)
    if (directory / META_FILE).is_file():
        cached = FisherResult.load(directory)
        if cached.metadata.get("fingerprint") == fingerprint:
            return cached
    subset = calibration_subset(prepared.tokenized["train"], config.fisher.num_examples, seed=config.seed)
    loader = DataLoader(subset, batch_size=config.fisher.batch_size, collate_fn=prepared.collator)
    result = estimate_fisher(
        prepared.loaded.model,
        loader,
        target_modules=prepared.targets,
        estimator=config.fisher.estimator,
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
    result.save(directory)
    return result


def lora_config_for(prepared: Prepared, allocation: Allocation):  # -> peft.LoraConfig
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
    model: Any  # the trained PeftModel, in eval mode


def run_method(
    prepared: Prepared, method_name: str, run: RunDirectory, *, progress: bool = True
) -> MethodOutcome:
    """Allocate, wrap, train, evaluate and save one method into its run directory."""
    config = prepared.config
    method = get_method(method_name)
    run.start(config.for_method(method_name).to_yaml(), environment(config.seed))
    scores = prepared.fisher.scores(config.fisher.aggregation) if prepared.fisher is not None else None
    allocation = method.allocate(
        AllocationRequest(
            shapes=prepared.shapes,
            budget=prepared.budget,
            scores=scores,
            r_min=config.allocation.r_min,
            r_max=config.allocation.r_max,
            tau=config.allocation.tau,
            seed=config.seed,
        )
    )
    allocation.save(run.file("allocation.json"))
    if method.needs_fisher and prepared.fisher_dir is not None:
        shutil.copy2(prepared.fisher_dir / META_FILE, run.file(META_FILE))
        run.link(prepared.fisher_dir / TENSORS_FILE, TENSORS_FILE)

    model = build_peft_model(
        copy.deepcopy(prepared.loaded.model), lora_config_for(prepared, allocation), seed=config.seed
    )
    counts = parameter_counts(model)
    if counts["adapter_params"] != allocation.num_params:
        raise RuntimeError(
            f"PEFT built {counts['adapter_params']} adapter parameters but the allocation has "
            f"{allocation.num_params}: the rank pattern did not apply as intended."
        )
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
        )
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
    save_adapter(model, run.file("adapter"))
    result = {
        "method": method_name,
        "model": config.model,
        "dataset": config.dataset,
        "task": prepared.data.task,
        "seed": config.seed,
        "eval_split": config.train.eval_split,
        "metrics": metrics,
        "budget": prepared.budget,
        **counts,
        "num_target_modules": len(prepared.targets),
        "allocation": allocation.summary(),
        "lora_alpha": config.lora_alpha,
        "scaling": config.lora.scaling,
        "train": outcome.to_dict(),
        "fisher": (
            {
                "estimator": prepared.fisher.estimator,
                "num_examples": prepared.fisher.num_examples,
                "aggregation": config.fisher.aggregation,
            }
            if method.needs_fisher and prepared.fisher is not None
            else None
        ),
    }
    run.finish(result)
    return MethodOutcome(result=result, model=model)


def save_adapter(model: Any, directory: Path) -> None:
    """``save_pretrained`` into a temporary sibling, then rename: no half-written adapter directory."""
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=directory.parent))
    try:
        model.save_pretrained(str(tmp))
        ordinary_permissions(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def run_experiment(
    config: ExperimentConfig,
    *,
    progress: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[Prepared, list[dict]]:
    """Run every method of ``config``; finished runs are reused unless ``overwrite``."""
    out = Path(config.output_dir)
    prepared = prepare(config)
    runs = {name: RunDirectory(out / name) for name in config.methods}
    pending = [name for name in config.methods if overwrite or not runs[name].is_finished]
    if any(get_method(name).needs_fisher for name in pending):
        log(f"Fisher ({config.fisher.estimator}) on {config.fisher.num_examples} calibration examples")
        prepared.fisher_dir = out / FISHER_DIR
        prepared.fisher = compute_fisher(prepared, prepared.fisher_dir, progress=progress)
    results = []
    for name in config.methods:
        if name not in pending:
            log(f"{name}: already finished in {runs[name].path}, reusing its result")
            results.append(runs[name].read_result())
            continue
        log(f"{name}: training {config.train.steps} steps at a budget of {prepared.budget:,} parameters")
        results.append(run_method(prepared, name, runs[name], progress=progress).result)
    return prepared, results
