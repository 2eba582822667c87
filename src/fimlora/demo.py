"""The demo: Fisher-guided vs uniform vs random rank allocation on MiniLM + movie reviews, offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fimlora.allocation import Allocation
from fimlora.config import ExperimentConfig, parse_config
from fimlora.experiment import run_experiment
from fimlora.io import atomic_write_text
from fimlora.reporting.tables import experiment_report, rank_table, results_table

# Sized to finish in under five minutes on two CPU cores after set-up (docs/getting-started.md).
DEMO_CONFIG: dict[str, Any] = {
    "model": "minilm",
    "dataset": "movie-reviews",
    "methods": ["lora", "fim-lora", "random-rank"],
    "seed": 0,
    "output_dir": "runs/demo",
    "budget": {"uniform_rank": 4},
    "fisher": {"estimator": "empirical", "num_examples": 256, "batch_size": 16, "aggregation": "mean"},
    "lora": {"alpha": 8, "dropout": 0.0, "scaling": "alpha_over_r"},
    "train": {
        "steps": 100,
        "batch_size": 16,
        "learning_rate": 2e-3,
        "max_length": 64,
        "eval_split": "test",
        "eval_batch_size": 128,
    },
}


def demo_config(*, output_dir: str | None = None, steps: int | None = None) -> ExperimentConfig:
    """The demo's experiment, optionally elsewhere or with another number of training steps."""
    data = {**DEMO_CONFIG, "train": dict(DEMO_CONFIG["train"])}
    if output_dir is not None:
        data["output_dir"] = output_dir
    if steps is not None:
        data["train"]["steps"] = steps
    return parse_config(data, source="demo config")


def run_demo(
    config: ExperimentConfig, *, overwrite: bool = False, log: Callable[[str], None] = print
) -> Path:
    """Run the three methods, print the comparison and the allocations, write ``report.md``."""
    prepared, results = run_experiment(config, overwrite=overwrite, log=log)
    out = Path(config.output_dir)
    allocations = {r["method"]: Allocation.load(out / r["method"] / "allocation.json").ranks for r in results}
    log("")
    log(results_table(results))
    for method in ("fim-lora", "random-rank"):
        if method in allocations:
            log(f"\nRank allocation, {method} (rows: layer, columns: module):")
            log(rank_table(allocations[method]))
    details = {
        "model": config.model,
        "dataset": f"{config.dataset} (evaluated on the {config.train.eval_split} split)",
        "targets": f"{len(prepared.targets)} linear modules",
        "budget": f"{prepared.budget:,} trainable LoRA parameters "
        f"(uniform rank {config.budget.reference_rank})",
        "Fisher": f"{config.fisher.estimator}, {config.fisher.num_examples} calibration examples from the "
        f"training split, aggregation '{config.fisher.aggregation}'",
        "training": f"{config.train.steps} steps × batch {config.train.batch_size}, "
        f"lr {config.train.learning_rate}, seed {config.seed}",
        "scaling": f"{config.lora.scaling} with lora_alpha {config.lora_alpha}",
    }
    report = out / "report.md"
    atomic_write_text(report, experiment_report("fimlora demo", results, allocations, details=details) + "\n")
    log(f"\nReport: {report}")
    return report
