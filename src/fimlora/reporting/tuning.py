"""The report's tuning parts: the tuning budget behind tuned results, and learning-rate sensitivity.

For runs of ``fimlora sweep --tuned`` (their ``result.json`` carries ``tuning``), a table next to the
results gives per budget and method the trials its study ran (complete / pruned / failed of the trials
every study was given, and those retried: lost with their process, or failed by a fault since fixed and
given again by ``fimlora tune --retry-failed``), its best validation score (with
several tuning seeds: their aggregate, each seed's score and the spread) and the settings it chose; a
comparison whose
methods ran unequal numbers of trials, or completed unequal numbers, is flagged. From the trial tables
of ``fimlora tune`` (``tuning-trials.csv`` next to ``tuned.yaml``), one plot per budget: validation
score against learning rate, one curve per method.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fimlora.reporting import plots
from fimlora.reporting.document import Heading, Notice, Table
from fimlora.results import METRICS, RESULT_FILE

TRIALS_FILE = "tuning-trials.csv"  # fimlora.tune.output.TRIALS_FILE (not imported: no optuna needed here)
LEARNING_RATE_COLUMN = "param.train.learning_rate"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def tuning_of_runs(root: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (budget, method) of ``frame`` whose runs were tuned: the ``tuning`` record of its
    first run (by seed), as columns."""
    rows = []
    tuned = frame[frame["tuned_params"].notna()] if "tuned_params" in frame.columns else frame.iloc[0:0]
    for (budget, method), sub in tuned.sort_values(["seed", "run_dir"]).groupby(
        ["budget", "method"], sort=True
    ):
        result = _read_json(root / sub["run_dir"].iloc[0] / RESULT_FILE)
        record = result.get("tuning") if isinstance(result, Mapping) else None
        if not isinstance(record, Mapping):
            continue
        trials = record.get("trials") or {}
        rows.append(
            {
                "budget": budget,
                "budget_label": sub["budget_label"].iloc[0],
                "method": method,
                "metric": record.get("metric"),
                "validation_score": record.get("validation_score"),
                "complete": trials.get("complete"),
                "pruned": trials.get("pruned"),
                "failed": trials.get("failed"),
                "lost": trials.get("lost", 0),
                "retried": trials.get("retried", 0),
                "seed_scores": record.get("seed_scores") or {},
                "seed_spread": record.get("seed_spread"),
                "aggregate": record.get("aggregate", "mean"),
                "trials_per_study": record.get("trials_per_study"),
                "params": record.get("params") or {},
                "probes": record.get("probes") or [],
                "file": record.get("file"),
                "shared_from": record.get("shared_from"),
            }
        )
    return pd.DataFrame(rows)


def untuned_beside_tuned(frame: pd.DataFrame) -> list[str]:
    """``method at budget`` for every method and budget none of whose runs ``fimlora tune`` set, where
    some run of ``frame`` was tuned (with no tuned run, nothing stands apart)."""
    if "tuned" not in frame.columns or not frame["tuned"].astype(bool).any():
        return []
    return [
        f"{method} at {budget}"
        for (method, budget), runs in frame.groupby(["method", "budget_label"], sort=True)
        if not runs["tuned"].astype(bool).any()
    ]


def untuned_note(untuned: Sequence[str]) -> str:
    """The sentence a plot's caption ends with when it draws :func:`untuned_beside_tuned` points."""
    if not untuned:
        return ""
    names = ", ".join(untuned)
    return f" Not tuned, unlike the other points (fimlora tune did not choose their settings): {names}."


def _fmt_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _chosen(params: Mapping[str, Any], probes: list[Mapping[str, Any]]) -> str:
    """The tuned settings, ``learning_rate=0.0008``, and whether a probe (``tune.probes``) chose them."""
    text = ", ".join(f"{k.split('.')[-1]}={_fmt_value(v)}" for k, v in params.items())
    from_probe = any(probe and all(params.get(k) == v for k, v in probe.items()) for probe in probes)
    return f"{text} (a probe)" if from_probe else text


