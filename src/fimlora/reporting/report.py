"""``fimlora report DIR``: every finished run below DIR → ``report.md`` + a self-contained ``report.html``.

Sections, per (dataset, model): results over seeds with bootstrap CIs and the paired comparison against
uniform LoRA (``fimlora.stats``; causal LM: forgetting too), cost, inference cost (unmerged / merged /
base, adapter size), a Pareto plot (metric vs trainable adapter parameters) and one against peak memory,
the continuations of fixed prompts per method (causal LM; :mod:`fimlora.reporting.deployment`), rank
heatmaps (layer × module type) of each non-uniform allocation, the ranks over training of methods that
move them (AdaLoRA, fisher-online), the Fisher importance heatmap, and the training (and, where logged,
evaluation) loss curves, and where hindsight-lora runs are present, which source runs their ranks came
from; then the calibration-size stability of the Fisher ranking when ``calibration.json`` files
(``fimlora calibration``) lie below DIR, and the Fisher over training when ``fisher-trajectory.json``
files (``fimlora fisher-trajectory``) do; then the definitions of the
statistics and the list of unfinished runs. PNGs go to ``<out>/report_files/``; the Markdown links them,
the HTML embeds them. Every file is written atomically and the output is deterministic.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fimlora.analysis.calibration import EMPIRICAL_VS_MC, JSON_FILE, SUBSETS, load_calibration
from fimlora.analysis.fisher_trajectory import JSON_FILE as TRAJECTORY_FILE
from fimlora.analysis.fisher_trajectory import VERSUS_HINDSIGHT, VERSUS_INIT, load_fisher_trajectory
from fimlora.errors import FimloraError
from fimlora.io import atomic_write, atomic_write_text
from fimlora.reporting import deployment, plots, tuning
from fimlora.reporting.document import (
    Block,
    Bullets,
    Details,
    Heading,
    Image,
    Notice,
    Paragraph,
    Table,
    render_html,
    render_markdown,
)
from fimlora.reporting.names import log10_grid, module_grid
from fimlora.results import (
    ALLOCATION_FILE,
    FISHER_META_FILE,
    METRICS,
    METRICS_FILE,
    RESULT_FILE,
    collect_results,
)
from fimlora.runs import TRUNCATION_WARN_SHARE, rank_history, trained_ranks
from fimlora.stats import (
    BASELINE,
    CONFIDENCE,
    MAX_EXACT_SIGN_FLIP,
    MIN_SEEDS,
    N_RESAMPLES,
    SUMMARY_VALUE_COLUMNS,
    metrics_in,
    primary_metric,
    savings,
    savings_not_compared,
    setting_columns,
    summarize,
    tuning_metric,
)

FILES_DIR = "report_files"
MARKDOWN_FILE = "report.md"
TITLE_PREFIX = "fimlora report: "
_RANK_SOURCE_WORDS = {
    "final_ranks": "after pruning",
    "redistributed_ranks": "after redistribution",
    "reallocated_ranks": "after re-allocation",
}
HTML_FILE = "report.html"
SUMMARY_CSV = "summary.csv"


@dataclass
class ReportFiles:
    markdown: Path
    html: Path
    images: list[Path] = field(default_factory=list)
    summary_csv: Path | None = None


# --------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{float(value):.{digits}f}" if _finite(value) else "—"


def _digits(metric: str) -> int:
    return 2 if metric == "perplexity" else 4


def _fmt_p(p: Any) -> str:
    if not _finite(p):
        return "—"
    return "<0.001" if float(p) < 0.001 else f"{float(p):.3f}"


def _fmt_p_holm(raw: Any, adjusted: Any) -> str:
    """``0.012 (0.047)``: a raw p-value and its Holm adjustment; ``(1.000)`` alone where only the
    adjustment exists (differences all 0: no t-test, counted as p = 1)."""
    if not _finite(adjusted):
        return _fmt_p(raw)
    return f"{_fmt_p(raw)} ({_fmt_p(adjusted)})"


def family_phrase(summary: pd.DataFrame, holm_family: str) -> str:
    """What each Holm adjustment of ``summary`` covers, in words: ``this table's 9 comparisons``, or per
    budget (``holm_family`` ``budget``) ``each budget's comparisons on their own (r=1: 9, r=4: 9)``;
    empty when nothing is compared."""
    compared = summary[pd.to_numeric(summary["holm_family_size"], errors="coerce") > 0]
    if compared.empty:
        return ""
    if holm_family == "budget":
        sizes = compared.groupby("budget_label", sort=False)["holm_family_size"].max()
        return (
            "each budget's comparisons on their own ("
            + ", ".join(f"{budget}: {int(n)}" for budget, n in sizes.items())
            + ")"
        )
    n = int(compared["holm_family_size"].max())
    return f"this table's {n} comparison{'s' if n != 1 else ''}"


def findings(summary: pd.DataFrame, metric: str, family: str, label: Any, alpha: float = 0.05) -> str:
    """The sentence under a results table: which differences are findings, i.e. hold after Holm's
    correction over ``family`` (:func:`family_phrase`; paired t-test) on at least ``MIN_SEEDS`` paired
    seeds."""
    below = summary[pd.to_numeric(summary["p_ttest_holm"], errors="coerce") < alpha]
    enough = pd.to_numeric(below["n_paired"], errors="coerce") >= MIN_SEEDS
    where = (
        f"at α = {alpha:g} after Holm's correction over {family} (paired t-test, ≥ {MIN_SEEDS} paired seeds)"
    )
    digits = _digits(metric)

    def listed(rows: pd.DataFrame) -> str:
        return "; ".join(
            f"{r['budget_label']} {label(r)}: Δ {float(r['diff_mean']):+.{digits}f}, "
            f"p {_fmt_p(r['p_ttest'])}, Holm {_fmt_p(r['p_ttest_holm'])}"
            + (
                f", sign-flip Holm {_fmt_p(r['p_signflip_holm'])}"
                if _finite(r["p_signflip_holm"]) and float(r["p_signflip_holm"]) >= alpha
                else ""
            )
            for _, r in rows.iterrows()
        )

    text = f"Findings on {metric} {where}: " + (
        listed(below[enough]) if enough.any() else "none; no difference in this table is a finding"
    )
    if (~enough).any():
        text += (
            f". Below {alpha:g} after correction but on fewer than {MIN_SEEDS} paired seeds, so not "
            f"findings: {listed(below[~enough])}"
        )
    return text + "."


def _fmt_int(value: Any) -> str:
    return f"{round(float(value)):,}" if _finite(value) else "—"


def _not_compared_note(left_out: pd.DataFrame, baseline: str) -> str:
    """One sentence on the savings pairs left out because only one side was tuned."""

    def tuning(flag: Any) -> str:
        return {True: "tuned", False: "not tuned"}.get(flag, "partly tuned")

    pairs = []
    keys = ["budget_label", "tuned", "baseline_budget_label", "baseline_tuned"]
    for (budget, tuned, larger, larger_tuned), rows in left_out.groupby(keys, sort=False, dropna=False):
        methods = ", ".join(sorted(set(rows["method"])))
        against = f"{baseline} at {larger} ({tuning(larger_tuned)})"
        pairs.append(f"{budget} {methods} ({tuning(tuned)}) vs {against}")
    return (
        "Not compared, because fimlora tune chose the settings of one side and not of the other, so a "
        "difference would mix the settings with the budget: " + "; ".join(pairs) + "."
    )


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower()
    return slug[-40:].strip("-") or "x"


def _settings_label(row: Mapping[str, Any], columns: Sequence[str]) -> str:
    parts = []
    for column in columns:
        value = row.get(column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if isinstance(value, float) and len(repr(value)) > 7:  # a tuned rate: 0.0031 not 0.003123456
            value = f"{value:.3g}"
        parts.append(f"{column.split('.')[-1]}={value}")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# Reading per-run files
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_step_metrics(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """Training loss and evaluation loss per step from one ``metrics.jsonl`` (bad lines are skipped)."""
    train: dict[int, float] = {}
    evaluation: dict[int, float] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return train, evaluation
    for line in lines:
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if _finite(record.get("loss")):
            train[step] = float(record["loss"])
        if _finite(record.get("eval_loss")):
            evaluation[step] = float(record["eval_loss"])
    return train, evaluation


def mean_curve(per_run: Sequence[Mapping[int, float]]) -> plots.Curve | None:
    """Mean and std over runs at each step that at least one run logged."""
    per_run = [r for r in per_run if r]
    if not per_run:
        return None
    steps = np.array(sorted(set().union(*per_run)))
    matrix = np.array([[r.get(int(s), np.nan) for s in steps] for r in per_run])
    counts = np.sum(np.isfinite(matrix), axis=0)
    mean = np.nanmean(matrix, axis=0)
    spread = np.full(len(steps), np.nan)
    several = counts > 1
    if several.any():
        spread[several] = np.nanstd(matrix[:, several], axis=0, ddof=1)
    return plots.Curve(steps=steps, y=mean, spread=spread, n_runs=len(per_run))


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


class _Builder:
    def __init__(
        self,
        root: Path,
        frame: pd.DataFrame,
        summary: pd.DataFrame,
        baseline: str,
        metric: str | None,
        *,
        n_resamples: int = N_RESAMPLES,
        seed: int = 0,
        holm_family: str = "table",
    ) -> None:
        self.root = root
        self.n_resamples = n_resamples
        self.seed = seed
        self.holm_family = holm_family
        self.frame = frame
        self.summary = summary
        self.baseline = baseline
        self.metric = metric
        self.blocks: list[Block] = []
        self.images: dict[str, bytes] = {}
        self.primary_reason = ""  # why the current dataset's primary metric is primary, if not by default
        self.majority = ""  # majority-class rate of the current dataset's evaluation split(s)
        shared, method_settings = setting_columns(frame)
        self.shared_settings = shared
        self.method_settings = method_settings
        self.trials = tuning.trial_tables(root, frame)

    def image(self, name: str, png: bytes, caption: str, alt: str = "") -> None:
        if name in self.images:
            stem, suffix = name.rsplit(".", 1)
            index = 2
            while f"{stem}-{index}.{suffix}" in self.images:
                index += 1
            name = f"{stem}-{index}.{suffix}"
        self.images[name] = png
        self.blocks.append(Image(name=name, png=png, caption=caption, alt=alt or caption))

    def series_label(self, row: Mapping[str, Any]) -> str:
        extra = _settings_label(row, [*self.shared_settings, *self.method_settings])
        return f"{row['method']} ({extra})" if extra else str(row["method"])

    # ---------------------------------------------------------------------------------------------

    def overview(self, unfinished: Sequence[Any]) -> None:
        frame = self.frame
        seeds = sorted({int(s) for s in frame["seed"].dropna()})
        pairs = sorted({f"{d} / {m}" for d, m in zip(frame["dataset"], frame["model"], strict=True)})
        revisions = sorted({str(r) for r in frame.get("git_revision", pd.Series(dtype=object)).dropna()})
        items = [
            f"{len(frame)} finished run(s) below `{self.root}`"
            + (f"; {len(unfinished)} unfinished run(s) left out (listed at the end)" if unfinished else ""),
            f"datasets × models: {', '.join(pairs)}",
            f"methods: {', '.join(sorted(frame['method'].unique()))}; "
            f"baseline for paired comparisons: `{self.baseline}`",
            f"seeds: {', '.join(map(str, seeds))}",
            f"budgets: {', '.join(sorted({str(b) for b in frame['budget_label'].dropna()}))}",
        ]
        if self.shared_settings or self.method_settings:
            items.append(
                "settings that vary between runs (they split the groups): "
                + ", ".join(f"`{c}`" for c in [*self.shared_settings, *self.method_settings])
            )
        if revisions:
            items.append(f"git revision(s): {', '.join(f'`{r}`' for r in revisions)}")
        self.blocks += [Bullets(items)]
        if len(revisions) > 1 or any(r.endswith("-dirty") for r in revisions):
            self.blocks.append(
                Notice(
                    "The runs come from more than one code revision or from uncommitted code; "
                    "differences between methods may partly be differences between code versions."
                )
            )
        few = self.summary[self.summary["n_seeds"] < MIN_SEEDS]
        if not few.empty:
            n_groups = len(few.drop_duplicates([c for c in self.summary.columns if c not in _SUMMARY_VALUES]))
            self.blocks.append(
                Notice(
                    f"Fewer than {MIN_SEEDS} seeds back {n_groups} row(s) of the tables below (marked ⚠): "
                    "their means, confidence intervals and p-values are anecdotal, not evidence."
                )
            )

    def dataset_model(self, dataset: str, model: str) -> None:
        frame = self.frame[(self.frame["dataset"] == dataset) & (self.frame["model"] == model)]
        summary = self.summary[(self.summary["dataset"] == dataset) & (self.summary["model"] == model)]
        task = frame["task"].dropna().iloc[0] if frame["task"].notna().any() else "?"
        self.blocks.append(Heading(f"{dataset} / {model} ({task})", 2, anchor=_slug(f"{dataset}-{model}")))
        metrics = metrics_in(frame)
        if self.metric is not None:
            if self.metric not in metrics:
                raise FimloraError(
                    f"No run of {dataset} / {model} records {self.metric!r}; it has {metrics}."
                )
            metrics = [self.metric, *[m for m in metrics if m != self.metric]]
        if not metrics:
            self.blocks.append(Notice("These runs record no held-out metric."))
            return
        primary = metrics[0] if self.metric is not None else primary_metric(frame)
        metrics = [primary, *[m for m in metrics if m != primary]]
        self.primary_reason = (
            ", the one these runs were tuned on" if self.metric is None and tuning_metric(frame) else ""
        )
        self.majority = _value_range(frame, "majority_rate")
        self.data_notes(frame)
        self.blocks.append(Heading("Results over seeds", 3))
        for metric in metrics:
            self.results_table(summary[summary["metric"] == metric], metric, primary=metric == primary)
        self.per_class(frame)
        self.tuning(frame, dataset, model)
        self.cost_table(frame)
        deployment.inference_table(self, frame)
        untuned = tuning.untuned_beside_tuned(frame)
        self.pareto(summary[summary["metric"] == primary], primary, dataset, model, untuned)
        self.savings_table(frame, primary)
        deployment.memory_pareto(
            self,
            frame,
            summary[summary["metric"] == primary],
            primary,
            f"{dataset} / {model}: {primary} vs peak memory",
            untuned=untuned,
        )
        deployment.generations(self, frame, self.root)
        self.rank_heatmaps(frame, dataset, model)
        self.hindsight_sources(frame)
        self.rank_trajectories(frame, dataset, model)
        self.fisher_heatmap(frame, dataset, model)
        self.loss_curves(frame, dataset, model)

    def data_notes(self, frame: pd.DataFrame) -> None:
        """What the runs record about their data: several versions of it, examples cut at
        ``train.max_length``, evaluation rows that also occur in an earlier split."""
        versions = sorted({str(v) for v in frame.get("data_version", pd.Series(dtype=object)).dropna()})
        if len(versions) > 1:
            self.blocks.append(
                Notice(
                    f"These runs read {len(versions)} versions of the data ({', '.join(versions)}): each "
                    "version is summarised and compared on its own (`data_version`)."
                )
            )
        cut = {
            column.removeprefix("truncated."): float(frame[column].max())
            for column in frame.columns
            if column.startswith("truncated.") and frame[column].notna().any()
        }
        if cut:
            shares = ", ".join(f"{share:.0%} of {split}" for split, share in cut.items())
            text = f"Examples cut at `train.max_length` (most in any run): {shares}."
            if max(cut.values()) > TRUNCATION_WARN_SHARE:
                self.blocks.append(Notice(text + " The model never saw the rest of those texts."))
            else:
                self.blocks.append(Paragraph(text))
        found = {
            column.removeprefix("duplicates."): int(frame[column].max())
            for column in frame.columns
            if column.startswith("duplicates.") and frame[column].notna().any() and frame[column].max() > 0
        }
        if found:
            dropped = {
                column.removeprefix("dropped_duplicates."): int(frame[column].max())
                for column in frame.columns
                if column.startswith("dropped_duplicates.") and frame[column].notna().any()
            }
            listed = ", ".join(f"{n} {pair.replace('_in_', ' rows also in ')}" for pair, n in found.items())
            after = (
                f"dropped from the evaluation splits ({', '.join(f'{n} {s}' for s, n in dropped.items())})"
                if dropped
                else "kept (`dataset_options.drop_eval_duplicates: true` drops them)"
            )
            self.blocks.append(Notice(f"Same text in two splits (normalised): {listed}; {after}."))

    def results_table(self, summary: pd.DataFrame, metric: str, *, primary: bool) -> None:
        digits = _digits(metric)
        better = "higher" if METRICS.get(metric, True) else "lower"
        header = [
            "budget",
            "method",
            "seeds",
            "mean ± std",
            f"{CONFIDENCE:.0%} CI",
            "adapter params",
            f"Δ vs {self.baseline}",
            f"{CONFIDENCE:.0%} CI of Δ",
            f"{CONFIDENCE:.0%} t-CI of Δ",
            "p (paired t), raw (Holm)",
            "p (sign-flip), raw (Holm)",
            "note",
        ]
        rows: list[list[Any]] = []
        warn: set[int] = set()
        for _, r in summary.iterrows():
            is_base = r["method"] == self.baseline
            std = f" ± {_fmt(r['std'], digits)}" if _finite(r["std"]) else ""
            note = f"⚠ {r['warning']}" if r["warning"] else ""
            if is_base and not note:
                note = "baseline"
            if r["warning"]:
                warn.add(len(rows))
            rows.append(
                [
                    r["budget_label"],
                    self.series_label(r),
                    int(r["n_seeds"]),
                    f"{_fmt(r['mean'], digits)}{std}",
                    f"[{_fmt(r['ci_low'], digits)}, {_fmt(r['ci_high'], digits)}]"
                    if _finite(r["ci_low"])
                    else "—",
                    _fmt_int(r["adapter_params"]),
                    "—" if is_base or not _finite(r["diff_mean"]) else f"{float(r['diff_mean']):+.{digits}f}",
                    f"[{float(r['diff_ci_low']):+.{digits}f}, {float(r['diff_ci_high']):+.{digits}f}]"
                    if _finite(r["diff_ci_low"])
                    else "—",
                    f"[{float(r['diff_t_ci_low']):+.{digits}f}, {float(r['diff_t_ci_high']):+.{digits}f}]"
                    if _finite(r.get("diff_t_ci_low"))
                    else "—",
                    _fmt_p_holm(r["p_ttest"], r["p_ttest_holm"]),
                    _fmt_p_holm(r["p_signflip"], r["p_signflip_holm"])
                    + (" (MC)" if _finite(r["p_signflip"]) and not bool(r["signflip_exact"]) else ""),
                    note,
                ]
            )
        caption = f"{metric} on the held-out split ({better} is better)" + (
            f"; primary metric{self.primary_reason}" if primary else ""
        )
        if metric == "accuracy" and self.majority:
            caption += f"; always predicting the split's most frequent class scores {self.majority}"
        if metric == "forgetting":
            caption = deployment.FORGETTING_CAPTION
        family = family_phrase(summary, self.holm_family) if len(summary) else ""
        if family:
            caption += f"; Holm's adjustment in brackets, over {family} with {self.baseline}"
        self.blocks.append(Table(header, rows, caption=caption, warn_rows=warn, numeric={2, 5}))
        if family:
            self.blocks.append(Paragraph(findings(summary, metric, family, self.series_label)))

    def per_class(self, frame: pd.DataFrame) -> None:
        """Recall and precision per class (mean over seeds) and the confusion matrices (summed over
        seeds): what accuracy and macro-F1 hide, such as a class that is never predicted."""
        if "class_labels" not in frame.columns or not frame["class_labels"].notna().any():
            return
        labels = json.loads(frame["class_labels"].dropna().iloc[0])
        keys = ["budget", "method", *self.shared_settings, *self.method_settings]
        groups = sorted(
            frame.groupby(keys, dropna=False, sort=True),
            key=lambda kv: (kv[1]["budget"].iloc[0], kv[1]["method"].iloc[0] != self.baseline),
        )
        recall_rows: list[list[Any]] = []
        precision_rows: list[list[Any]] = []
        confusions: list[str] = []
        warn: set[int] = set()
        for _, sub in groups:
            first = sub.iloc[0]
            head = [first["budget_label"], self.series_label(first), len(sub)]
            matrices = _confusions(sub["confusion_matrix"], len(labels))
            matrix = np.sum(matrices, axis=0) if matrices else None
            never = []
            for j, label in enumerate(labels):
                runs = sum(1 for m in matrices if m[:, j].sum() == 0)
                if runs:
                    never.append(f"{label} ({runs} of {len(matrices)} runs)")
            note = f"⚠ never predicts {', '.join(never)}" if never else ""
            if never:
                warn.add(len(recall_rows))
            recall_rows.append(
                [
                    *head,
                    *(_fmt(sub.get(f"recall.{c}", pd.Series(dtype=float)).mean(), 3) for c in labels),
                    note,
                ]
            )
            precision_rows.append(
                [*head, *(_fmt(sub.get(f"precision.{c}", pd.Series(dtype=float)).mean(), 3) for c in labels)]
            )
            if matrix is not None:
                cells = "; ".join(
                    f"true {label}: "
                    + ", ".join(f"{int(n)} {p}" for n, p in zip(matrix[i], labels, strict=True))
                    for i, label in enumerate(labels)
                )
                confusions.append(
                    f"{first['budget_label']}, {self.series_label(first)} ({len(sub)} run(s)) — {cells}"
                )
        self.blocks.append(Heading("Per-class results", 3))
        numeric = set(range(2, 3 + len(labels)))
        majority = f"; majority-class rate of the evaluation split: {self.majority}" if self.majority else ""
        self.blocks.append(
            Table(
                ["budget", "method", "runs", *(f"recall {c}" for c in labels), "note"],
                recall_rows,
                caption="recall per class (share of each true class predicted as itself), mean over runs"
                + majority,
                warn_rows=warn,
                numeric=numeric,
            )
        )
        self.blocks.append(
            Table(
                ["budget", "method", "runs", *(f"precision {c}" for c in labels)],
                precision_rows,
                caption="precision per class (share of each predicted class that is right; 0 when never "
                "predicted), mean over runs",
                numeric=numeric,
            )
        )
        if confusions:
            self.blocks.append(
                Details(
                    "Confusion matrices (evaluation examples, summed over runs): per true class, how many "
                    "were predicted as each class",
                    confusions,
                    open=len(confusions) <= 12,
                )
            )

    def tuning(self, frame: pd.DataFrame, dataset: str, model: str) -> None:
        """The tuning budget next to results on tuned settings; learning-rate sensitivity of the trials."""
        self.blocks += tuning.budget_blocks(tuning.tuning_of_runs(self.root, frame), self.baseline)
        images = tuning.sensitivity_images(self.trials, dataset, model)
        if images:
            self.blocks.append(Heading("Learning-rate sensitivity (validation split)", 3))
        for budget, png, caption in images:
            name = f"sensitivity-{_slug(dataset)}-{_slug(model)}-{_slug(budget)}.png"
            self.image(name, png, caption, alt=f"validation score vs learning rate, budget {budget}")

    def cost_table(self, frame: pd.DataFrame) -> None:
        columns = [
            ("train_time_s", "train time (s)", 1),
            ("train_examples_per_s", "examples/s", 1),
            ("peak_memory_mb", "peak memory (MiB)", 0),
            ("eval_time_s", "eval time (s)", 1),
        ]
        present = [c for c in columns if c[0] in frame.columns and frame[c[0]].notna().any()]
        if not present:
            return
        keys = ["budget", "method", *self.shared_settings, *self.method_settings]
        rows = []
        groups = sorted(
            frame.groupby(keys, dropna=False, sort=True),
            key=lambda kv: (kv[1]["budget"].iloc[0], kv[1]["method"].iloc[0] != self.baseline),
        )
        for _, sub in groups:
            first = sub.iloc[0]
            row: list[Any] = [first["budget_label"], self.series_label(first), len(sub)]
            row += [_fmt(sub[c].mean(), d) for c, _, d in present]
            rows.append(row)
        kind = frame["peak_memory_kind"].dropna().unique() if "peak_memory_kind" in frame else []
        caption = "cost, mean over runs" + (
            f"; peak memory = {', '.join(map(str, kind))}" if len(kind) else ""
        )
        self.blocks.append(
            Table(
                ["budget", "method", "runs", *(label for _, label, _ in present)],
                rows,
                caption=caption,
                numeric=set(range(2, 3 + len(present))),
            )
        )

    def pareto(
        self, summary: pd.DataFrame, metric: str, dataset: str, model: str, untuned: Sequence[str] = ()
    ) -> None:
        """``untuned``: the points whose settings ``fimlora tune`` did not choose, beside tuned ones."""
        series: dict[str, list[plots.ParetoPoint]] = {}
        for _, r in summary.iterrows():
            if not _finite(r["adapter_params"]):
                continue
            series.setdefault(self.series_label(r), []).append(
                plots.ParetoPoint(
                    float(r["adapter_params"]), float(r["mean"]), float(r["ci_low"]), float(r["ci_high"])
                )
            )
        if not series:
            return
        self.blocks.append(
            Heading("Accuracy–size trade-off" if metric == "accuracy" else "Metric–size trade-off", 3)
        )
        png = plots.pareto_plot(
            series,
            metric=metric,
            higher_is_better=METRICS.get(metric, True),
            title=f"{dataset} / {model}: {metric} vs trainable adapter parameters",
        )
        self.image(
            f"pareto-{_slug(dataset)}-{_slug(model)}-{metric}.png",
            png,
            f"{metric} (mean over seeds; error bars: {CONFIDENCE:.0%} bootstrap CI, none for a single seed) "
            "against the trainable LoRA parameters actually built, one line per method. Points at the same "
            "budget are drawn a few pixels apart so that their error bars stay visible."
            + tuning.untuned_note(untuned),
            alt=f"Pareto plot: {metric} vs adapter parameters",
        )

    def savings_table(self, frame: pd.DataFrame, metric: str, alpha: float = 0.05) -> None:
        """Does a smaller budget reach the baseline at a larger one (:func:`fimlora.stats.savings`)?"""
        table = savings(
            frame,
            metric,
            baseline=self.baseline,
            n_resamples=self.n_resamples,
            seed=self.seed,
            holm_family=self.holm_family,
        )
        left_out = savings_not_compared(frame, baseline=self.baseline)
        if table.empty and left_out.empty:
            return
        self.blocks.append(Heading(f"Savings: smaller budgets against {self.baseline} at a larger one", 3))
        if not table.empty:
            self._savings_rows(table, metric, alpha)
        if not left_out.empty:
            self.blocks.append(Paragraph(_not_compared_note(left_out, self.baseline)))

    def _savings_rows(self, table: pd.DataFrame, metric: str, alpha: float) -> None:
        digits = _digits(metric)
        header = [
            "budget",
            "method",
            "adapter params",
            f"vs {self.baseline} at",
            "its params",
            "seeds",
            "Δ",
            f"{CONFIDENCE:.0%} t-CI of Δ",
            "p (paired t), raw (Holm)",
        ]
        rows = [
            [
                r["budget_label"],
                self.series_label(r),
                _fmt_int(r["adapter_params"]),
                r["baseline_budget_label"],
                _fmt_int(r["baseline_params"]),
                int(r["n_paired"]),
                f"{float(r['diff_mean']):+.{digits}f}" if _finite(r["diff_mean"]) else "—",
                f"[{float(r['diff_t_ci_low']):+.{digits}f}, {float(r['diff_t_ci_high']):+.{digits}f}]"
                if _finite(r["diff_t_ci_low"])
                else "—",
                _fmt_p_holm(r["p_ttest"], r["p_ttest_holm"]),
            ]
            for _, r in table.iterrows()
        ]
        better = METRICS.get(metric, True)
        if self.holm_family == "budget":
            sizes = table.groupby(["budget_label", "baseline_budget_label"], sort=False)["holm_family_size"]
            family = (
                "each pair of budgets' comparisons on their own ("
                + ", ".join(f"{budget} vs {larger}: {int(n)}" for (budget, larger), n in sizes.max().items())
                + ")"
            )
        else:
            n = int(table["holm_family_size"].max())
            family = f"these {n} comparison{'s' if n != 1 else ''}"
        caption = (
            f"{metric}: each method at a budget minus {self.baseline} at a larger budget, paired by seed "
            f"({'higher' if better else 'lower'} is better); Holm's adjustment over {family}, a family "
            "apart from the results table's"
        )
        self.blocks.append(Table(header, rows, caption=caption, numeric={2, 4, 5}))
        held = table[
            (pd.to_numeric(table["p_ttest_holm"], errors="coerce") < alpha)
            & (pd.to_numeric(table["n_paired"], errors="coerce") >= MIN_SEEDS)
        ]
        short = held[(held["diff_mean"] < 0) == better]
        beyond = held[(held["diff_mean"] < 0) != better]
        rest = table.drop(index=held.index)

        def listed(rows: pd.DataFrame) -> str:
            names = [
                f"{r['budget_label']} {self.series_label(r)} vs {r['baseline_budget_label']}"
                for _, r in rows.iterrows()
            ]
            return "; ".join(names) if names else "none"

        self.blocks.append(
            Paragraph(
                f"Falls short of the larger budget's {self.baseline} (Holm-adjusted paired t p < {alpha:g}, "
                f"≥ {MIN_SEEDS} seeds): {listed(short)}. Beats it: {listed(beyond)}. Not told apart on "
                f"these seeds (not evidence that they are equal; read the interval): {listed(rest)}."
            )
        )

    def _representatives(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Per (budget, series): the run with the lowest seed (ties: first by run_dir)."""
        ordered = frame.sort_values(["budget", "seed", "run_dir"], kind="stable")
        keys = ["budget", "method", *self.shared_settings, *self.method_settings]
        return ordered.groupby(keys, dropna=False, sort=True).head(1)

    def rank_heatmaps(self, frame: pd.DataFrame, dataset: str, model: str) -> None:
        reps = self._representatives(frame)
        figures = []
        for budget, sub in reps.groupby("budget", sort=True):
            panels = []
            chosen = []
            uniform = []
            for _, run in sub.iterrows():
                found = self._final_ranks(run["run_dir"])
                if found is None:
                    continue
                ranks, source = found
                if len(set(ranks.values())) == 1:
                    uniform.append(
                        f"{self.series_label(run)} (rank {int(next(iter(ranks.values())))} everywhere)"
                    )
                    continue
                order = _model_order(self.root / run["run_dir"])
                title = f"{self.series_label(run)} — seed {run['seed']}"
                if source in _RANK_SOURCE_WORDS:
                    title += f" ({_RANK_SOURCE_WORDS[source]})"
                panels.append((title, module_grid(ranks, order)))
                chosen.append(f"{self.series_label(run)}: seed {run['seed']} (`{run['run_dir']}`)")
            if panels:
                figures.append((budget, sub["budget_label"].iloc[0], panels, chosen, uniform))
        if not figures:
            return
        self.blocks.append(Heading("Rank allocations", 3))
        for budget, label, panels, chosen, uniform in figures:
            png = plots.heatmaps(
                panels,
                title=f"{dataset} / {model}: LoRA rank per layer × module type, budget {label}",
                colorbar_label="rank",
                integer=True,
            )
            caption = (
                f"Budget {label} ({_fmt_int(budget)} parameters). One representative run per method: the "
                f"lowest finished seed — {'; '.join(chosen)}."
            )
            if uniform:
                caption += f" Not shown (uniform): {'; '.join(uniform)}."
            self.image(
                f"ranks-{_slug(dataset)}-{_slug(model)}-{int(budget)}.png",
                png,
                caption,
                alt=f"rank heatmaps, budget {label}",
            )

    def rank_trajectories(self, frame: pd.DataFrame, dataset: str, model: str) -> None:
        """Ranks over training of the methods that move them (AdaLoRA, fisher-online): one figure per
        (budget, method), from its lowest finished seed."""
        made = False
        for _, run in self._representatives(frame).iterrows():
            result = _read_json(self.root / run["run_dir"] / RESULT_FILE)
            history = rank_history(result) if isinstance(result, dict) else None
            if history is None:
                continue
            if not made:
                self.blocks.append(Heading("Ranks during training", 3))
                made = True
            train = result.get("train") if isinstance(result.get("train"), dict) else {}
            end = train.get("steps") if isinstance(train.get("steps"), int) else None
            label = self.series_label(run)
            png = plots.rank_trajectories(
                history,
                title=f"{dataset} / {model}: {label}, budget {run['budget_label']}, seed {run['seed']}",
                end_step=end,
                order=_model_order(self.root / run["run_dir"]),
            )
            self.image(
                f"rank-trajectories-{_slug(dataset)}-{_slug(model)}-{_slug(str(run['method']))}-"
                f"{int(run['budget'])}.png",
                png,
                f"Rank of each module over training, {label} at budget {run['budget_label']} "
                f"(`{run['run_dir']}`, the lowest finished seed): one panel per module type, one line per "
                f"layer (colour), recorded at {len(history)} points; a rank holds until the next point. "
                "AdaLoRA: triplets its masks keep; fisher-online: the ranks after each re-allocation.",
                alt=f"rank trajectories of {label}",
            )

    def _final_ranks(self, run_dir: str) -> tuple[dict[str, float], str] | None:
        """The ranks the run trained at the end: AdaLoRA's after pruning, EVA's after redistribution,
        otherwise its allocation's."""
        result = _read_json(self.root / run_dir / RESULT_FILE)
        trained = trained_ranks(result) if isinstance(result, dict) else None
        if trained is not None:
            return {name: float(rank) for name, rank in trained[0].items()}, trained[1]
        allocation = _read_json(self.root / run_dir / ALLOCATION_FILE)
        if not isinstance(allocation, dict) or not isinstance(allocation.get("ranks"), dict):
            return None
        return {str(k): float(v) for k, v in allocation["ranks"].items()}, "allocation"

    def fisher_heatmap(self, frame: pd.DataFrame, dataset: str, model: str) -> None:
        runs = frame.sort_values(["seed", "run_dir"], kind="stable")
        for _, run in runs.iterrows():
            meta = _read_json(self.root / run["run_dir"] / FISHER_META_FILE)
            if not isinstance(meta, dict) or not isinstance(meta.get("scores"), dict):
                continue
            panels = []
            for aggregation, scores in sorted(meta["scores"].items(), key=lambda kv: kv[0] != "mean"):
                if isinstance(scores, dict) and scores:
                    order = list(meta.get("shapes", {}))
                    grid = log10_grid(module_grid({str(k): float(v) for k, v in scores.items()}, order))
                    panels.append((f'"{aggregation}" score (log10)', grid))
            if not panels:
                continue
            self.blocks.append(Heading("Fisher importance", 3))
            png = plots.heatmaps(
                panels,
                title=f"{dataset} / {model}: Fisher score per layer × module type (log10)",
                colorbar_label="log10 score",
                cmap="magma",
                shared_scale=False,
            )
            used = run.get("fisher_aggregation")
            self.image(
                f"fisher-{_slug(dataset)}-{_slug(model)}.png",
                png,
                f"Diagonal Fisher of the frozen weights, {meta.get('estimator', '?')} estimator on "
                f"{meta.get('num_examples', '?')} calibration examples, from seed {run['seed']} "
                f'(`{run["run_dir"]}`, the lowest seed with a saved Fisher). "mean" = Σ F / numel '
                f'(importance per weight), "trace" = Σ F; '
                + (f'the allocation used "{used}".' if isinstance(used, str) else "")
                + " Each panel has its own colour scale.",
                alt="Fisher importance heatmap",
            )
            return

    def loss_curves(self, frame: pd.DataFrame, dataset: str, model: str) -> None:
        keys = ["method", *self.shared_settings, *self.method_settings]
        made = False
        for budget, by_budget in frame.groupby("budget", sort=True):
            train_curves: dict[str, plots.Curve] = {}
            eval_curves: dict[str, plots.Curve] = {}
            for _, sub in by_budget.groupby(keys, dropna=False, sort=False):
                sub = sub.drop_duplicates("seed", keep="first")
                logs = [read_step_metrics(self.root / d / METRICS_FILE) for d in sub["run_dir"]]
                label = self.series_label(sub.iloc[0])
                train = mean_curve([t for t, _ in logs])
                evaluation = mean_curve([e for _, e in logs])
                if train is not None:
                    train_curves[label] = train
                if evaluation is not None:
                    eval_curves[label] = evaluation
            if not train_curves:
                continue
            ordered = dict(
                sorted(train_curves.items(), key=lambda kv: (kv[0].split(" (")[0] != self.baseline, kv[0]))
            )
            if not made:
                self.blocks.append(Heading("Training curves", 3))
                made = True
            max_steps = max(int(c.steps.max()) for c in ordered.values())
            window = max(1, round(max_steps / 20))
            smoothing = (
                f"faint: the raw mean, bold: its {window}-step moving average"
                if window > 1
                else "not smoothed"
            )
            label = by_budget["budget_label"].iloc[0]
            png = plots.loss_curves(
                ordered,
                eval_curves or None,
                title=f"{dataset} / {model}, budget {label}",
                window=window,
            )
            self.image(
                f"loss-{_slug(dataset)}-{_slug(model)}-{int(budget)}.png",
                png,
                f"Training loss per optimiser step (from metrics.jsonl), mean over seeds (n = runs); "
                f"{smoothing}; band: ± std over seeds."
                + (" Right: evaluation loss logged during training." if eval_curves else ""),
                alt=f"loss curves, budget {label}",
            )

    # ---------------------------------------------------------------------------------------------

    def calibration(self) -> None:
        found = []
        for path in sorted(self.root.rglob(JSON_FILE)):
            result = load_calibration(path)
            if result is not None and result.records:
                found.append((path, result))
        if not found:
            return
        self.blocks.append(
            Heading("Calibration size: how stable is the Fisher ranking?", 2, anchor="calibration")
        )
        self.blocks.append(
            Paragraph(
                "For each calibration size, the Fisher was estimated on several mutually disjoint subsets of "
                "the training split, and the per-module scores of every pair of subsets were compared: "
                "Kendall τ of the two rankings (1 = identical order), Spearman ρ, and the overlap of the "
                'top-k modules. "empirical vs MC" compares the empirical and the Monte-Carlo Fisher on the '
                "same subset. Error bars: min–max over the compared pairs."
            )
        )
        for path, result in found:
            info = result.info
            summary = result.summary()
            aggregation = str(info.get("aggregation", "mean"))
            rel = path.parent.relative_to(self.root) if path.is_relative_to(self.root) else path.parent
            k = int(info.get("k", 0) or summary["k"].max())
            lines_tau: list[plots.StabilityLine] = []
            lines_overlap: list[plots.StabilityLine] = []
            for (comparison, estimator), sub in summary[summary["aggregation"] == aggregation].groupby(
                ["comparison", "estimator"], sort=True
            ):
                sub = sub.sort_values("size")
                label = (
                    "empirical vs MC (same subset)"
                    if comparison == EMPIRICAL_VS_MC
                    else f"disjoint subsets, {estimator}"
                )
                for lines, column in ((lines_tau, "kendall_tau"), (lines_overlap, "top_k_overlap")):
                    lines.append(
                        plots.StabilityLine(
                            label=label,
                            sizes=sub["size"].to_numpy(float),
                            mean=sub[f"{column}_mean"].to_numpy(float),
                            low=sub[f"{column}_min"].to_numpy(float),
                            high=sub[f"{column}_max"].to_numpy(float),
                            dashed=comparison == EMPIRICAL_VS_MC,
                        )
                    )
            name = f"{info.get('model', '?')} / {info.get('dataset', '?')}"
            title = f'{name}: Fisher ranking stability ("{aggregation}" score)'
            self.blocks.append(Heading(f"{name} (`{rel}`)", 3))
            if lines_tau:
                png = plots.stability_plot(lines_tau, lines_overlap, title=title, k=k)
                self.image(
                    f"calibration-{_slug(str(rel))}.png",
                    png,
                    f"{info.get('repeats', '?')} disjoint subsets per size, "
                    f"{info.get('num_modules', '?')} modules, top-k with k = {k}; "
                    f"seed {info.get('seed', '?')}.",
                    alt="calibration stability plot",
                )
            rows = []
            for _, r in summary.iterrows():
                rows.append(
                    [
                        int(r["size"]),
                        "empirical vs MC" if r["comparison"] == EMPIRICAL_VS_MC else "disjoint subsets",
                        r["estimator"] if r["comparison"] == SUBSETS else "—",
                        r["aggregation"],
                        int(r["n_pairs"]),
                        _mean_range(r, "kendall_tau", 3),
                        _fmt(r["spearman_mean"], 3),
                        _mean_range(r, "top_k_overlap", 2),
                    ]
                )
            self.blocks.append(
                Table(
                    [
                        "size",
                        "comparison",
                        "estimator",
                        "aggregation",
                        "pairs",
                        "Kendall τ mean [min, max]",
                        "Spearman ρ mean",
                        f"top-{k} overlap mean [min, max]",
                    ],
                    rows,
                    caption="agreement of per-module Fisher scores",
                    numeric={0, 4},
                )
            )

    def hindsight_sources(self, frame: pd.DataFrame) -> None:
        """Which finished runs the hindsight allocations read their trained updates from."""
        rows = []
        for _, run in frame.sort_values(["method", "seed", "run_dir"], kind="stable").iterrows():
            if run.get("alloc_strategy") != "hindsight":
                continue
            result = _read_json(self.root / run["run_dir"] / RESULT_FILE)
            allocation = result.get("allocation") if isinstance(result, dict) else None
            source = allocation.get("source") if isinstance(allocation, dict) else None
            if not isinstance(source, dict):
                continue
            kind = str(source.get("kind"))
            if source.get("rank") is not None:
                kind += f" r={source['rank']}"
            rows.append(
                [
                    str(run["method"]),
                    str(run["budget_label"]),
                    int(run["seed"]),
                    f"{source.get('method')} ({kind})",
                    source.get("seed"),
                    "yes" if source.get("tuned") else "no",
                    f"`{_rel(Path(str(source.get('path'))), self.root)}`",
                ]
            )
        if not rows:
            return
        self.blocks.append(Heading("Hindsight sources", 3))
        self.blocks.append(
            Paragraph(
                "hindsight allocations spend the budget on the largest singular values of the updates a "
                "finished run trained (full fine-tuning: W_trained − W; uniform LoRA: s·B·A, whose rank "
                "caps every module), then train from scratch: an upper bound for any allocation made "
                "before training. Each row is one hindsight run and the run it read."
            )
        )
        self.blocks.append(
            Table(
                ["method", "budget", "seed", "source (kind)", "source seed", "source tuned", "source run"],
                rows,
                caption="hindsight runs and their source runs",
                numeric={2, 4},
            )
        )

    def fisher_trajectories(self) -> None:
        found = []
        for path in sorted(self.root.rglob(TRAJECTORY_FILE)):
            result = load_fisher_trajectory(path)
            if result is not None and result.records:
                found.append((path, result))
        if not found:
            return
        self.blocks.append(Heading("Does the Fisher move during training?", 2, anchor="fisher-trajectory"))
        self.blocks.append(
            Paragraph(
                "The per-module Fisher of the frozen weights, estimated on the same calibration examples "
                "at fractions of one LoRA run's training, through the adapter trained so far; each "
                "snapshot's ranking of the modules is compared with the one at initialisation (what "
                "fim-lora allocates by) and with the hindsight ranking (the energy ‖ΔW‖² of the update "
                "training made to each module, from the named source run). τ ≈ 1 against init: the "
                "Fisher at init already ranks modules as later; τ against hindsight: whether the Fisher "
                "ranks modules as training ends up using them."
            )
        )
        for path, result in found:
            info = result.info
            aggregation = str(info.get("aggregation", "mean"))
            k = int(info.get("k", 1))
            rel = path.parent.relative_to(self.root) if path.is_relative_to(self.root) else path.parent
            name = f"{info.get('model', '?')} / {info.get('dataset', '?')}, {info.get('method', '?')}"
            self.blocks.append(Heading(f"{name}, seed {info.get('seed', '?')} (`{rel}`)", 3))
            frame = pd.DataFrame(result.records)
            chosen = frame[frame["aggregation"] == aggregation].sort_values(["versus", "step"])
            source = info.get("hindsight_source") or {}
            # Recorded resolved; named below the report's root like every other run of the report.
            source_path = _rel(Path(source["path"]), self.root) if source.get("path") else "?"
            labels = {
                VERSUS_INIT: "vs the Fisher at init",
                VERSUS_HINDSIGHT: f"vs hindsight ({source.get('kind', '?')})",
            }
            lines_tau: list[plots.TrajectoryLine] = []
            lines_overlap: list[plots.TrajectoryLine] = []
            for versus in (VERSUS_INIT, VERSUS_HINDSIGHT):
                sub = chosen[chosen["versus"] == versus]
                for lines, column in ((lines_tau, "kendall_tau"), (lines_overlap, "top_k_overlap")):
                    lines.append(
                        plots.TrajectoryLine(
                            labels[versus],
                            sub["fraction"].to_numpy(float),
                            sub[column].to_numpy(float),
                            dashed=versus == VERSUS_INIT,
                        )
                    )
            png = plots.trajectory_plot(
                lines_tau, lines_overlap, title=f'{name}: Fisher ranking over training ("{aggregation}")', k=k
            )
            self.image(
                f"fisher-trajectory-{_slug(str(rel))}.png",
                png,
                f"{info.get('num_modules', '?')} modules, {info.get('num_examples', '?')} calibration "
                f"examples ({info.get('estimator', '?')} Fisher), {info.get('steps', '?')} training "
                f"steps; hindsight source `{source_path}`.",
                alt="Fisher ranking over training",
            )
            rows = [
                [
                    f"{r['fraction']:.0%}",
                    int(r["step"]),
                    labels[str(r["versus"])],
                    _fmt(r["kendall_tau"], 3),
                    _fmt_p(r.get("kendall_p")),
                    _fmt(r["spearman"], 3),
                    _fmt(r["top_k_overlap"], 2),
                ]
                for _, r in chosen.sort_values(["step", "versus"], ascending=[True, False]).iterrows()
            ]
            self.blocks.append(
                Table(
                    [
                        "training",
                        "step",
                        "comparison",
                        "Kendall τ",
                        "p (τ)",
                        "Spearman ρ",
                        f"top-{k} overlap",
                    ],
                    rows,
                    caption=f'agreement of per-module Fisher scores ("{aggregation}") along training',
                    numeric={1},
                )
            )

    def definitions(self, n_resamples: int) -> None:
        self.blocks += [
            Heading("How to read the statistics", 2, anchor="statistics"),
            Bullets(
                [
                    "One value per seed and configuration (dataset, model, budget, method, and any setting "
                    "that varies between runs). mean ± std: sample mean and standard deviation (ddof = 1).",
                    f"{CONFIDENCE:.0%} CI: percentile bootstrap of the mean over seeds — "
                    f"{n_resamples:,} resamples of the seed values with replacement (seeded, so the report "
                    "is reproducible), the 2.5% and 97.5% quantiles of the resampled means. With few seeds "
                    "it is too narrow: it cannot reach beyond the values observed.",
                    f"Δ vs {self.baseline}: the mean over shared seeds of (method − {self.baseline}) on the "
                    "same seed, i.e. same data split, task-head initialisation and data order; its CI is the "
                    "same bootstrap over the per-seed differences. t-CI of Δ: mean(d) ± t(n − 1, 0.975) · "
                    "sd(d)/√n, the interval the paired t-test inverts; with few seeds it is the honest one "
                    "(the bootstrap interval is narrower than 95% coverage). An interval that excludes 0 "
                    "agrees with p (paired t) < 0.05.",
                    "p (paired t): two-sided paired t-test (scipy.stats.ttest_rel), "
                    "t = mean(d) / (sd(d)/√n), n − 1 degrees of freedom; assumes roughly normal differences.",
                    "p (sign-flip): two-sided exact permutation test — every one of the 2ⁿ ways to flip the "
                    "signs of the n differences, p = share with |mean| ≥ the observed |mean| (exact up to "
                    f"n = {MAX_EXACT_SIGN_FLIP}, Monte Carlo beyond, marked MC). No distributional "
                    "assumption, but coarse: its smallest possible value is 2/2ⁿ — with 5 seeds 0.0625, so "
                    "5 seeds can never give p < 0.05 by this test.",
                    "Multiple comparisons: next to each raw p-value, in brackets, its Holm adjustment over "
                    + (
                        "the family of its table — every budget × method (× varying setting) compared with "
                        f"{self.baseline} on one dataset, model and metric"
                        if self.holm_family == "table"
                        else "the family of its budget — every method (× varying setting) compared with "
                        f"{self.baseline} at one budget, dataset, model and metric (--holm-family budget: "
                        "each budget read as a cell of its own)"
                    )
                    + ", each test separately (Holm's "
                    "step-down: the i-th smallest of m p-values times m − i + 1, never below a smaller "
                    "one's, capped at 1). A difference is called a finding only when its Holm-adjusted "
                    "paired-t p is below 0.05; the sentence under each table lists them. Families are "
                    "per table, not across metrics or datasets.",
                    f"⚠ marks rows backed by fewer than {MIN_SEEDS} seeds, and names a row's seeds at "
                    "chance (classification: mean recall per class at most 1/K + 0.01 for K classes, what a "
                    "run that predicts one class for nearly every example scores, whichever class); their "
                    "values stay in the row's mean ± std and Δ.",
                ]
            ),
        ]

    def unfinished(self, unfinished: Sequence[Any]) -> None:
        if not unfinished:
            return
        self.blocks += [
            Heading("Unfinished runs", 2, anchor="unfinished"),
            Paragraph("These directories have no finished result.json; nothing from them enters the report."),
            Details(
                f"{len(unfinished)} unfinished run(s)",
                [f"`{_rel(u.path, self.root)}` — {u.reason}" for u in unfinished],
                open=len(unfinished) <= 20,
            ),
        ]


