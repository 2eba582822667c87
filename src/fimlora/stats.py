"""Statistics over seeds: mean ± std, bootstrap confidence intervals, paired tests against uniform LoRA.

Definitions (``values`` are one metric of one configuration, one value per seed):

* ``mean``, ``std``: sample mean and sample standard deviation (``ddof=1``; NaN for one seed).
* **Percentile bootstrap CI** (:func:`bootstrap_ci`): draw ``n_resamples`` (default 10,000) samples of
  size n with replacement from the n seed values (one vectorised ``numpy`` draw from
  ``default_rng(seed)``), take each resample's mean, and report the ``(1 − c)/2`` and ``(1 + c)/2``
  quantiles of those means (``c`` = confidence, default 0.95). Deterministic for a given ``seed``. A
  constant sample gives a point; fewer than 2 values give NaN (one seed says nothing about spread).
  With few seeds the percentile bootstrap is too narrow (it cannot see beyond the observed values).
* **Paired comparison** (:func:`paired_comparison`): on the seeds both configurations ran,
  ``d_s = method_s − baseline_s``. Reported: the mean of ``d``, its bootstrap CI (as above, over the
  ``d_s``), its **t-interval** ``mean(d) ± t_{n−1, (1+c)/2} · sd(d)/√n`` (:func:`t_interval`; the
  small-sample interval the t-test inverts: with 5 seeds it is the one to trust, the bootstrap's is
  narrower than its nominal coverage), and two two-sided p-values for "mean difference = 0":

  - the **paired t-test** (``scipy.stats.ttest_rel``): ``t = mean(d) / (sd(d) / √n)`` with n − 1
    degrees of freedom; assumes the ``d_s`` are roughly normal;
  - the **sign-flip permutation test**: under the null each ``d_s`` is as likely to be ``+|d_s|`` as
    ``−|d_s|``; p = fraction of the 2ⁿ sign patterns whose ``|mean|`` is at least the observed
    ``|mean(d)|``. Exact (full enumeration) for n ≤ ``MAX_EXACT_SIGN_FLIP`` (16); beyond that
    ``n_resamples`` random patterns, p = (1 + hits) / (1 + n_resamples). Assumption-free, but coarse:
    with n seeds the smallest possible p is 2 / 2ⁿ (5 seeds: 0.0625, so it can never reach 0.05).

* **Holm-adjusted p-values** (:func:`holm`): each p-value of a table is adjusted for the other
  comparisons of the same table, the *family*: every (budget, method, setting) against the baseline on
  one dataset, model and metric (:data:`HOLM_FAMILY`), each test separately; or, with ``holm_family
  "budget"``, those at one budget of it (:data:`HOLM_FAMILIES`), for a study that reads each budget as a
  cell of its own and fixed that before its runs. With the m finite p-values
  of a family sorted, p₍₁₎ ≤ … ≤ p₍ₘ₎, the adjusted ``p̃₍ᵢ₎ = max_{j ≤ i} min(1, (m − j + 1) · p₍ⱼ₎)``;
  rejecting where p̃ < α keeps the chance of any false finding in the family at most α, whatever the
  dependence between the comparisons (Holm 1979).

* A **warning** is attached when fewer than ``MIN_SEEDS`` (5) seeds back a mean or a comparison.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from fimlora.errors import FimloraError
from fimlora.results import METRICS

MIN_SEEDS = 5
N_RESAMPLES = 10_000
CONFIDENCE = 0.95
MAX_EXACT_SIGN_FLIP = 16
BASELINE = "lora"
#: The comparisons one Holm adjustment covers: those of one table of the report.
HOLM_FAMILY = ("dataset", "model", "metric")
#: By name (``summarize(..., holm_family=)``, ``--holm-family``): ``table``, every budget of one results
#: table; ``budget``, each budget of it on its own.
HOLM_FAMILIES = {"table": HOLM_FAMILY, "budget": (*HOLM_FAMILY, "budget")}

# Settings every method of a comparison shares: runs are only paired with a baseline that matches them.
_SHARED_PREFIXES = ("train.", "lora.", "dataset_options.")
# data_version: runs on two versions of the data (an edited file) are never pooled or paired.
_SHARED_COLUMNS = ("target_modules", "eval_split", "scaling", "lora_alpha", "tuned", "data_version")
_IGNORED_SETTINGS = ("train.eval_batch_size", "train.eval_split", "train.report_to")
# Settings of a method itself (NaN for methods that do not use them).
_METHOD_SETTINGS = (
    "fisher_estimator",
    "fisher_num_examples",
    "fisher_aggregation",
    "allocation.tau",
    "allocation.r_min",
    "allocation.r_max",
)
_METHOD_PREFIXES = ("method_options.",)
# result.json columns that repeat a config setting: tuned with it, so never a shared setting either.
_TUNED_ALIASES = {"lora.scaling": "scaling", "lora.alpha": "lora_alpha"}
_BASE_KEYS = ("dataset", "model", "budget")
#: The columns of a paired comparison (method − baseline) in :func:`summarize` and :func:`savings` rows.
COMPARISON_COLUMNS = (
    "n_paired",
    "paired_seeds",
    "diff_mean",
    "diff_ci_low",
    "diff_ci_high",
    "diff_t_ci_low",
    "diff_t_ci_high",
    "t_stat",
    "p_ttest",
    "p_ttest_holm",
    "p_signflip",
    "p_signflip_holm",
    "signflip_exact",
    "holm_family_size",
)
# The columns of a :func:`summarize` row that are values, not keys of the row's group.
SUMMARY_VALUE_COLUMNS = (
    "metric",
    "higher_is_better",
    "n_seeds",
    "seeds",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "adapter_params",
    "baseline",
    *COMPARISON_COLUMNS,
    "warning",
)


def _as_array(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(array)):
        raise FimloraError("Statistics need finite values; got NaN or inf.")
    return array


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean (see the module docstring); NaN for fewer than 2 values."""
    array = _as_array(values)
    if not 0 < confidence < 1:
        raise FimloraError(f"confidence must lie in (0, 1), got {confidence}.")
    if n_resamples < 1:
        raise FimloraError(f"n_resamples must be >= 1, got {n_resamples}.")
    n = array.size
    if n < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, n, size=(n_resamples, n))].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    # Round-off guard: the CI of a constant sample is exactly that constant.
    low, high = max(float(low), float(array.min())), min(float(high), float(array.max()))
    return low, high


