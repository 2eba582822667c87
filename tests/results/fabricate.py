"""Hand-written run directories (no training): result.json, config.yaml, metrics.jsonl, allocation.json,
fisher.json, environment.json and optionally sweep.json, shaped like what ``fimlora run`` writes."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import yaml

KINDS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
HIDDEN, FFN = 32, 64


def module_shapes(num_layers: int = 4) -> dict[str, tuple[int, int]]:
    shapes = {}
    for layer in range(num_layers):
        for kind in KINDS:
            d_out = FFN if kind == "intermediate.dense" else HIDDEN
            d_in = FFN if kind == "output.dense" else HIDDEN
            shapes[f"bert.encoder.layer.{layer}.{kind}"] = (d_out, d_in)
    return shapes


def fisher_scores(shapes: dict[str, tuple[int, int]], seed: int) -> dict[str, float]:
    rng = random.Random(1000 + seed)
    scores = {}
    for name in shapes:
        layer = int(name.split(".")[3])
        boost = 8.0 if name.endswith("value") else 1.0
        scores[name] = 1e-8 * boost * (1 + layer) ** 2 * math.exp(rng.gauss(0, 0.3))
    return scores


def ranks_for(method: str, shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, int]:
    if method == "lora":
        return dict.fromkeys(shapes, rank)
    scores = fisher_scores(shapes, seed)
    total = sum(scores.values())
    ranks = {n: max(1, round(rank * len(scores) * s / total)) for n, s in scores.items()}
    budget = rank * sum(a + b for a, b in shapes.values())
    while sum(r * sum(shapes[n]) for n, r in ranks.items()) > budget:  # stay within the budget
        largest = max(ranks, key=lambda n: (ranks[n], n))
        ranks[largest] -= 1
    if method == "random-rank":  # the same histogram, shuffled among modules of equal shape
        rng = random.Random(seed)
        for shape in sorted(set(shapes.values())):
            names = [n for n in ranks if shapes[n] == shape]
            values = [ranks[n] for n in names]
            rng.shuffle(values)
            ranks.update(zip(names, values, strict=True))
    return ranks


def write_run(
    directory: Path,
    *,
    method: str,
    seed: int,
    accuracy: float | None = 0.8,
    perplexity: float | None = None,
    rank: int = 4,
    model: str = "tiny-bert",
    dataset: str = "reviews",
    learning_rate: float = 1e-3,
    steps: int = 20,
    finished: bool = True,
    sweep: dict[str, Any] | None = None,
    eval_losses: bool = False,
    classes: dict[str, Any] | None = None,
) -> Path:
    """One run directory; ``finished=False`` leaves result.json out (a killed run). ``classes``: the
    per-class record of result.json (labels, precision, recall, support, predicted, confusion_matrix)."""
    directory.mkdir(parents=True, exist_ok=True)
    shapes = module_shapes()
    budget = rank * sum(a + b for a, b in shapes.values())
    ranks = ranks_for(method, shapes, rank, seed)
    num_params = sum(r * sum(shapes[n]) for n, r in ranks.items())
    uses_fisher = method != "lora"
    task = "classification" if perplexity is None else "causal-lm"
    config = {
        "model": model,
        "dataset": dataset,
        "task": None,
        "dataset_options": {"text_column": None, "label_column": None, "hub_config": None},
        "methods": [method],
        "target_modules": None,
        "seed": seed,
        "output_dir": str(directory.parent),
        "trust_remote_code": False,
        "budget": {"uniform_rank": rank, "params": None},
        "fisher": {"estimator": "empirical", "num_examples": 64, "batch_size": 16, "aggregation": "mean"},
        "allocation": {"tau": 1.0, "r_min": 1, "r_max": None},
        "lora": {"alpha": 2.0 * rank, "dropout": 0.0, "scaling": "alpha_over_r"},
        "train": {
            "steps": steps,
            "batch_size": 8,
            "learning_rate": learning_rate,
            "weight_decay": 0.0,
            "warmup_ratio": 0.06,
            "lr_scheduler": "linear",
            "max_length": 32,
            "eval_split": "test",
            "eval_examples": None,
            "eval_batch_size": 64,
        },
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    (directory / "environment.json").write_text(
        json.dumps({"seed": seed, "git_revision": "abc123", "device": "cpu"}), encoding="utf-8"
    )
    allocation = {
        "strategy": {"lora": "uniform", "random-rank": "random"}.get(method, "proportional"),
        "budget": budget,
        "num_params": num_params,
        "r_min": 1,
        "r_max": None,
        "tau": 1.0,
        "seed": seed,
        "ranks": ranks,
        "shapes": {n: list(s) for n, s in shapes.items()},
        "scores": fisher_scores(shapes, seed) if uses_fisher else None,
    }
    (directory / "allocation.json").write_text(json.dumps(allocation), encoding="utf-8")
    if uses_fisher:
        scores = fisher_scores(shapes, seed)
        meta = {
            "num_examples": 64,
            "estimator": "empirical",
            "metadata": {"seed": seed},
            "shapes": allocation["shapes"],
            "scores": {"mean": scores, "trace": {n: s * math.prod(shapes[n]) for n, s in scores.items()}},
        }
        (directory / "fisher.json").write_text(json.dumps(meta), encoding="utf-8")
    rng = random.Random(f"{method}-{seed}")
    lines = []
    for step in range(1, steps + 1):
        loss = 0.7 * math.exp(-step / (steps / 2)) + 0.2 + 0.05 * rng.random()
        lines.append(json.dumps({"step": step, "elapsed_s": 0.1 * step, "loss": loss, "learning_rate": 1e-3}))
        if eval_losses and step % 5 == 0:
            lines.append(json.dumps({"step": step, "eval_loss": loss + 0.1}))
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if sweep is not None:
        (directory / "sweep.json").write_text(json.dumps(sweep), encoding="utf-8")
    if not finished:
        return directory
    if perplexity is None:
        metrics: dict[str, Any] = {
            "loss": 0.5,
            "accuracy": accuracy,
            "macro_f1": (accuracy or 0) - 0.01,
            "num_examples": 200,
        }
    else:
        metrics = {"loss": math.log(perplexity), "perplexity": perplexity, "num_tokens": 4096}
    result = {
        "status": "finished",
        "method": method,
        "model": model,
        "dataset": dataset,
        "task": task,
        "seed": seed,
        "eval_split": "test",
        "metrics": metrics,
        "budget": budget,
        "adapter_params": num_params,
        "head_params": 66,
        "other_trainable_params": 0,
        "num_target_modules": len(shapes),
        "allocation": {
            "strategy": allocation["strategy"],
            "budget": budget,
            "num_params": num_params,
            "num_modules": len(ranks),
            "min_rank": min(ranks.values()),
            "max_rank": max(ranks.values()),
            "mean_rank": sum(ranks.values()) / len(ranks),
        },
        "lora_alpha": 2.0 * rank,
        "scaling": "alpha_over_r",
        "train": {
            "steps": steps,
            "examples": steps * 8,
            "wall_time_s": 10.0 + seed,
            "examples_per_s": steps * 8 / (10.0 + seed),
            "final_train_loss": 0.25,
            "peak_memory_bytes": 512 * 2**20,
            "peak_memory_kind": "process_peak_rss",
        },
        "fisher": (
            {"estimator": "empirical", "num_examples": 64, "aggregation": "mean"} if uses_fisher else None
        ),
    }
    if classes is not None:
        result["classes"] = classes
        metrics["majority_rate"] = max(classes["support"]) / sum(classes["support"])
    (directory / "result.json").write_text(json.dumps(result), encoding="utf-8")
    return directory


def class_record(matrix: list[list[int]], labels: list[str]) -> dict[str, Any]:
    """The ``classes`` record of result.json for a confusion matrix (rows: true, columns: predicted)."""
    support = [sum(row) for row in matrix]
    predicted = [sum(row[j] for row in matrix) for j in range(len(labels))]
    return {
        "labels": labels,
        "precision": [matrix[j][j] / predicted[j] if predicted[j] else 0.0 for j in range(len(labels))],
        "recall": [matrix[i][i] / support[i] if support[i] else 0.0 for i in range(len(labels))],
        "support": support,
        "predicted": predicted,
        "confusion_matrix": matrix,
    }


# Accuracy per (method, seed) with a known structure: fim-lora = lora + 0.01 + small noise.
def accuracy_of(method: str, seed: int, rank: int = 4) -> float:
    base = 0.70 + 0.01 * seed + 0.005 * rank
    return round(base + {"lora": 0.0, "fim-lora": 0.01 + 0.002 * (seed % 2), "random-rank": 0.003}[method], 6)


def write_sweep(
    root: Path,
    *,
    methods: tuple[str, ...] = ("lora", "fim-lora", "random-rank"),
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
    ranks: tuple[int, ...] = (2, 4),
    eval_losses: bool = False,
) -> list[Path]:
    """A sweep grid, laid out ``root/r<rank>/seed<seed>/<method>`` with sweep.json in every run."""
    paths = []
    for rank in ranks:
        for seed in seeds:
            for method in methods:
                key = f"r{rank}-s{seed}-{method}"
                paths.append(
                    write_run(
                        root / f"r{rank}" / f"seed{seed}" / method,
                        method=method,
                        seed=seed,
                        rank=rank,
                        accuracy=accuracy_of(method, seed, rank),
                        sweep={"method": method, "seed": seed, "budget": {"uniform_rank": rank}, "key": key},
                        eval_losses=eval_losses,
                    )
                )
    return paths