_SUMMARY_VALUES = set(SUMMARY_VALUE_COLUMNS)


def _value_range(frame: pd.DataFrame, column: str) -> str:
    """``0.625``, or ``0.600–0.650`` when runs differ (e.g. splits carved per seed); "" when absent."""
    if column not in frame.columns:
        return ""
    values = pd.to_numeric(frame[column], errors="coerce").dropna()
    if values.empty:
        return ""
    low, high = float(values.min()), float(values.max())
    return f"{low:.3f}" if round(low, 3) == round(high, 3) else f"{low:.3f}–{high:.3f}"


def _confusions(cells: pd.Series, k: int) -> list[np.ndarray]:
    """The readable K×K confusion matrices among some runs' ``confusion_matrix`` cells (JSON strings)."""
    found = []
    for cell in cells.dropna():
        try:
            matrix = np.asarray(json.loads(cell), dtype=np.int64)
        except (TypeError, ValueError):
            continue
        if matrix.shape == (k, k):
            found.append(matrix)
    return found


def _mean_range(row: Mapping[str, Any], column: str, digits: int) -> str:
    low, high = _fmt(row[f"{column}_min"], digits), _fmt(row[f"{column}_max"], digits)
    return f"{_fmt(row[f'{column}_mean'], digits)} [{low}, {high}]"