def t_interval(
    values: Sequence[float] | np.ndarray, *, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """``mean ± t_{n−1,(1+c)/2} · sd / √n`` (Student's t); NaN for fewer than 2 values."""
    x = _as_array(values)
    if x.size < 2:
        return math.nan, math.nan
    half = (
        float(scipy_stats.t.ppf((1 + confidence) / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    )
    mean = float(x.mean())
    return mean - half, mean + half


def paired_t_test(diffs: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """``(t, p)`` of the two-sided one-sample t-test of mean(diffs) = 0, i.e. the paired t-test.

    NaN for fewer than 2 differences, or when all of them are 0 (0/0); equal non-zero differences give
    an infinite t and p = 0, as the formula says.
    """
    d = _as_array(diffs)
    if d.size < 2 or not np.any(d):
        return math.nan, math.nan
    with warnings.catch_warnings():  # scipy warns about precision when the differences are nearly equal
        warnings.simplefilter("ignore", RuntimeWarning)
        result = scipy_stats.ttest_rel(d, np.zeros_like(d))
    return float(result.statistic), float(result.pvalue)


def sign_flip_p_value(
    diffs: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 100_000,
    seed: int = 0,
    max_exact: int = MAX_EXACT_SIGN_FLIP,
) -> tuple[float, bool]:
    """Two-sided sign-flip permutation p-value of mean(diffs) = 0, and whether it is exact.

    Exact: all 2ⁿ sign patterns (the observed one included), p = #{|mean(s·d)| ≥ |mean(d)|} / 2ⁿ.
    For n > ``max_exact``: ``n_resamples`` random patterns, p = (1 + hits) / (1 + n_resamples).
    NaN for fewer than 2 differences: one difference and its sign flip always tie (p = 1 whatever the
    data), and the paired t-test is undefined there too, so neither test is reported.
    """
    d = _as_array(diffs)
    n = d.size
    if n < 2:
        return math.nan, True
    observed = abs(float(d.mean()))
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))
    if n <= max_exact:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        stats = np.abs(signs @ d) / n
        return float(np.mean(stats >= observed - tolerance)), True
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([1.0, -1.0]), size=(n_resamples, n))
    hits = int(np.sum(np.abs(signs @ d) / n >= observed - tolerance))
    return (1 + hits) / (1 + n_resamples), False


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (see the module docstring).

    NaN entries (comparisons without a p-value) stay NaN and are not counted in the family.
    """
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    adjusted = np.full(p.shape, math.nan)
    finite = np.flatnonzero(np.isfinite(p))
    if finite.size == 0:
        return adjusted
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise FimloraError("p-values must lie in [0, 1].")
    order = finite[np.argsort(p[finite], kind="stable")]
    m = order.size
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)  # adjusted p-values never decrease with rank
    return adjusted


@dataclass(frozen=True)
class PairedComparison:
    """``method − baseline`` on the seeds both ran; see the module docstring for each field."""

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    t_ci_low: float
    t_ci_high: float
    t_stat: float
    p_ttest: float
    p_signflip: float
    signflip_exact: bool


def paired_comparison(
    values: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> PairedComparison:
    """Compare ``values[i]`` with ``baseline[i]`` (the same seed i): mean difference, CI, two p-values."""
    a, b = _as_array(values), _as_array(baseline)
    if a.shape != b.shape:
        raise FimloraError(f"Paired values need equal lengths, got {a.size} and {b.size}.")
    d = a - b
    low, high = bootstrap_ci(d, n_resamples=n_resamples, confidence=confidence, seed=seed)
    t_low, t_high = t_interval(d, confidence=confidence)
    t_stat, p_t = paired_t_test(d)
    p_flip, exact = sign_flip_p_value(d, seed=seed)
    return PairedComparison(
        n=int(d.size),
        mean_diff=float(d.mean()) if d.size else math.nan,
        ci_low=low,
        ci_high=high,
        t_ci_low=t_low,
        t_ci_high=t_high,
        t_stat=t_stat,
        p_ttest=p_t,
        p_signflip=p_flip,
        signflip_exact=exact,
    )


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _canon(value: Any) -> Hashable:
    """NaN and None compare equal (as None); numpy scalars become Python ones."""
    if value is None:
        return None
    if isinstance(value, float | np.floating) and math.isnan(float(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value if isinstance(value, Hashable) else str(value)


def _varying(frame: pd.DataFrame, columns: Sequence[str], within: Sequence[str]) -> list[str]:
    out = []
    for column in columns:
        cells = frame.groupby(list(within), dropna=False)[column]
        if any(len({_canon(v) for v in series}) > 1 for _, series in cells):
            out.append(column)
    return out


def setting_columns(frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The shared and the method-specific settings that vary in ``frame`` and so split its groups.

    Shared settings (``train.*``, ``lora.*``, …) must match between a method and its baseline; method
    settings (Fisher estimator and size, allocation τ/r_min/r_max, ``method_options.*``, and whatever
    ``fimlora tune`` chose per method) only split a method's own groups; a baseline that varies in them
    too is matched on equal values.
    """
    tuned = tuned_columns(frame)
    # A tuned setting is the method's own by design (lora at its best rate vs fim-lora at its own).
    untouchable = {*tuned, *(_TUNED_ALIASES[c] for c in tuned if c in _TUNED_ALIASES)}
    shared = [
        c
        for c in frame.columns
        if (c.startswith(_SHARED_PREFIXES) or c in _SHARED_COLUMNS)
        and c not in _IGNORED_SETTINGS
        and c not in untouchable
    ]
    method = [c for c in _METHOD_SETTINGS if c in frame.columns]
    method += [c for c in frame.columns if c.startswith(_METHOD_PREFIXES)]
    method += [c for c in sorted(tuned) if c in frame.columns and c not in method]
    base = [k for k in _BASE_KEYS if k in frame.columns]
    return _varying(frame, shared, base), _varying(frame, method, [*base, "method"])


def tuned_columns(frame: pd.DataFrame) -> set[str]:
    """Config columns that ``fimlora tune`` chose for some run of ``frame`` (its ``tuned_params``)."""
    if "tuned_params" not in frame.columns:
        return set()
    return {key for value in frame["tuned_params"].dropna() for key in str(value).split(",") if key}


def metrics_in(frame: pd.DataFrame) -> list[str]:
    """The held-out metrics present in ``frame``, in a fixed order (primary first)."""
    return [m for m in METRICS if m in frame.columns and frame[m].notna().any()]


def primary_metric(frame: pd.DataFrame) -> str:
    """The metric the runs of ``frame`` were tuned on (``tuning_metric``) when they all name the same one,
    else ``accuracy`` for classification runs, ``perplexity`` for causal LM, else the first present."""
    present = metrics_in(frame)
    if not present:
        raise FimloraError("The runs record no held-out metric (accuracy, macro_f1, perplexity, eval_loss).")
    return tuning_metric(frame) or present[0]


def tuning_metric(frame: pd.DataFrame) -> str | None:
    """The validation metric every tuned run of ``frame`` was tuned on, if they agree on one that the runs
    record; None otherwise (no tuned run, or tuned on several)."""
    tuned = {str(m) for m in frame.get("tuning_metric", pd.Series(dtype=object)).dropna()}
    if len(tuned) == 1 and (chosen := tuned.pop()) in metrics_in(frame):
        return chosen
    return None


def _warning(n_seeds: int, n_paired: int | None, extra: list[str], min_seeds: int) -> str:
    notes = list(extra)
    if n_seeds < min_seeds:
        notes.insert(0, f"only {n_seeds} seed{'s' if n_seeds != 1 else ''} (< {min_seeds})")
    if n_paired is not None and n_paired < min_seeds and n_paired != n_seeds:
        notes.append(f"paired on {n_paired} seed{'s' if n_paired != 1 else ''} (< {min_seeds})")
    return "; ".join(notes)


def _at_chance_note(runs: pd.DataFrame) -> list[str]:
    """A note naming the seeds of ``runs`` at chance (``at_chance``: mean recall per class within 0.01
    of 1/K), which a mean ± std blends into one number with the seeds that learned."""
    if "at_chance" not in runs:
        return []
    seeds = [
        _canon(s)
        for s, flag in zip(runs["seed"], runs["at_chance"], strict=True)
        if isinstance(flag, bool | np.bool_) and flag
    ]
    if not seeds:
        return []
    listed = ", ".join(str(s) for s in seeds)
    return [f"seed{'s' if len(seeds) > 1 else ''} {listed} at chance (mean recall per class ≤ 1/K + 0.01)"]


def check_holm_family(name: str) -> None:
    """Refuse a Holm family that :data:`HOLM_FAMILIES` does not name."""
    if name not in HOLM_FAMILIES:
        raise FimloraError(f"Unknown Holm family {name!r}; choose one of {', '.join(HOLM_FAMILIES)}.")


def summarize(
    frame: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    *,
    baseline: str = BASELINE,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    min_seeds: int = MIN_SEEDS,
    holm_family: str = "table",
) -> pd.DataFrame:
    """One row per (dataset, model, budget, [varying settings], method, metric) over seeds.

    Columns: the group keys, ``budget_label``, ``task``, ``metric``, ``higher_is_better``, ``n_seeds``,
    ``seeds``, ``mean``, ``std``, ``ci_low``, ``ci_high`` (bootstrap CI of the mean), ``adapter_params``
    (mean over seeds), ``baseline``, ``n_paired``, ``paired_seeds``, ``diff_mean``, ``diff_ci_low``,
    ``diff_ci_high`` (method − baseline; bootstrap), ``diff_t_ci_low``, ``diff_t_ci_high``
    (t-interval), ``t_stat``, ``p_ttest``, ``p_signflip`` and their Holm adjustments ``p_ttest_holm``,
    ``p_signflip_holm`` over the comparisons of the row's family, :data:`HOLM_FAMILIES` ``[holm_family]``
    (``holm_family_size`` of them: those on at least 2 paired seeds), ``signflip_exact``, ``warning``
    (empty when none).
    Duplicate seeds within a group keep the first run (by ``run_dir``) and say so in ``warning``.
    """
    check_holm_family(holm_family)
    if frame.empty:
        raise FimloraError("No runs to summarise.")
    metrics = list(metrics) if metrics is not None else metrics_in(frame)
    missing = [m for m in metrics if m not in frame.columns]
    if missing:
        raise FimloraError(f"Unknown metric(s) {missing}; the runs record {metrics_in(frame)}.")
    pair_keys, group_keys, method_settings, groups = _groups(frame)
    rows: list[dict[str, Any]] = []
    n_pair = len(pair_keys)
    for key, sub in groups.items():
        method = key[n_pair]
        duplicates = sub["seed"].duplicated(keep="first")
        dedup = sub[~duplicates]
        notes = [f"{int(duplicates.sum())} duplicate seed run(s) ignored"] if duplicates.any() else []
        notes += _at_chance_note(dedup)
        base_rows, base_note = _baseline_rows(groups, key, n_pair, baseline, method_settings)
        for metric in metrics:
            values = dedup[["seed", metric]].dropna()
            if values.empty:
                continue
            seeds = [_canon(s) for s in values["seed"]]
            x = values[metric].to_numpy(dtype=np.float64)
            low, high = bootstrap_ci(x, n_resamples=n_resamples, confidence=confidence, seed=seed)
            row: dict[str, Any] = dict(zip(group_keys, key, strict=True))
            row.update(
                {
                    "budget_label": sub["budget_label"].iloc[0] if "budget_label" in sub else None,
                    "task": sub["task"].iloc[0] if "task" in sub else None,
                    "metric": metric,
                    "higher_is_better": METRICS.get(metric, True),
                    "n_seeds": len(x),
                    "seeds": ",".join(str(s) for s in seeds),
                    "mean": float(x.mean()),
                    "std": float(x.std(ddof=1)) if len(x) > 1 else math.nan,
                    "ci_low": low,
                    "ci_high": high,
                    "adapter_params": float(dedup["adapter_params"].mean())
                    if "adapter_params" in dedup
                    else math.nan,
                    "baseline": baseline if method != baseline else None,
                }
            )
            n_paired: int | None = None
            extra = list(notes)
            if method != baseline:
                comparison, paired_seeds, note = _compare(
                    values, base_rows, metric, n_resamples=n_resamples, confidence=confidence, seed=seed
                )
                if base_note or note:
                    extra.append(base_note or note)
                if comparison is not None:
                    n_paired = comparison.n
                    row.update(_comparison_row(comparison, paired_seeds))
            row["warning"] = _warning(len(x), n_paired, extra, min_seeds)
            rows.append(row)
    columns = [*group_keys, "budget_label", "task", *SUMMARY_VALUE_COLUMNS]
    table = _with_holm(pd.DataFrame(rows).reindex(columns=columns), HOLM_FAMILIES[holm_family])
    order = table["method"].map(lambda m: (m != baseline, str(m)))
    table = table.assign(_order=order).sort_values(
        [*pair_keys, "_order", *method_settings, "metric"], kind="stable", na_position="first"
    )
    return table.drop(columns="_order").reset_index(drop=True)


def _groups(
    frame: pd.DataFrame,
) -> tuple[list[str], list[str], list[str], dict[tuple[Hashable, ...], pd.DataFrame]]:
    """The runs of ``frame`` by (dataset, model, budget, shared settings, method, method settings):
    ``(pairing keys, group keys, method settings, {group key: runs})``, runs in ``run_dir`` order."""
    shared, method_settings = setting_columns(frame)
    pair_keys = [*_BASE_KEYS, *shared]
    group_keys = [*pair_keys, "method", *method_settings]
    frame = frame.sort_values(["run_dir"] if "run_dir" in frame.columns else [], kind="stable")
    groups: dict[tuple[Hashable, ...], pd.DataFrame] = {}
    for _, sub in frame.groupby(group_keys, dropna=False, sort=False):
        groups[tuple(_canon(sub.iloc[0][k]) for k in group_keys)] = sub
    return pair_keys, group_keys, method_settings, groups


#: The columns of a :func:`savings` row after its group keys.
SAVINGS_VALUE_COLUMNS = (
    "budget_label",
    "metric",
    "adapter_params",
    "baseline",
    "baseline_budget_label",
    "baseline_params",
    *COMPARISON_COLUMNS,
)


def _budget_pairs(
    frame: pd.DataFrame, baseline: str
) -> Iterator[tuple[tuple[Hashable, ...], pd.DataFrame, pd.DataFrame, bool]]:
    """Every group of ``frame`` with each ``baseline`` group of the same dataset, model and shared settings
    at a budget that trains more adapter parameters: ``(group key, its runs, the baseline's runs, whether
    both were tuned alike)``. Alike: ``fimlora tune`` chose the settings of all runs on both sides, or of
    none; a smaller budget tuned against a larger one that was not (or the reverse) differs in settings as
    well as in budget."""
    pair_keys, _, _, groups = _groups(frame)
    budget_at, n_pair = pair_keys.index("budget"), len(pair_keys)

    def tuning(runs: pd.DataFrame) -> frozenset[bool]:
        return frozenset(bool(v) for v in runs["tuned"]) if "tuned" in runs else frozenset()

    for key, sub in groups.items():
        for k, runs in groups.items():
            if (
                k[n_pair] == baseline
                and k[budget_at] != key[budget_at]
                and all(k[i] == key[i] for i in range(n_pair) if i != budget_at)
                and _adapter_params(runs) > _adapter_params(sub)
            ):
                yield key, sub, runs, tuning(runs) == tuning(sub)


def _adapter_params(runs: pd.DataFrame) -> float:
    return float(runs["adapter_params"].mean()) if "adapter_params" in runs else math.nan


def savings(
    frame: pd.DataFrame,
    metric: str,
    *,
    baseline: str = BASELINE,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    holm_family: str = "table",
) -> pd.DataFrame:
    """Does a smaller budget reach the baseline at a larger one? Every method at a budget against the
    ``baseline`` at each budget of the same dataset, model and shared settings that trains more adapter
    parameters and was tuned alike (both by ``fimlora tune``, or neither: :func:`savings_not_compared`
    lists the rest), paired by seed (``method − baseline``): the columns of :func:`summarize`'s comparison
    (``diff_*``, ``p_*``) plus ``baseline_budget_label`` and ``baseline_params``. Holm's adjustment
    runs over each (dataset, model, metric)'s rows, a family of its own (these are not the results
    table's comparisons); with ``holm_family`` ``budget``, over each pair of budgets' rows (a method's
    budget and the baseline's). Empty when no dataset has the baseline at two budgets, or ``metric`` is
    absent.
    """
    check_holm_family(holm_family)
    if metric not in frame.columns:
        return pd.DataFrame(columns=list(SAVINGS_VALUE_COLUMNS))
    _, group_keys, _, _ = _groups(frame)
    rows: list[dict[str, Any]] = []
    for key, sub, base_runs, alike in _budget_pairs(frame, baseline):
        values = sub.drop_duplicates("seed", keep="first")[["seed", metric]].dropna()
        if values.empty or not alike:
            continue
        comparison, paired_seeds, _ = _compare(
            values, base_runs, metric, n_resamples=n_resamples, confidence=confidence, seed=seed
        )
        if comparison is None:
            continue
        row: dict[str, Any] = dict(zip(group_keys, key, strict=True))
        row.update(
            {
                "budget_label": _label(sub),
                "metric": metric,
                "adapter_params": _adapter_params(sub),
                "baseline": baseline,
                "baseline_budget_label": _label(base_runs),
                "baseline_params": _adapter_params(base_runs),
                **_comparison_row(comparison, paired_seeds),
            }
        )
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=[*group_keys, *SAVINGS_VALUE_COLUMNS])
    pair = ("budget", "baseline_budget_label") if holm_family == "budget" else ()
    table = _with_holm(pd.DataFrame(rows), (*HOLM_FAMILY, *pair))
    table = table.sort_values(
        ["dataset", "model", "baseline_params", "adapter_params", "method"], kind="stable"
    )
    return table.reindex(columns=[*group_keys, *SAVINGS_VALUE_COLUMNS]).reset_index(drop=True)


