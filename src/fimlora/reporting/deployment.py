"""The report's deployment sections for one (dataset, model): inference cost, the metric against peak
memory, and the continuations of fixed prompts per method (causal LM).

Everything comes from the run records (:mod:`fimlora.deploy.records`): no model is loaded. Runs that
did not record a figure (older runs, ``evaluate.inference: false``) are left out of the section that
needs it; a section with nothing to show is not written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fimlora.reporting import plots, tuning
from fimlora.reporting.document import Heading, Paragraph, Table
from fimlora.results import METRICS, RESULT_FILE

_CONTINUATION_CHARS = 160
FORGETTING_CAPTION = (
    "forgetting: mean per-token loss on general text the fine-tune did not target, tuned minus base model "
    "(nats per token; lower is better; PEFT's method-comparison definition, see fimlora.forgetting)"
)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _mean(sub: pd.DataFrame, column: str) -> float:
    if column not in sub or not sub[column].notna().any():
        return math.nan
    return float(pd.to_numeric(sub[column], errors="coerce").mean())


def _fmt(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}" if _finite(value) else "—"


def _groups(builder: Any, frame: pd.DataFrame) -> list[pd.DataFrame]:
    keys = ["budget", "method", *builder.shared_settings, *builder.method_settings]
    groups = [sub for _, sub in frame.groupby(keys, dropna=False, sort=True)]
    return sorted(groups, key=lambda s: (s["budget"].iloc[0], s["method"].iloc[0] != builder.baseline))


def inference_table(builder: Any, frame: pd.DataFrame) -> None:
    """Adapter size on disk, throughput unmerged / merged / base and their ratios, inference peak memory."""
    if "inference_base_per_s" not in frame or not frame["inference_base_per_s"].notna().any():
        return
    measured = frame[frame["inference_base_per_s"].notna()]
    units = sorted({str(u) for u in measured["inference_unit"].dropna()})
    rows = []
    for sub in _groups(builder, measured):
        first = sub.iloc[0]
        rows.append(
            [
                first["budget_label"],
                builder.series_label(first),
                len(sub),
                _fmt(_mean(sub, "adapter_size_mb"), 2),
                _fmt(_mean(sub, "inference_unmerged_per_s"), 1),
                _fmt(_mean(sub, "inference_merged_per_s"), 1),
                _fmt(_mean(sub, "inference_base_per_s"), 1),
                _ratio(_mean(sub, "inference_merged_over_base")),
                _ratio(_mean(sub, "inference_unmerged_over_base")),
                " / ".join(
                    _fmt(_mean(sub, f"inference_{k}_peak_mb"), 0) for k in ("unmerged", "merged", "base")
                ),
            ]
        )
    unit = "/".join(units) or "per s"
    builder.blocks.append(Heading("Inference", 3))
    builder.blocks.append(
        Table(
            [
                "budget",
                "method",
                "runs",
                "adapter on disk (MiB)",
                f"unmerged ({unit})",
                f"merged ({unit})",
                f"base ({unit})",
                "merged / base",
                "unmerged / base",
                "peak memory unmerged / merged / base (MiB)",
            ],
            rows,
            caption=(
                "mean over runs; throughput on one fixed workload per run (classification: examples/s of "
                "forward passes; causal LM: generated tokens/s, greedy), median of 3 interleaved repeats; "
                "merged — for methods that do not merge (HydraLoRA's router). Peak memory = the model's "
                "weights + the most its workload held on top (a lower bound on a CPU)."
            ),
            numeric=set(range(2, 10)),
        )
    )


def _ratio(value: float) -> str:
    return f"{value:.2f}×" if _finite(value) else "—"


def _key(row: Mapping[str, Any], keys: list[str]) -> tuple[Any, ...]:
    """Group key with NaN and None equal and numpy scalars as Python values."""
    out = []
    for key in keys:
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            value = None
        elif hasattr(value, "item"):
            value = value.item()
        out.append(value)
    return tuple(out)


def memory_pareto(
    builder: Any,
    frame: pd.DataFrame,
    summary: pd.DataFrame,
    metric: str,
    title: str,
    *,
    untuned: Sequence[str] = (),
) -> None:
    """The primary metric (mean over seeds, CI) against training peak memory and, where measured, the
    peak memory of the deployed model (merged where the method merges, else unmerged); ``untuned``: the
    points :func:`fimlora.reporting.tuning.untuned_beside_tuned` names, said so in the caption."""
    if "inference_merged_peak_mb" in frame:
        deployed = frame["inference_merged_peak_mb"].where(
            frame["inference_merged_peak_mb"].notna(), frame["inference_unmerged_peak_mb"]
        )
    else:
        deployed = pd.Series(math.nan, index=frame.index)
    frame = frame.assign(_deployed_mb=pd.to_numeric(deployed, errors="coerce"))
    keys = ["budget", "method", *builder.shared_settings, *builder.method_settings]
    by_key = {_key(sub.iloc[0], keys): sub for _, sub in frame.groupby(keys, dropna=False, sort=False)}
    several_budgets = summary["budget"].nunique() > 1
    kinds = frame["peak_memory_kind"].dropna() if "peak_memory_kind" in frame else pd.Series(dtype=object)
    kind = ", ".join(sorted({str(k) for k in kinds}))
    panels: list[tuple[str, list[plots.MemoryPoint]]] = []
    for column, label in (
        ("peak_memory_mb", f"training peak memory (MiB{'; ' + kind if kind else ''})"),
        ("_deployed_mb", "inference peak memory of the deployed model (MiB)"),
    ):
        points = []
        for _, row in summary.iterrows():
            runs = by_key.get(_key(row, keys))
            memory = math.nan if runs is None else _mean(runs, column)
            if _finite(memory) and _finite(row["mean"]):
                name = builder.series_label(row)
                points.append(
                    plots.MemoryPoint(
                        f"{name} ({row['budget_label']})" if several_budgets else name,
                        memory,
                        float(row["mean"]),
                        float(row["ci_low"]),
                        float(row["ci_high"]),
                    )
                )
        if points:
            panels.append((label, points))
    if not panels:
        return
    higher = METRICS.get(metric, True)
    builder.blocks.append(Heading(f"{metric} against peak memory", 3))
    png = plots.memory_pareto_plot(panels, metric=metric, higher_is_better=higher, title=title)
    fronts = "; ".join(
        label.split(" (")[0]
        + ": "
        + ", ".join(p.label for p in plots.pareto_front(points, higher_is_better=higher))
        for label, points in panels
    )
    builder.image(
        f"pareto-memory-{_slug(title)}.png",
        png,
        f"{metric} (mean over seeds; error bars: bootstrap CI) against peak memory (mean over seeds). The "
        "dashed line joins the Pareto front, the methods no other method beats with less memory and a "
        f"better {metric}. Deployed model: merged where the method merges, else unmerged. Fronts — {fronts}."
        + tuning.untuned_note(untuned),
        alt=f"Pareto plot: {metric} vs peak memory",
    )


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[-40:]


def generations(builder: Any, frame: pd.DataFrame, root: Path) -> None:
    """Greedy continuations of the fixed prompts, one row per method (its lowest seed) and the base model."""
    ordered = frame.sort_values(["budget", "seed", "run_dir"], kind="stable")
    keys = ["budget", "method", *builder.shared_settings, *builder.method_settings]
    prompts: list[str] | None = None
    rows: list[list[str]] = []
    base: list[str] | None = None
    for _, sub in ordered.groupby(keys, dropna=False, sort=True):
        run = sub.iloc[0]
        record = _read(root / str(run["run_dir"]) / RESULT_FILE).get("generations")
        if not isinstance(record, Mapping) or not record.get("prompts"):
            continue
        if prompts is None:
            prompts = [str(p) for p in record["prompts"]]
        if [str(p) for p in record["prompts"]] != prompts:
            continue  # another prompt set: not side by side with this one
        label = builder.series_label(run) + (f" ({run['budget_label']}, seed {run['seed']})")
        rows.append([label, *(_short(c) for c in record.get("continuations", []))])
        base = base or [str(c) for c in record.get("base", [])]
    if not rows or prompts is None:
        return
    if base:
        rows.insert(0, ["base model", *(_short(c) for c in base)])
    builder.blocks.append(Heading("Continuations of fixed prompts", 3))
    builder.blocks.append(
        Paragraph(
            "Greedy continuations written at the end of each run (result.json), one run per method: the "
            "lowest seed. The first row is the base model before fine-tuning."
        )
    )
    builder.blocks.append(Table(["model", *(f"“{p}…”" for p in prompts)], rows, caption="continuations"))


def _short(text: Any) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _CONTINUATION_CHARS else text[: _CONTINUATION_CHARS - 1] + "…"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
