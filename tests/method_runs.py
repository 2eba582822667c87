"""A prepared tiny experiment for method tests, and brute-force references computed one example at a time."""

from __future__ import annotations

import copy
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from tiny_models import NO_DEPLOYMENT_FIGURES

from fimlora.config import ExperimentConfig, parse_config
from fimlora.data import calibration_subset
from fimlora.experiment import Prepared, calibrate, prepare
from fimlora.methods import PRESETS, get_allocation

BUDGET_RANK = 4
# Every preset that runs on its own; hindsight-lora reads a finished source run, so it is tested with its
# sources in tests/methods/test_hindsight.py.
SELF_CONTAINED_PRESETS = [n for n, s in PRESETS.items() if not get_allocation(s.allocation).reads_source_run]


def tiny_config(
    model_dir: Path, dataset: Path, out: Path, methods: list[Any], **extra: Any
) -> ExperimentConfig:
    """The tiny BERT on the sentiment CSV at uniform rank 4, dropout on in the model (BERT's 0.1)."""
    data: dict[str, Any] = {
        "model": str(model_dir),
        "dataset": str(dataset),
        "dataset_options": {"text_column": "review", "label_column": "sentiment"},
        "output_dir": str(out),
        "methods": methods,
        "budget": {"uniform_rank": BUDGET_RANK},
        "fisher": {"num_examples": 24, "batch_size": 8},
        "train": {
            "steps": 3,
            "batch_size": 8,
            "learning_rate": 1e-2,
            "weight_decay": 0.05,
            "max_length": 24,
            "eval_batch_size": 16,
            "report_to": [],
        },
        "method_options": {
            "hydralora": {"num_heads": 2},
            "delta_lora": {"warmup_ratio": 0.3},
            # Three steps leave room for one re-allocation only (after step 1).
            "fisher_online": {"reallocate_at": [0.3]},
        },
        "evaluate": NO_DEPLOYMENT_FIGURES,
    }
    data.update(extra)
    return parse_config(data)


def prepared_experiment(config: ExperimentConfig, needs: Collection[str] = ()) -> Prepared:
    """``prepare(config)`` plus the calibration passes ``needs`` (``NEEDS_*``)."""
    prepared = prepare(config)
    if needs:
        calibrate(prepared, set(needs), progress=False, log=lambda _: None)
    return prepared


def with_options(prepared: Prepared, **changes: Any) -> Prepared:
    """A shallow copy of ``prepared`` whose config has ``changes`` merged into its top-level sections."""
    data = prepared.config.model_dump(mode="json", by_alias=True)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            for sub, sub_value in value.items():
                if isinstance(sub_value, dict) and isinstance(data[key].get(sub), dict):
                    data[key][sub] = {**data[key][sub], **sub_value}
                else:
                    data[key][sub] = sub_value
        else:
            data[key] = value
    clone = copy.copy(prepared)
    clone.config = parse_config(data)
    return clone


def calibration_examples(prepared: Prepared) -> list[dict[str, torch.Tensor]]:
    """Every calibration example as its own batch of one (no padding, no batch weighting)."""
    config = prepared.config
    subset = calibration_subset(prepared.tokenized["train"], config.fisher.num_examples, seed=config.seed)
    return [prepared.collator([subset[i]]) for i in range(len(subset))]


def brute_force_mean_gradient(prepared: Prepared, targets: list[str]) -> dict[str, torch.Tensor]:
    """(1/N) Σ_n ∂ℓ_n/∂W, one example at a time, dropout off, float64 sums."""
    model = copy.deepcopy(prepared.loaded.model).eval()
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in targets]
    model.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    sums = [torch.zeros(w.shape, dtype=torch.float64) for w in weights]
    examples = calibration_examples(prepared)
    for batch in examples:
        loss = model(**batch).loss
        for acc, grad in zip(sums, torch.autograd.grad(loss, weights), strict=True):
            acc += grad.double()
    return {n: acc / len(examples) for n, acc in zip(targets, sums, strict=True)}


def lora_factors(model: Any) -> dict[str, dict[str, Any]]:
    """Per adapted module (base-model name): A, B (float64), scaling s and the base weight W."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            out[name.removeprefix("base_model.model.")] = {
                "A": module.lora_A["default"].weight.detach().double(),
                "B": module.lora_B["default"].weight.detach().double(),
                "s": float(module.scaling["default"]),
                "W": module.get_base_layer().weight.detach().double(),
            }
    return out