#: The columns of :func:`savings_not_compared`.
NOT_COMPARED_COLUMNS = (
    "dataset",
    "model",
    "budget_label",
    "method",
    "tuned",
    "baseline_budget_label",
    "baseline_tuned",
)


def savings_not_compared(frame: pd.DataFrame, *, baseline: str = BASELINE) -> pd.DataFrame:
    """The pairs :func:`savings` leaves out because one side's settings were chosen by ``fimlora tune`` and
    the other's were not (e.g. a hindsight source trained at another budget's tuned rate): columns
    ``dataset``, ``model``, ``budget_label``, ``method``, ``tuned``, ``baseline_budget_label`` and
    ``baseline_tuned`` (True: every run tuned; False: none; None: some), one row per pair."""
    rows = []
    for _, sub, base_runs, alike in _budget_pairs(frame, baseline):
        if alike:
            continue
        rows.append(
            {
                "dataset": sub["dataset"].iloc[0] if "dataset" in sub else None,
                "model": sub["model"].iloc[0] if "model" in sub else None,
                "budget_label": _label(sub),
                "method": sub["method"].iloc[0],
                "tuned": _all_or_none(sub["tuned"]),
                "baseline_budget_label": _label(base_runs),
                "baseline_tuned": _all_or_none(base_runs["tuned"]),
            }
        )
    return pd.DataFrame(rows, columns=list(NOT_COMPARED_COLUMNS))


