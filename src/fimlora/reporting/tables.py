"""Plain-text (Markdown) tables of one experiment: results per method and ranks per layer × module type.

What ``fimlora run`` and the demo print and write for one experiment; the many-run report (statistics
over seeds, plots, HTML) is :mod:`fimlora.reporting.report`. Module names are split as everywhere in
reporting, by :func:`fimlora.reporting.names.parse_module_name`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fimlora.reporting.names import parse_module_name
from fimlora.runs import rank_range


def split_module_name(name: str) -> tuple[int, str]:
    """``bert.encoder.layer.3.attention.self.query`` → ``(3, "attention.self.query")``; a name without a
    layer index → ``(-1, name)``."""
    parsed = parse_module_name(name)
    return (-1, name) if parsed.layer is None else (parsed.layer, parsed.kind)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def rank_grid(ranks: Mapping[str, int]) -> tuple[list[str], list[int], dict[tuple[int, str], int]]:
    """Module types (columns, in order of first appearance), layers (rows) and rank per cell."""
    kinds: list[str] = []
    layers: set[int] = set()
    cells: dict[tuple[int, str], int] = {}
    for name, rank in ranks.items():
        layer, kind = split_module_name(name)
        if kind not in kinds:
            kinds.append(kind)
        layers.add(layer)
        cells[(layer, kind)] = rank
    return kinds, sorted(layers), cells


def rank_table(ranks: Mapping[str, int]) -> str:
    """Markdown table of ranks: one row per layer, one column per module type."""
    kinds, layers, cells = rank_grid(ranks)
    rows = [[layer, *(cells.get((layer, k), "") for k in kinds)] for layer in layers]
    return markdown_table(["layer", *kinds], rows)


def _metric_columns(task: str) -> list[tuple[str, str, str]]:
    if task == "classification":
        return [("accuracy", "accuracy", "{:.4f}"), ("macro-F1", "macro_f1", "{:.4f}")]
    return [("perplexity", "perplexity", "{:.2f}")]


def class_recalls(result: Mapping[str, Any]) -> str:
    """``neg 0.00 / pos 1.00``: recall per class, from result.json's ``classes``; "—" without them."""
    classes = result.get("classes")
    if not isinstance(classes, Mapping):
        return "—"
    pairs = zip(classes.get("labels") or [], classes.get("recall") or [], strict=False)
    return " / ".join(f"{label} {float(value):.2f}" for label, value in pairs) or "—"


def _forgetting(result: Mapping[str, Any]) -> str:
    value = (result.get("metrics", {}).get("forgetting") or {}).get("delta")
    return "—" if value is None else f"{value:+.4f}"


def _inference(result: Mapping[str, Any]) -> str:
    """``unmerged / merged / base`` throughput (merged "—" when the method does not merge)."""
    models = (result.get("inference") or {}).get("models") or {}
    cells = [models.get(k, {}).get("per_s") for k in ("unmerged", "merged", "base")]
    return " / ".join("—" if v is None else f"{v:.1f}" for v in cells)


def results_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One row per method: held-out metrics (classification: with the majority-class rate of the split
    and the recall of each class; causal LM: with forgetting), exact trainable parameter counts, time and
    memory, and where the runs measured them, adapter size on disk and inference throughput."""
    task = results[0]["task"]
    metric_cols = _metric_columns(task)
    classification = task == "classification"
    forgetting = any(_forgetting(r) != "—" for r in results)
    units = {str(unit) for r in results if (unit := (r.get("inference") or {}).get("unit"))}
    sizes = any(r.get("adapter_size_bytes") is not None for r in results)
    header = [
        "method",
        *(label for label, _, _ in metric_cols),
        *(["majority-class rate", "recall per class"] if classification else []),
        *(["forgetting (Δ loss)"] if forgetting else []),
        "adapter params",
        "head params",
        "budget",
        "ranks min/mean/max",
        "train time (s)",
        "examples/s",
        "peak mem (MB)",
        *(["adapter (MB)"] if sizes else []),
        *([f"inference {'/'.join(sorted(units))} unmerged / merged / base"] if units else []),
    ]
    rows = []
    for r in results:
        size = r.get("adapter_size_bytes")
        rows.append(
            [
                r["method"],
                *(fmt.format(r["metrics"][key]) for _, key, fmt in metric_cols),
                *([_majority(r), class_recalls(r)] if classification else []),
                *([_forgetting(r)] if forgetting else []),
                f"{r.get('effective_adapter_params', r['adapter_params']):,}",
                f"{r['head_params']:,}",
                f"{r['budget']:,}",
                _rank_summary(r),
                f"{r['train']['wall_time_s']:.1f}",
                f"{r['train']['examples_per_s']:.1f}",
                f"{r['train']['peak_memory_bytes'] / 2**20:.0f}",
                *(["—" if size is None else f"{size / 2**20:.2f}"] if sizes else []),
                *([_inference(r)] if units else []),
            ]
        )
    return markdown_table(header, rows)


def _majority(result: Mapping[str, Any]) -> str:
    value = result["metrics"].get("majority_rate")
    return f"{value:.4f}" if isinstance(value, int | float) else "—"


def _rank_summary(result: Mapping[str, Any]) -> str:
    """min/mean/max of the ranks trained at the end (AdaLoRA after pruning, EVA after redistribution);
    "—" for methods without ranks (full fine-tuning)."""
    found = rank_range(result)
    if found is None:
        return "—"
    ranks = found[0]
    return f"{ranks['min']}/{ranks['mean']:.2f}/{ranks['max']}"


def experiment_report(
    title: str,
    results: Sequence[Mapping[str, Any]],
    allocations: Mapping[str, Mapping[str, int]],
    *,
    details: Mapping[str, Any],
) -> str:
    """The markdown report of one experiment (the demo writes this)."""
    parts = [f"# {title}", ""]
    parts += [f"- **{key}**: {value}" for key, value in details.items()]
    parts += ["", "## Results", "", results_table(results), ""]
    for method, ranks in allocations.items():
        parts += [f"## Rank allocation: {method}", "", rank_table(ranks), ""]
    return "\n".join(parts)