def _rel(path: Path, root: Path) -> str:
    """``path`` below ``root`` where it is (records hold resolved paths, a report's root may be relative)."""
    for candidate, base in ((path, root), (path.resolve(), root.resolve())):
        try:
            return str(candidate.relative_to(base))
        except ValueError:
            continue
    return str(path)


def _model_order(run_dir: Path) -> list[str] | None:
    """Module names in the model's own order, from the run's fisher.json when it has one."""
    meta = _read_json(run_dir / FISHER_META_FILE)
    if isinstance(meta, dict) and isinstance(meta.get("shapes"), dict):
        return list(meta["shapes"])
    return None


def build_report(
    root: str | Path,
    out: str | Path | None = None,
    *,
    metric: str | None = None,
    baseline: str | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    holm_family: str = "table",
) -> ReportFiles:
    """Write ``report.md``, ``report.html``, ``report_files/*.png`` and ``report_files/summary.csv``.

    ``root``: directory searched recursively for runs (and ``calibration.json``); ``out`` defaults to it.
    ``metric``: the primary metric (default: accuracy for classification, perplexity for causal LM).
    ``baseline``: the method of the paired comparisons; default ``lora``, and a notice instead of
    comparisons when no run has it. ``holm_family``: what one Holm adjustment covers, ``table`` (every
    budget of a results table) or ``budget`` (:data:`fimlora.stats.HOLM_FAMILIES`). Raises
    ``FimloraError`` when ``root`` is missing or holds no finished run, or when a ``baseline`` given
    explicitly has no finished run.
    """
    root = Path(root)
    out = Path(out) if out is not None else root
    _refuse_foreign_report(out / MARKDOWN_FILE)
    table = collect_results(root)
    frame = table.frame
    methods = sorted(str(m) for m in frame["method"].unique())
    if baseline is not None and baseline not in methods:
        raise FimloraError(
            f"No finished run of the baseline method {baseline!r} below {root}; the runs there are of "
            f"{', '.join(methods)}: choose --baseline among them."
        )
    baseline = baseline or BASELINE
    summary = summarize(frame, baseline=baseline, n_resamples=n_resamples, seed=seed, holm_family=holm_family)
    builder = _Builder(
        root, frame, summary, baseline, metric, n_resamples=n_resamples, seed=seed, holm_family=holm_family
    )
    title = f"{TITLE_PREFIX}{root.resolve().name}"
    builder.blocks.append(Heading(title, 1))
    builder.overview(table.unfinished)
    if baseline not in methods:
        builder.blocks.append(
            Notice(
                f"No run of `{baseline}` below this directory, so there are no paired comparisons; "
                "give --baseline METHOD to compare against another method."
            )
        )
    pairs = sorted({(str(d), str(m)) for d, m in zip(frame["dataset"], frame["model"], strict=True)})
    for dataset, model in pairs:
        builder.dataset_model(dataset, model)
    builder.calibration()
    builder.fisher_trajectories()
    builder.definitions(n_resamples)
    builder.unfinished(table.unfinished)

    files_dir = out / FILES_DIR
    images = [atomic_write(files_dir / name, _bytes_writer(png)) for name, png in builder.images.items()]
    for stale in files_dir.glob("*.png"):
        if stale.name not in builder.images:
            stale.unlink()
    summary_csv = atomic_write(files_dir / SUMMARY_CSV, lambda tmp: summary.to_csv(tmp, index=False))
    markdown = atomic_write_text(out / MARKDOWN_FILE, render_markdown(builder.blocks, files_dir=FILES_DIR))
    html = atomic_write_text(out / HTML_FILE, render_html(builder.blocks, title=title))
    return ReportFiles(markdown=markdown, html=html, images=images, summary_csv=summary_csv)


def _bytes_writer(data: bytes) -> Any:
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return write


def _refuse_foreign_report(path: Path) -> None:
    """A ``report.md`` that this function did not write (e.g. the demo's summary) is not replaced."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8", errors="replace") as handle:
        first = handle.readline()
    if not first.startswith(f"# {TITLE_PREFIX}"):
        raise FimloraError(
            f"{path} exists and was not written by fimlora report (it starts {first.strip()[:60]!r}); "
            "choose another directory with --out."
        )