def _label(runs: pd.DataFrame) -> Any:
    return runs["budget_label"].iloc[0] if "budget_label" in runs else None


def _all_or_none(flags: pd.Series) -> bool | None:
    values = {bool(v) for v in flags}
    return values.pop() if len(values) == 1 else None


def _with_holm(table: pd.DataFrame, family_keys: Sequence[str] = HOLM_FAMILY) -> pd.DataFrame:
    """``table`` with the Holm-adjusted p-values of each family: its rows that share ``family_keys``.

    A family's members are its comparisons on at least 2 paired seeds (those with a sign-flip p); one
    whose differences are all 0 has no t-test p, and enters the t-test's family as p = 1.
    """
    table = table.copy()
    table["p_ttest_holm"] = math.nan
    table["p_signflip_holm"] = math.nan
    table["holm_family_size"] = 0
    for _, family in table.groupby(list(family_keys), dropna=False, sort=False):
        flip = pd.to_numeric(family["p_signflip"], errors="coerce").to_numpy(dtype=np.float64)
        members = np.isfinite(flip)
        t = pd.to_numeric(family["p_ttest"], errors="coerce").to_numpy(dtype=np.float64)
        t = np.where(members & ~np.isfinite(t), 1.0, t)
        table.loc[family.index, "p_ttest_holm"] = holm(np.where(members, t, math.nan))
        table.loc[family.index, "p_signflip_holm"] = holm(flip)
        table.loc[family.index, "holm_family_size"] = int(members.sum())
    return table


