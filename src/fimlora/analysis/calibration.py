"""How many calibration examples does the Fisher ranking need? Stability across disjoint subsets.

For each calibration size s, ``repeats`` mutually **disjoint** subsets of s training examples are drawn
(one seeded permutation of the training split, cut into consecutive blocks: subset i of size s is
``perm[i·s : (i+1)·s]``; so ``s · repeats`` must not exceed the training split). The Fisher of the
frozen target weights is estimated on each subset, reduced to one score per module
(``FisherResult.scores``: ``"mean"`` = Σ F / numel, ``"trace"`` = Σ F), and every pair of subsets of the
same size is compared:

* **Kendall τ** (``scipy.stats.kendalltau``, τ-b, ties handled) between the two per-module score vectors:
  1 = identical ranking, 0 = unrelated, −1 = reversed;
* **Spearman ρ** between them (rank correlation, a second view);
* **top-k overlap**: |top-k(a) ∩ top-k(b)| / k, the share of the k highest-scored modules that both
  subsets agree on (ties broken by module name). k defaults to a quarter of the modules.

With ``estimators=("empirical", "mc")`` the Monte-Carlo Fisher (labels sampled from the model, seeded)
is also estimated on each subset, pairs are compared for it too, and on each subset the empirical and
MC scores are compared with the same three numbers (``comparison = "empirical-vs-mc"``).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from fimlora.errors import FimloraError
from fimlora.io import read_json_of_kind, write_json_and_records

KIND = "fimlora-calibration-stability"
JSON_FILE = "calibration.json"
CSV_FILE = "calibration.csv"
SUBSETS = "subsets"
EMPIRICAL_VS_MC = "empirical-vs-mc"


# --------------------------------------------------------------------------------------------------
# Agreement between two score vectors
# --------------------------------------------------------------------------------------------------


def _common(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[list[str], np.ndarray, np.ndarray]:
    names = sorted(set(a) & set(b))
    if len(names) != len(a) or len(names) != len(b):
        raise FimloraError("The two score vectors name different modules; compare scores of the same model.")
    return names, np.array([a[n] for n in names], float), np.array([b[n] for n in names], float)


def kendall_tau(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Kendall τ-b between two per-module score vectors (same module names); NaN if one is constant."""
    _, x, y = _common(a, b)
    if len(x) < 2:
        return math.nan
    return float(scipy_stats.kendalltau(x, y).statistic)


def spearman_rho(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Spearman ρ between two per-module score vectors; NaN if one is constant."""
    _, x, y = _common(a, b)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(scipy_stats.spearmanr(x, y).statistic)


def top_k(scores: Mapping[str, float], k: int) -> list[str]:
    """The ``k`` highest-scored module names (ties broken by name, so the result is deterministic)."""
    return [n for n, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def top_k_overlap(a: Mapping[str, float], b: Mapping[str, float], k: int) -> float:
    """|top-k(a) ∩ top-k(b)| / k, in [0, 1]."""
    names, _, _ = _common(a, b)
    if not 1 <= k <= len(names):
        raise FimloraError(f"top-k needs 1 <= k <= {len(names)} (the number of modules), got k={k}.")
    return len(set(top_k(a, k)) & set(top_k(b, k))) / k


def default_k(num_modules: int) -> int:
    """A quarter of the modules (at least one)."""
    return max(1, round(num_modules / 4))


def agreement(a: Mapping[str, float], b: Mapping[str, float], k: int) -> dict[str, float]:
    """``kendall_tau``, ``spearman`` and ``top_k_overlap`` of two score vectors."""
    return {
        "kendall_tau": kendall_tau(a, b),
        "spearman": spearman_rho(a, b),
        "top_k_overlap": top_k_overlap(a, b, k),
    }


# --------------------------------------------------------------------------------------------------
# Disjoint subsets and the comparison records
# --------------------------------------------------------------------------------------------------


def disjoint_subsets(num_available: int, size: int, count: int, *, seed: int = 0) -> list[np.ndarray]:
    """``count`` mutually disjoint sets of ``size`` indices into ``range(num_available)`` (each sorted).

    One permutation from ``numpy.random.default_rng(seed)``, cut into consecutive blocks.
    """
    if size < 1 or count < 1:
        raise FimloraError(f"Subsets need size >= 1 and count >= 1, got size={size}, count={count}.")
    if size * count > num_available:
        raise FimloraError(
            f"{count} disjoint subsets of {size} examples need {size * count}, but the training split has "
            f"only {num_available}; use smaller --sizes or fewer --repeats."
        )
    order = np.random.default_rng(seed).permutation(num_available)
    return [np.sort(order[i * size : (i + 1) * size]) for i in range(count)]


@dataclass
class SubsetScores:
    """Per-module scores of the Fisher estimated on one calibration subset."""

    size: int
    subset: int
    estimator: str
    scores: dict[str, dict[str, float]]  # aggregation -> module -> score


def compare_subsets(entries: Sequence[SubsetScores], *, k: int | None = None) -> list[dict[str, Any]]:
    """One record per comparison: every pair of subsets of the same size, estimator and aggregation,
    and, where both estimators were run on a subset, empirical vs MC on that subset."""
    records: list[dict[str, Any]] = []
    by_key: dict[tuple[int, str], list[SubsetScores]] = {}
    for entry in entries:
        by_key.setdefault((entry.size, entry.estimator), []).append(entry)
    for (size, estimator), group in sorted(by_key.items()):
        group = sorted(group, key=lambda e: e.subset)
        for first, second in itertools.combinations(group, 2):
            for aggregation in sorted(first.scores):
                a, b = first.scores[aggregation], second.scores[aggregation]
                kk = k or default_k(len(a))
                records.append(
                    {
                        "size": size,
                        "comparison": SUBSETS,
                        "estimator": estimator,
                        "aggregation": aggregation,
                        "a": first.subset,
                        "b": second.subset,
                        "k": kk,
                        **agreement(a, b, kk),
                    }
                )
    pairs = {(e.size, e.subset, e.estimator): e for e in entries}
    for (size, subset, estimator), entry in sorted(pairs.items()):
        mc = pairs.get((size, subset, "mc"))
        if estimator != "empirical" or mc is None:
            continue
        for aggregation in sorted(entry.scores):
            a, b = entry.scores[aggregation], mc.scores[aggregation]
            kk = k or default_k(len(a))
            records.append(
                {
                    "size": size,
                    "comparison": EMPIRICAL_VS_MC,
                    "estimator": "empirical|mc",
                    "aggregation": aggregation,
                    "a": subset,
                    "b": subset,
                    "k": kk,
                    **agreement(a, b, kk),
                }
            )
    return records


def summarize_records(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Mean, min and max of each agreement number per (comparison, estimator, aggregation, size)."""
    frame = pd.DataFrame(list(records))
    if frame.empty:
        return frame
    keys = ["comparison", "estimator", "aggregation", "size"]
    grouped = frame.groupby(keys, sort=True)
    out = grouped.size().rename("n_pairs").to_frame()
    for column in ("kendall_tau", "spearman", "top_k_overlap"):
        out[f"{column}_mean"] = grouped[column].mean()
        out[f"{column}_min"] = grouped[column].min()
        out[f"{column}_max"] = grouped[column].max()
    out["k"] = grouped["k"].first()
    return out.reset_index()


# --------------------------------------------------------------------------------------------------
# Running it on an experiment config
# --------------------------------------------------------------------------------------------------


@dataclass
class CalibrationStability:
    """Records of :func:`compare_subsets` plus what produced them; written as JSON (all) and CSV (records)."""

    info: dict[str, Any]
    records: list[dict[str, Any]]
    subset_scores: list[SubsetScores] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        return summarize_records(self.records)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            **self.info,
            "records": self.records,
            "summary": self.summary().to_dict(orient="records"),
            "scores": [
                {"size": e.size, "subset": e.subset, "estimator": e.estimator, "scores": e.scores}
                for e in self.subset_scores
            ],
        }

    def write(self, out: str | Path) -> dict[str, Path]:
        """``calibration.json`` (everything) and ``calibration.csv`` (one row per comparison), atomically."""
        return write_json_and_records(out, JSON_FILE, self.to_json(), CSV_FILE, self.records)


