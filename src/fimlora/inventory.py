"""What each method trains at an experiment's budget, without training: docs/methods.md's table."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from fimlora.config import ExperimentConfig, parse_config
from fimlora.errors import FimloraError
from fimlora.experiment import BuiltMethod, Prepared, build_method, calibrate, prepare
from fimlora.methods import PRESETS, MethodSpec, get_allocation, resolve_method
from fimlora.reporting.tables import markdown_table


def parameter_inventory(
    config: ExperimentConfig,
    methods: Sequence[str] | None = None,
    *,
    progress: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Build every method (default: the config's) on the config's targets and count what it trains.

    Runs the calibration passes the methods need (Fisher, gradients, K-FAC; EVA's and LoRA-GA's inits),
    but no training, in a temporary directory: the config's ``output_dir`` (a run store) is never read
    nor written. A method that cannot be built at this budget is a row with ``error`` set (the others
    are still counted); ``note`` explains counts that differ from the budget by design. ``progress``
    shows the calibration passes' bars and ``datasets``' tokenizing bars (off, all of them are hidden).
    """
    data = config.model_dump(mode="json", by_alias=True)
    unsourced: list[str] = []
    if methods is not None:
        # A preset that reads a finished source run (hindsight-lora) can only be counted when the config
        # names one; otherwise it is a row that says so.
        sources = config.method_options.hindsight
        unsourced = [
            m
            for m in methods
            if get_allocation(resolve_method(m).allocation).reads_source_run and sources.source_for(m) is None
        ]
        data["methods"] = [m for m in methods if m not in unsourced]
    with tempfile.TemporaryDirectory(prefix="fimlora-methods-") as scratch:
        data["output_dir"] = scratch
        config = parse_config(data)
        prepared = prepare(config, progress=progress)
        needs: set[str] = set()
        for entry in config.methods:
            needs |= get_allocation(resolve_method(entry).allocation).needs
        calibrate(prepared, needs, progress=progress, log=log)
        rows = [_row(prepared, name) for name in config.method_names]
        for name in unsourced:
            row = _empty_row(resolve_method(name), prepared.budget)
            row["error"] = "reads a finished source run: name one in method_options.hindsight.source"
            row["note"] = f"not counted: {row['error']}"
            rows.append(row)
        return rows


def _empty_row(spec: MethodSpec, budget: int) -> dict[str, Any]:
    return {
        "method": spec.name,
        "allocation": spec.allocation,
        "adapter": spec.adapter,
        "optimizer": spec.optimizer,
        "budget": budget,
        "adapter_params": None,
        "head_params": None,
        "budget_matched": True,
        "ranks": None,
        "note": "",
        "error": None,
    }


def _row(prepared: Prepared, name: str) -> dict[str, Any]:
    spec = resolve_method(prepared.config.methods[prepared.config.method_names.index(name)])
    row = _empty_row(spec, prepared.budget)
    try:
        built = build_method(prepared, name)
    except FimloraError as exc:
        row["error"] = str(exc)
        row["note"] = f"cannot be built at this budget: {exc}"
        return row
    allocation = built.allocation
    row.update(
        {
            "adapter_params": built.counts["adapter_params"],
            "head_params": built.counts["head_params"],
            "budget_matched": built.adapter.budget_matched,
            "ranks": allocation.summary() if allocation is not None and built.rule.static_ranks else None,
            "note": _note(built, prepared.budget),
        }
    )
    return row


def _note(built: BuiltMethod, budget: int) -> str:
    """Why a count differs from the budget, when it does by design."""
    if not built.adapter.rank_based:
        return "trains every weight: no budget applies"
    if not built.adapter.budget_matched:
        return "own size: its rule sets the trainable parameters, not the budget"
    if not built.rule.static_ranks and built.counts["adapter_params"] > budget:
        return "initial adapter: pruned to the budget while it trains"
    return ""


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
        "note",
    ]
    body = []
    for row in rows:
        ranks = row["ranks"]
        shown = f"{ranks['min_rank']}/{ranks['mean_rank']:.2f}/{ranks['max_rank']}" if ranks else "–"
        params = "–" if row["adapter_params"] is None else f"{row['adapter_params']:,}"
        head = "–" if row["head_params"] is None else f"{row['head_params']:,}"
        body.append(
            [row["method"], row["allocation"], row["adapter"], row["optimizer"], params, head,
             f"{row['budget']:,}", shown, row.get("note", "")]
        )  # fmt: skip
    return markdown_table(header, body)


def presets_table() -> str:
    body = [[s.name, s.allocation, s.adapter, s.optimizer, s.description] for s in PRESETS.values()]
    return markdown_table(["preset", "allocation", "adapter", "optimizer", "what it is"], body)