def budget_blocks(tuning: pd.DataFrame, baseline: str) -> list[Any]:
    """The tuning-budget table and its flags (empty when no run was tuned)."""
    if tuning.empty:
        return []
    header = [
        "budget",
        "method",
        "trials given",
        "complete",
        "pruned",
        "failed",
        "lost or failed, retried",
        "best validation",
        "tuned",
    ]
    rows: list[list[Any]] = []
    warn: set[int] = set()
    notices = []
    ordered = tuning.assign(_later=tuning["method"] != baseline).sort_values(["budget", "_later", "method"])
    for _, sub in ordered.groupby("budget", sort=True):
        label = sub["budget_label"].iloc[0]
        # A control of tune.share ran no study: its row repeats its reference's, not a second effort.
        studied = [r for _, r in sub.iterrows() if not isinstance(r.get("shared_from"), str)]
        totals = {r["method"]: int(r["complete"] + r["pruned"] + r["failed"]) for r in studied}
        completes = {r["method"]: int(r["complete"]) for r in studied}
        unequal = len(set(totals.values())) > 1
        if unequal:
            listed = ", ".join(f"{m} {n}" for m, n in totals.items())
            notices.append(
                Notice(
                    f"Unequal tuning effort at budget {label}: the methods' studies ran different numbers of "
                    f"trials ({listed}). The comparison below does not give every method the same search."
                )
            )
        elif len(set(completes.values())) > 1:
            listed = ", ".join(f"{m} {n}" for m, n in completes.items())
            notices.append(
                Notice(
                    f"At budget {label} the methods completed unequal numbers of their trials ({listed} of "
                    f"{next(iter(totals.values()))}; the rest were pruned or failed): the best settings "
                    "of some rest on fewer full runs."
                )
            )
        for _, r in sub.iterrows():
            if unequal:
                warn.add(len(rows))
            shared = r.get("shared_from")
            rows.append(
                [
                    label,
                    f"{r['method']} (shares {shared}'s settings)" if isinstance(shared, str) else r["method"],
                    r["trials_per_study"] if r["trials_per_study"] is not None else "—",
                    int(r["complete"]),
                    int(r["pruned"]),
                    int(r["failed"]),
                    int(r["lost"] or 0) + int(r.get("retried") or 0),
                    _best_validation(r),
                    _chosen(r["params"], r.get("probes") or []),
                ]
            )
    listed = tuning["probes"] if "probes" in tuning.columns else []
    probes = {json.dumps(p, sort_keys=True): p for ps in listed for p in ps or []}
    fixed = (
        f"; the last {len(probes)} trials of every study tried fixed points (tune.probes: "
        + "; ".join(_chosen(p, []) for p in probes.values())
        + "), marked (a probe) where one was chosen"
        if probes
        else ""
    )
    table = Table(
        header,
        rows,
        caption="the tuning behind these settings: one Optuna study per method and budget on the validation "
        "split (test never loaded), the same trials, seeded sampler and search space for every method"
        + fixed,
        warn_rows=warn,
        numeric={2, 3, 4, 5, 6},
    )
    return [Heading("Tuning budget", 3), table, *notices]


def _best_validation(row: Mapping[str, Any]) -> str:
    """``accuracy 0.7500``; with several tuning seeds ``accuracy 0.5100 (worst of seed 0 0.7700, seed 1
    0.5100; spread 0.2600)``: the chosen setting's score at each seed and their max − min."""
    score = row["validation_score"]
    if not (isinstance(score, int | float) and math.isfinite(score)):
        return "—"
    text = f"{row['metric']} {score:.4f}"
    seeds = row.get("seed_scores") or {}
    if len(seeds) > 1:
        listed = ", ".join(f"seed {seed} {float(value):.4f}" for seed, value in seeds.items())
        spread = row.get("seed_spread")
        text += f" ({row.get('aggregate', 'mean')} of {listed}" + (
            f"; spread {float(spread):.4f})" if isinstance(spread, int | float) else ")"
        )
    return text