def load_calibration(path: str | Path) -> CalibrationStability | None:
    """Read a ``calibration.json`` written by :meth:`CalibrationStability.write`; None if it is not one."""
    data = read_json_of_kind(path, KIND)
    if data is None:
        return None
    info = {k: v for k, v in data.items() if k not in {"kind", "records", "summary", "scores"}}
    return CalibrationStability(info=info, records=list(data.get("records", [])))


def calibration_stability(
    prepared: Any,
    sizes: Sequence[int],
    repeats: int,
    *,
    estimators: Sequence[str] = ("empirical", "mc"),
    k: int | None = None,
    seed: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> CalibrationStability:
    """Estimate the Fisher on ``repeats`` disjoint training subsets of each size and compare rankings.

    ``prepared`` is :func:`fimlora.experiment.prepare`'s result (model, tokenized data, collator,
    targets). Costs ``len(estimators) · repeats · Σ sizes`` per-example Fisher passes.
    """
    from torch.utils.data import DataLoader

    from fimlora.fisher import AGGREGATIONS, estimate_fisher

    if repeats < 2:
        raise FimloraError(f"Stability needs at least 2 disjoint subsets per size, got --repeats {repeats}.")
    sizes = sorted({int(s) for s in sizes})
    if not sizes or sizes[0] < 1:
        raise FimloraError(f"Calibration sizes must be positive integers, got {list(sizes)}.")
    bad = [e for e in estimators if e not in ("empirical", "mc")]
    if bad or not estimators:
        raise FimloraError(f"Unknown estimator(s) {bad}; use empirical and/or mc.")
    config = prepared.config
    seed = config.seed if seed is None else seed
    train = prepared.tokenized["train"]
    subsets = {size: disjoint_subsets(len(train), size, repeats, seed=seed) for size in sizes}
    entries: list[SubsetScores] = []
    timings: dict[str, float] = {}
    for size in sizes:
        started = time.perf_counter()
        for index, rows in enumerate(subsets[size]):
            loader = DataLoader(
                train.select(rows.tolist()), batch_size=config.fisher.batch_size, collate_fn=prepared.collator
            )
            for estimator in estimators:
                result = estimate_fisher(
                    prepared.loaded.model,
                    loader,
                    target_modules=prepared.targets,
                    estimator=estimator,
                    seed=seed,
                    progress=progress,
                )
                scores = {agg: result.scores(agg) for agg in AGGREGATIONS}
                entries.append(SubsetScores(size, index, estimator, scores))
        timings[str(size)] = round(time.perf_counter() - started, 3)
        log(
            f"calibration size {size}: {repeats} disjoint subsets × {len(estimators)} estimator(s), "
            f"{timings[str(size)]:.1f} s"
        )
    info = {
        "model": config.model,
        "dataset": config.dataset_label,
        "seed": seed,
        "sizes": sizes,
        "repeats": repeats,
        "estimators": list(estimators),
        "aggregation": config.fisher.aggregation,
        "num_modules": len(prepared.targets),
        "num_train_examples": len(train),
        "k": k or default_k(len(prepared.targets)),
        "seconds_per_size": timings,
    }
    return CalibrationStability(info=info, records=compare_subsets(entries, k=k), subset_scores=entries)