def _baseline_rows(
    groups: dict[tuple[Hashable, ...], pd.DataFrame],
    key: tuple[Hashable, ...],
    n_pair: int,
    baseline: str,
    method_settings: Sequence[str],
) -> tuple[pd.DataFrame | None, str]:
    """The baseline's runs for the group ``key``: same pairing keys; method settings break ties."""
    candidates = [
        (k, sub) for k, sub in groups.items() if k[:n_pair] == key[:n_pair] and k[n_pair] == baseline
    ]
    if not candidates:
        return None, f"no {baseline} runs to compare with"
    if len(candidates) > 1:
        same = [(k, sub) for k, sub in candidates if k[n_pair + 1 :] == key[n_pair + 1 :]]
        if len(same) != 1:
            return None, f"several {baseline} configurations match ({', '.join(method_settings)} differ)"
        candidates = same
    return candidates[0][1], ""


def _comparison_row(comparison: PairedComparison, paired_seeds: Sequence[Hashable]) -> dict[str, Any]:
    """A comparison's columns of a table row (the Holm adjustments come later, per family)."""
    return {
        "n_paired": comparison.n,
        "paired_seeds": ",".join(str(s) for s in paired_seeds),
        "diff_mean": comparison.mean_diff,
        "diff_ci_low": comparison.ci_low,
        "diff_ci_high": comparison.ci_high,
        "diff_t_ci_low": comparison.t_ci_low,
        "diff_t_ci_high": comparison.t_ci_high,
        "t_stat": comparison.t_stat,
        "p_ttest": comparison.p_ttest,
        "p_signflip": comparison.p_signflip,
        "signflip_exact": comparison.signflip_exact,
    }