def trial_tables(root: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """Every ``tuning-trials.csv`` below ``root`` (outside hidden directories) or named by a run's
    tuning record, concatenated (duplicates dropped)."""
    paths = {
        p.resolve()
        for p in root.rglob(TRIALS_FILE)
        if not any(s.startswith(".") for s in p.relative_to(root).parts)
    }
    if "tuned_params" in frame.columns:
        for run_dir in frame.loc[frame["tuned_params"].notna(), "run_dir"]:
            result = _read_json(root / run_dir / RESULT_FILE)
            record = result.get("tuning") if isinstance(result, Mapping) else None
            if isinstance(record, Mapping) and isinstance(record.get("file"), str):
                candidate = Path(record["file"]).parent / TRIALS_FILE
                if candidate.is_file():
                    paths.add(candidate.resolve())
    frames = []
    for path in sorted(paths):
        try:
            frames.append(pd.read_csv(path))
        except (OSError, ValueError, pd.errors.EmptyDataError):
            continue
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True).drop_duplicates(["study", "number"])


def sensitivity_images(trials: pd.DataFrame, dataset: str, model: str) -> list[tuple[str, bytes, str]]:
    """``(budget label, png, caption)`` per budget: validation score vs learning rate, a curve per method."""
    if trials.empty or LEARNING_RATE_COLUMN not in trials.columns:
        return []
    subset = trials[(trials["dataset"].astype(str) == dataset) & (trials["model"].astype(str) == model)]
    out = []
    for budget, by_budget in subset.groupby("budget", sort=True):
        metric = str(by_budget["metric"].iloc[0])
        series: dict[str, list[plots.TrialPoint]] = {}
        higher = METRICS.get(metric, True)
        lost = int((by_budget["state"] == "lost").sum())
        retried = int((by_budget["state"] == "retried").sum())
        per_seed = [c for c in by_budget.columns if c.startswith("score.seed") and by_budget[c].notna().any()]
        # No score (lost) or stood in for by a retry: shown in the caption.
        by_budget = by_budget[~by_budget["state"].isin(["lost", "retried"])]
        for method, sub in by_budget.groupby("method", sort=True):
            complete = sub[(sub["state"] == "complete") & sub["value"].notna()]
            # The chosen trial, by the rule of tuned.yaml: the best score, ties to the lowest number.
            chosen = None
            if not complete.empty:
                order = complete.assign(_key=-complete["value"] if higher else complete["value"])
                chosen = int(order.sort_values(["_key", "number"]).iloc[0]["number"])
            series[str(method)] = [
                plots.TrialPoint(
                    float(r[LEARNING_RATE_COLUMN]),
                    float(r["value"]) if pd.notna(r["value"]) else None,
                    str(r["state"]),
                    best=chosen is not None and int(r["number"]) == chosen,
                )
                for _, r in sub.iterrows()
                if pd.notna(r[LEARNING_RATE_COLUMN])
            ]
        if not any(series.values()):
            continue
        others = sorted(
            c.removeprefix("param.")
            for c in by_budget.columns
            if c.startswith("param.") and c != LEARNING_RATE_COLUMN and by_budget[c].notna().any()
        )
        png = plots.sensitivity_plot(
            series,
            metric=metric,
            higher_is_better=higher,
            title=f"{dataset} / {model}, budget {budget}: validation {metric} vs learning rate",
        )
        counts = ", ".join(f"{m} {len(p)}" for m, p in series.items())
        caption = (
            f"Every trial of the tuning (trials: {counts}), scored on the validation split. Line and filled "
            "dots: completed trials, in order of learning rate; hollow: pruned trials at their last "
            "validation score; ×: failed trials (e.g. a diverging loss); star: each method's best trial."
            + (
                f" Each trial trained at {len(per_seed)} seeds; its score is their aggregate (tuned.yaml: "
                "aggregate), a pruned trial's the score of the seed it was stopped at; per-seed scores are "
                f"in {TRIALS_FILE}."
                if len(per_seed) > 1
                else ""
            )
            + (
                f" Not shown: {lost} trial(s) lost with their process and retried with the same values."
                if lost
                else ""
            )
            + (
                f" Not shown: {retried} trial(s) that failed and were given again with the same values "
                "(fimlora tune --retry-failed, after the failure's cause was fixed)."
                if retried
                else ""
            )
            + (
                f" Trials also varied {', '.join(others)}, so neighbouring points may differ in those too."
                if others
                else ""
            )
        )
        out.append((str(budget), png, caption))
    return out
