"""What each method trains at an experiment's budget, without training: the README's method table."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fimlora.config import ExperimentConfig, parse_config
from fimlora.experiment import build_method, calibrate, prepare
from fimlora.methods import PRESETS, get_allocation, resolve_method
from fimlora.report import markdown_table


def parameter_inventory(
    config: ExperimentConfig,
    methods: Sequence[str] | None = None,
    *,
    progress: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Build every method (default: the config's) on the config's targets and count what it trains.

    Runs the calibration passes the methods need (Fisher, gradients, K-FAC; EVA's and LoRA-GA's inits),
    but no training. ``effective`` is what the method trains at the end (AdaLoRA: its pruning target).
    """
    if methods is not None:
        data = config.model_dump(mode="json", by_alias=True)
        data["methods"] = list(methods)
        config = parse_config(data)
    prepared = prepare(config)
    needs: set[str] = set()
    for entry in config.methods:
        needs |= get_allocation(resolve_method(entry).allocation).needs
    calibrate(prepared, needs, progress=progress, log=log)
    rows = []
    for name in config.method_names:
        built = build_method(prepared, name)
        allocation = built.allocation
        ranks = allocation.summary() if allocation is not None and built.rule.static_ranks else None
        rows.append(
            {
                "method": name,
                "allocation": built.spec.allocation,
                "adapter": built.spec.adapter,
                "optimizer": built.spec.optimizer,
                "adapter_params": built.counts["adapter_params"],
                "head_params": built.counts["head_params"],
                "budget": prepared.budget,
                "budget_matched": built.adapter.budget_matched,
                "ranks": ranks,
            }
        )
    return rows


def inventory_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "method",
        "allocation",
        "adapter",
        "optimizer",
        "trainable adapter params",
        "head",
        "budget",
        "ranks",
    ]
    body = []
    for row in rows:
        ranks = row["ranks"]
        shown = f"{ranks['min_rank']}/{ranks['mean_rank']:.2f}/{ranks['max_rank']}" if ranks else "–"
        params = f"{row['adapter_params']:,}" + ("" if row["budget_matched"] else " (own size)")
        body.append(
            [row["method"], row["allocation"], row["adapter"], row["optimizer"], params,
             f"{row['head_params']:,}", f"{row['budget']:,}", shown]
        )  # fmt: skip
    return markdown_table(header, body)


def presets_table() -> str:
    body = [[s.name, s.allocation, s.adapter, s.optimizer, s.description] for s in PRESETS.values()]
    return markdown_table(["preset", "allocation", "adapter", "optimizer", "what it is"], body)