def _compare(
    values: pd.DataFrame,
    base_rows: pd.DataFrame | None,
    metric: str,
    **kwargs: Any,
) -> tuple[PairedComparison | None, list[Hashable], str]:
    if base_rows is None:
        return None, [], ""
    base = base_rows.drop_duplicates("seed", keep="first")[["seed", metric]].dropna()
    merged = values.merge(base, on="seed", suffixes=("", "_baseline"))
    if merged.empty:
        return None, [], "no seeds shared with the baseline"
    comparison = paired_comparison(
        merged[metric].to_numpy(dtype=np.float64),
        merged[f"{metric}_baseline"].to_numpy(dtype=np.float64),
        **kwargs,
    )
    return comparison, [_canon(s) for s in merged["seed"]], ""


def comparison_lines(summary: pd.DataFrame, metric: str) -> list[str]:
    """One line per paired comparison of ``metric`` in a :func:`summarize` table, with its raw and
    Holm-adjusted p-values: ``movie-reviews / minilm / r=4 / fim-lora − lora: accuracy Δ −0.0050, …``."""
    lines = []
    rows = summary[(summary["metric"] == metric) & summary["diff_mean"].notna()]
    for _, r in rows.iterrows():
        p = ", ".join(
            f"p ({name}) {_p_text(r[column])} (Holm {_p_text(r[f'{column}_holm'])})"
            for name, column in (("paired t", "p_ttest"), ("sign-flip", "p_signflip"))
        )
        lines.append(
            f"{r['dataset']} / {r['model']} / {r['budget_label']} / {r['method']} − {r['baseline']}: "
            f"{metric} Δ {float(r['diff_mean']):+.4f} on {int(r['n_paired'])} seed(s), {p}"
            + (f"; {r['warning']}" if isinstance(r["warning"], str) and r["warning"] else "")
        )
    return lines


def _p_text(p: Any) -> str:
    try:
        value = float(p)
    except (TypeError, ValueError):
        return "—"
    if not math.isfinite(value):
        return "—"
    return "<0.001" if value < 0.001 else f"{value:.3f}"
