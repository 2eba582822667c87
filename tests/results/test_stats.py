"""Statistics against values computed by hand on small samples."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from results.fabricate import class_record, write_run, write_sweep

from fimlora.errors import FimloraError
from fimlora.results import at_chance, collect_results
from fimlora.stats import (
    bootstrap_ci,
    holm,
    paired_comparison,
    paired_t_test,
    primary_metric,
    savings,
    savings_not_compared,
    sign_flip_p_value,
    summarize,
    t_interval,
)

# --------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------


def test_ci_of_a_constant_sample_is_a_point():
    assert bootstrap_ci([0.73] * 5) == (0.73, 0.73)


def test_ci_of_two_values_spans_them():
    # Resample means of {0, 1} (n=2) are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: the 2.5% quantile
    # is 0 and the 97.5% quantile is 1.
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)


def test_ci_needs_two_values_and_is_seeded():
    assert all(math.isnan(v) for v in bootstrap_ci([0.5]))
    data = [0.71, 0.74, 0.69, 0.73, 0.75]
    assert bootstrap_ci(data, seed=3) == bootstrap_ci(data, seed=3)
    low, high = bootstrap_ci(data)
    assert min(data) <= low < np.mean(data) < high <= max(data)
    with pytest.raises(FimloraError):
        bootstrap_ci([1.0, float("nan")])


def test_ci_matches_the_normal_approximation_on_a_large_sample():
    x = np.random.default_rng(0).normal(10.0, 2.0, size=400)
    low, high = bootstrap_ci(x, n_resamples=20_000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert low == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(x.mean() + half, abs=0.1 * half)


# --------------------------------------------------------------------------------------------------
# Paired t-test
# --------------------------------------------------------------------------------------------------


def test_paired_t_with_one_degree_of_freedom_is_cauchy():
    # d = [1, 3]: mean 2, sd √2, t = 2 / (√2/√2) = 2; with 1 df, P(|T| ≥ t) = 1 − (2/π)·atan(t).
    t, p = paired_t_test([1.0, 3.0])
    assert t == pytest.approx(2.0)
    assert p == pytest.approx(1 - 2 / math.pi * math.atan(2.0))


def test_paired_t_with_two_degrees_of_freedom():
    # d = [1, 2, 4]: mean 7/3, sd √(7/3), t = √7; with 2 df, P(|T| ≥ t) = 1 − t/√(t² + 2).
    t, p = paired_t_test([1.0, 2.0, 4.0])
    assert t == pytest.approx(math.sqrt(7))
    assert p == pytest.approx(1 - math.sqrt(7) / 3)


def test_paired_t_undefined_cases():
    assert all(math.isnan(v) for v in paired_t_test([0.3]))
    assert all(math.isnan(v) for v in paired_t_test([0.0, 0.0, 0.0]))


# --------------------------------------------------------------------------------------------------
# Sign-flip permutation test
# --------------------------------------------------------------------------------------------------


def test_sign_flip_all_positive_five_seeds():
    # Only the observed pattern and its mirror reach |mean| = 3: p = 2/32.
    assert sign_flip_p_value([1.0, 2.0, 3.0, 4.0, 5.0]) == (pytest.approx(2 / 32), True)


def test_sign_flip_by_hand_enumeration():
    # d = (0.5, −0.2, 0.3): the 8 signed sums are ±0.6, ±0.0, ±1.0, ±0.4 (pairs); |sum| ≥ 0.6 for 4.
    assert sign_flip_p_value([0.5, -0.2, 0.3])[0] == pytest.approx(4 / 8)


def test_sign_flip_matches_brute_force_enumeration():
    d = np.array([0.012, -0.004, 0.009, 0.015, -0.001, 0.007])
    observed = abs(d.mean())
    hits = sum(
        abs(np.mean(np.array(signs) * d)) >= observed - 1e-15
        for signs in itertools.product((1, -1), repeat=d.size)
    )
    assert sign_flip_p_value(d) == (pytest.approx(hits / 2**d.size), True)


def test_sign_flip_monte_carlo_beyond_the_exact_limit():
    d = np.random.default_rng(1).normal(0.3, 1.0, size=18)
    exact, is_exact = sign_flip_p_value(d, max_exact=20)
    approx, approx_exact = sign_flip_p_value(d, n_resamples=50_000)
    assert is_exact and not approx_exact
    assert approx == pytest.approx(exact, abs=0.01)


def test_one_difference_gets_neither_p_value():
    # With one seed, +d and -d always tie (p = 1 whatever d is); the t-test is undefined too: the
    # report shows neither, rather than a sign-flip p next to an empty t p.
    p_flip, _ = sign_flip_p_value([0.3])
    assert math.isnan(p_flip) and all(math.isnan(v) for v in paired_t_test([0.3]))


def test_a_one_seed_comparison_reports_no_p_value(tmp_path):
    write_sweep(tmp_path, seeds=(0,), ranks=(4,))
    fim = _row(summarize(collect_results(tmp_path).frame, ["accuracy"]), "fim-lora")
    assert fim["n_paired"] == 1 and math.isnan(fim["p_ttest"]) and math.isnan(fim["p_signflip"])


def test_sign_flip_of_zero_differences_is_one():
    assert sign_flip_p_value([0.0, 0.0, 0.0]) == (1.0, True)


def test_t_interval_by_hand():
    # d = 1, 2, 3: mean 2, sd 1, t(2, 0.975) = 4.302653 → 2 ± 4.302653 / √3
    low, high = t_interval([1.0, 2.0, 3.0])
    assert (low, high) == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)), abs=1e-6)
    assert all(math.isnan(v) for v in t_interval([1.0]))
    # With 5 seeds the t-interval is wider than the percentile bootstrap's (which cannot leave the data).
    d = [0.01, 0.03, -0.02, 0.04, 0.02]
    t_low, t_high = t_interval(d)
    b_low, b_high = bootstrap_ci(d)
    assert t_low < b_low and b_high < t_high


def test_paired_comparison_is_method_minus_baseline():
    comparison = paired_comparison([0.8, 0.9, 0.85], [0.7, 0.85, 0.8])
    assert comparison.n == 3
    assert comparison.mean_diff == pytest.approx((0.1 + 0.05 + 0.05) / 3)
    assert comparison.ci_low <= comparison.mean_diff <= comparison.ci_high
    assert (comparison.t_ci_low, comparison.t_ci_high) == pytest.approx(t_interval([0.1, 0.05, 0.05]))
    assert comparison.p_signflip == pytest.approx(2 / 8) and comparison.signflip_exact
    with pytest.raises(FimloraError, match="equal lengths"):
        paired_comparison([1.0, 2.0], [1.0])


# --------------------------------------------------------------------------------------------------
# Tables over runs
# --------------------------------------------------------------------------------------------------


def _row(summary, method, budget_label="r=4", metric="accuracy"):
    rows = summary[
        (summary["method"] == method)
        & (summary["budget_label"] == budget_label)
        & (summary["metric"] == metric)
    ]
    assert len(rows) == 1
    return rows.iloc[0]


def test_summary_over_five_seeds(tmp_path):
    write_sweep(tmp_path, seeds=(0, 1, 2, 3, 4), ranks=(4,))
    frame = collect_results(tmp_path).frame
    summary = summarize(frame, ["accuracy"], n_resamples=10_000)
    lora, fim = _row(summary, "lora"), _row(summary, "fim-lora")
    # lora accuracy = 0.72 + 0.01·seed; fim-lora adds 0.01 + 0.002·(seed mod 2).
    assert lora["n_seeds"] == 5 and lora["seeds"] == "0,1,2,3,4"
    assert lora["mean"] == pytest.approx(0.74)
    assert lora["std"] == pytest.approx(np.std([0.72, 0.73, 0.74, 0.75, 0.76], ddof=1))
    assert lora["warning"] == "" and math.isnan(lora["diff_mean"])
    assert fim["n_paired"] == 5 and fim["diff_mean"] == pytest.approx(0.0108)
    assert fim["diff_ci_low"] == pytest.approx(0.010, abs=1e-9)
    assert fim["diff_ci_high"] == pytest.approx(0.0116, abs=1e-3)
    assert fim["p_signflip"] == pytest.approx(2 / 32) and fim["signflip_exact"]
    d = np.array([0.01, 0.012, 0.01, 0.012, 0.01])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(5))
    assert fim["t_stat"] == pytest.approx(t, rel=1e-6)
    assert fim["warning"] == ""
    assert primary_metric(frame) == "accuracy"


def test_fewer_than_five_seeds_and_partial_pairing_are_flagged(tmp_path):
    write_sweep(tmp_path, seeds=(0, 1, 2), ranks=(4,))
    write_run(tmp_path / "extra" / "fim-lora", method="fim-lora", seed=7, accuracy=0.9)
    summary = summarize(collect_results(tmp_path).frame, ["accuracy"])
    fim = _row(summary, "fim-lora")
    assert fim["n_seeds"] == 4 and fim["n_paired"] == 3 and fim["paired_seeds"] == "0,1,2"
    assert "only 4 seeds (< 5)" in fim["warning"] and "paired on 3 seeds (< 5)" in fim["warning"]
    assert "only 3 seeds (< 5)" in _row(summary, "lora")["warning"]


def test_missing_baseline_and_duplicate_seeds(tmp_path):
    write_sweep(tmp_path, methods=("fim-lora",), seeds=(0, 1), ranks=(4,))
    write_run(tmp_path / "again" / "fim-lora", method="fim-lora", seed=1, rank=4, accuracy=0.1)
    summary = summarize(collect_results(tmp_path).frame, ["accuracy"])
    fim = _row(summary, "fim-lora")
    assert "no lora runs to compare with" in fim["warning"]
    assert "1 duplicate seed run(s) ignored" in fim["warning"]
    assert fim["n_seeds"] == 2 and math.isnan(fim["diff_mean"])


def test_a_run_is_at_chance_when_its_mean_recall_per_class_is_1_over_k():
    assert at_chance([1.0, 0.0]) and at_chance([0.0, 1.0])  # one class for every example, either class
    assert at_chance([0.98, 0.0]) and at_chance([1.0, 0.0, 0.0])  # all but a few; three classes
    # Learned, though its accuracy (0.78) is below the majority rate (0.80) of a skewed split
    # (80/10/10): "accuracy at most the majority rate" would flag it.
    assert not at_chance([0.85, 0.5, 0.5])
    assert not at_chance([0.6, 0.45])  # mean 0.525, above 1/2 + 0.01


def test_seeds_at_chance_are_named_where_accuracy_alone_hides_them(tmp_path):
    """fim-lora's seed 2 predicts the majority class for all but one example, which it gets wrong
    (accuracy 0.51; it predicts both classes, so "never predicts a class" misses it); seed 3 predicts the
    minority class for every example (accuracy 0.48, below the majority rate 0.52, so "accuracy near the
    majority rate" misses it)."""
    learned = [[40, 8], [8, 44]]
    collapsed = {2: [[0, 48], [1, 51]], 3: [[48, 0], [52, 0]]}
    for seed in range(5):
        write_run(
            tmp_path / f"lora-s{seed}" / "lora",
            method="lora",
            seed=seed,
            accuracy=0.84,
            classes=class_record(learned, ["neg", "pos"]),
        )
        matrix = collapsed.get(seed, learned)
        accuracy = (matrix[0][0] + matrix[1][1]) / 100
        write_run(
            tmp_path / f"fim-s{seed}" / "fim-lora",
            method="fim-lora",
            seed=seed,
            accuracy=accuracy,
            classes=class_record(matrix, ["neg", "pos"]),
        )
    frame = collect_results(tmp_path).frame
    assert sorted(frame.loc[frame["at_chance"].astype(bool), "run_dir"]) == [
        "fim-s2/fim-lora",
        "fim-s3/fim-lora",
    ]
    summary = summarize(frame, ["accuracy"], n_resamples=10_000)
    assert _row(summary, "fim-lora")["warning"] == "seeds 2, 3 at chance (mean recall per class ≤ 1/K + 0.01)"
    assert _row(summary, "lora")["warning"] == ""


def test_varying_learning_rate_splits_groups_and_pairs_like_with_like(tmp_path):
    for lr, bump in ((1e-3, 0.0), (1e-2, 0.1)):
        for seed in range(3):
            for method, extra in (("lora", 0.0), ("fim-lora", 0.02)):
                write_run(
                    tmp_path / f"lr{lr}" / f"s{seed}" / method,
                    method=method,
                    seed=seed,
                    learning_rate=lr,
                    accuracy=0.6 + bump + extra + 0.01 * seed,
                )
    summary = summarize(collect_results(tmp_path).frame, ["accuracy"])
    assert "train.learning_rate" in summary.columns
    fim = summary[summary["method"] == "fim-lora"]
    assert len(fim) == 2
    assert fim["diff_mean"].tolist() == pytest.approx([0.02, 0.02])


# --------------------------------------------------------------------------------------------------
# Holm's adjustment
# --------------------------------------------------------------------------------------------------


def test_holm_by_hand():
    # Sorted: 0.005, 0.01, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → running max 0.02, 0.03,
    # 0.06, 0.06. A comparison without a p-value (NaN) is no member of the family.
    adjusted = holm([0.01, math.nan, 0.04, 0.03, 0.005])
    assert adjusted[[0, 2, 3, 4]] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(adjusted[1])
    assert holm([0.5, 0.6]).tolist() == [1.0, 1.0]  # capped at 1, and never below an earlier one
    assert holm([0.04]).tolist() == [0.04]  # a family of one needs no correction
    assert all(math.isnan(v) for v in holm([math.nan, math.nan]))
    with pytest.raises(FimloraError):
        holm([0.5, 1.5])


def test_summary_adjusts_each_tables_comparisons_together(tmp_path):
    # Two budgets × two methods against lora: each metric's table holds 4 comparisons, one family.
    write_sweep(tmp_path, seeds=(0, 1, 2, 3, 4), ranks=(2, 4), eval_losses=True)
    summary = summarize(collect_results(tmp_path).frame, ["accuracy", "eval_loss"])
    for _, table in summary.groupby("metric"):
        compared = table[table["method"] != "lora"]
        assert len(compared) == 4 and (compared["holm_family_size"] == 4).all()
        for column in ("p_ttest", "p_signflip"):
            # Differences that are all 0 have no t-test p; such a comparison counts as p = 1.
            raw = compared[column].fillna(1.0).to_numpy()
            assert compared[f"{column}_holm"].to_numpy() == pytest.approx(holm(raw))
            assert (compared[f"{column}_holm"].to_numpy() >= raw - 1e-15).all()
        assert table[table["method"] == "lora"]["p_ttest_holm"].isna().all()
    # The families are per table: not the 8 comparisons of both metrics together.
    accuracy = summary[(summary["metric"] == "accuracy") & (summary["method"] != "lora")]
    smallest = accuracy["p_ttest"].min()
    assert accuracy.loc[accuracy["p_ttest"].idxmin(), "p_ttest_holm"] == pytest.approx(min(1.0, 4 * smallest))


def test_a_budget_family_adjusts_each_budgets_comparisons_on_their_own(tmp_path):
    # The same runs as above: per budget, 2 comparisons each, adjusted among themselves only.
    write_sweep(tmp_path, seeds=(0, 1, 2, 3, 4), ranks=(2, 4), eval_losses=True)
    frame = collect_results(tmp_path).frame
    pooled = summarize(frame, ["accuracy"])
    per_budget = summarize(frame, ["accuracy"], holm_family="budget")
    assert per_budget["p_ttest"].equals(pooled["p_ttest"])  # the same comparisons, another family
    compared = per_budget[per_budget["method"] != "lora"]
    assert sorted(compared["budget_label"].unique()) == ["r=2", "r=4"]
    for _, budget in compared.groupby("budget_label"):
        assert len(budget) == 2 and (budget["holm_family_size"] == 2).all()
        for column in ("p_ttest", "p_signflip"):
            raw = budget[column].fillna(1.0).to_numpy()
            assert budget[f"{column}_holm"].to_numpy() == pytest.approx(holm(raw))
    # Pooling the budgets (the table's family) is the look-alike: 4 comparisons, larger adjustments.
    pooled_compared = pooled[pooled["method"] != "lora"]
    assert (pooled_compared["holm_family_size"] == 4).all()
    assert (pooled_compared["p_ttest_holm"].to_numpy() >= compared["p_ttest_holm"].to_numpy() - 1e-15).all()
    assert not np.allclose(pooled_compared["p_ttest_holm"], compared["p_ttest_holm"])
    with pytest.raises(FimloraError, match="Unknown Holm family 'cell'; choose one of table, budget"):
        summarize(frame, ["accuracy"], holm_family="cell")


# --------------------------------------------------------------------------------------------------
# Savings: a smaller budget against the baseline at a larger one
# --------------------------------------------------------------------------------------------------

SAVINGS_RUNS = {  # (method, rank): accuracy at seeds 0..4
    ("lora", 4): [0.80, 0.82, 0.81, 0.83, 0.84],
    ("lora", 1): [0.79, 0.80, 0.80, 0.81, 0.80],
    ("fim-lora", 1): [0.80, 0.83, 0.81, 0.84, 0.84],
    ("fim-lora", 4): [0.90, 0.90, 0.90, 0.90, 0.90],
}


def test_savings_pairs_each_smaller_budget_with_the_larger_baseline_by_seed(tmp_path):
    for (method, rank), accuracies in SAVINGS_RUNS.items():
        for seed, accuracy in enumerate(accuracies):
            # Directory names sort against the seeds for lora r4: pairing must follow the seed, not order.
            name = f"z{4 - seed}" if (method, rank) == ("lora", 4) else f"s{seed}"
            write_run(
                tmp_path / f"r{rank}" / name / method, method=method, seed=seed, rank=rank, accuracy=accuracy
            )
    table = savings(collect_results(tmp_path).frame, "accuracy", n_resamples=10_000)
    # Only smaller budgets against lora at the larger one: not fim-lora r4 (same or larger budget), not
    # anything against lora r1.
    assert sorted(
        zip(table["method"], table["budget_label"], table["baseline_budget_label"], strict=True)
    ) == [
        ("fim-lora", "r=1", "r=4"),
        ("lora", "r=1", "r=4"),
    ]
    p = []
    for method in ("fim-lora", "lora"):
        row = table[table["method"] == method].iloc[0]
        d = np.array(SAVINGS_RUNS[(method, 1)]) - np.array(SAVINGS_RUNS[("lora", 4)])
        assert row["n_paired"] == 5 and row["diff_mean"] == pytest.approx(d.mean())
        assert (row["diff_t_ci_low"], row["diff_t_ci_high"]) == pytest.approx(t_interval(d))
        assert row["p_ttest"] == pytest.approx(paired_t_test(d)[1])
        assert row["adapter_params"] < row["baseline_params"]
        p.append(row["p_ttest"])
    assert (table["holm_family_size"] == 2).all()
    assert table.set_index("method").loc[["fim-lora", "lora"], "p_ttest_holm"].to_numpy() == pytest.approx(
        holm(p)
    )


def _mark_tuned(directory, rate):
    """Make a fabricated run one of `fimlora sweep --tuned` (its learning rate chosen by the tuning)."""
    path = directory / "result.json"
    result = json.loads(path.read_text(encoding="utf-8"))
    result["hyperparameter_sources"] = {"train.learning_rate": {"value": rate, "source": "tuned"}}
    path.write_text(json.dumps(result), encoding="utf-8")


def test_savings_compares_budgets_tuned_alike_and_lists_the_pairs_it_leaves_out(tmp_path):
    # r=1 and r=4 tuned by `fimlora tune` (each method at its own rate); lora at r=8 trained at r=1's rate
    # (as a hindsight source is), its settings not tuned at that budget.
    rates = {("lora", 1): 2e-3, ("fim-lora", 1): 5e-3, ("lora", 4): 1e-3, ("lora", 8): 2e-3}
    for (method, rank), rate in rates.items():
        for seed in range(5):
            accuracy = 0.78 + 0.01 * rank + 0.002 * seed + (0.01 if method == "fim-lora" else 0.0)
            directory = tmp_path / f"{method}-r{rank}-s{seed}" / method
            write_run(directory, method=method, seed=seed, rank=rank, accuracy=accuracy, learning_rate=rate)
            if rank != 8:
                _mark_tuned(directory, rate)
    frame = collect_results(tmp_path).frame
    table = savings(frame, "accuracy", n_resamples=1_000, holm_family="budget")
    compared = zip(table["budget_label"], table["method"], table["baseline_budget_label"], strict=True)
    assert sorted(compared) == [("r=1", "fim-lora", "r=4"), ("r=1", "lora", "r=4")]
    assert (table["holm_family_size"] == 2).all()  # the pairs left out do not enter Holm's family
    left_out = savings_not_compared(frame)
    columns = ["budget_label", "method", "tuned", "baseline_budget_label"]
    assert sorted(map(tuple, left_out[columns].to_numpy())) == [
        ("r=1", "fim-lora", True, "r=8"),
        ("r=1", "lora", True, "r=8"),
        ("r=4", "lora", True, "r=8"),
    ]
    assert not left_out["baseline_tuned"].any()
    # Tuned alike at every budget (here: none tuned), every pair is compared and none left out.
    untuned = frame.assign(tuned=False)
    assert len(savings(untuned, "accuracy", n_resamples=1_000)) == 5 and savings_not_compared(untuned).empty


def test_savings_is_empty_with_one_budget(tmp_path):
    write_sweep(tmp_path, seeds=(0, 1, 2), ranks=(4,))
    assert savings(collect_results(tmp_path).frame, "accuracy").empty


def _tuned_on(root, metric, only=None):
    """Give the fabricated runs below ``root`` (those of method ``only``) a tuning record on ``metric``."""
    for path in root.rglob("result.json"):
        result = json.loads(path.read_text(encoding="utf-8"))
        if only is None or result["method"] == only:
            result["tuning"] = {"metric": metric, "validation_score": 0.5}
            path.write_text(json.dumps(result), encoding="utf-8")


def test_the_primary_metric_is_the_one_the_runs_were_tuned_on(tmp_path):
    write_sweep(tmp_path, seeds=(0, 1), ranks=(4,))
    assert primary_metric(collect_results(tmp_path).frame) == "accuracy"  # untuned: the default
    _tuned_on(tmp_path, "macro_f1")
    frame = collect_results(tmp_path).frame
    assert set(frame["tuning_metric"]) == {"macro_f1"}
    assert primary_metric(frame) == "macro_f1"
    _tuned_on(tmp_path, "accuracy", only="lora")  # runs tuned on two metrics: no single choice
    assert primary_metric(collect_results(tmp_path).frame) == "accuracy"
    _tuned_on(tmp_path, "perplexity")  # a metric these runs do not record: the default
    assert primary_metric(collect_results(tmp_path).frame) == "accuracy"


def test_a_budget_family_adjusts_each_pair_of_budgets_savings_on_their_own(tmp_path):
    rng = np.random.default_rng(0)
    for method in ("lora", "fim-lora"):
        for rank in (1, 2, 4):
            for seed in range(5):
                accuracy = 0.78 + 0.01 * rank + float(rng.normal(0, 0.01))
                write_run(
                    tmp_path / f"{method}-r{rank}-s{seed}" / method,
                    method=method,
                    seed=seed,
                    rank=rank,
                    accuracy=accuracy,
                )
    frame = collect_results(tmp_path).frame
    pooled = savings(frame, "accuracy", n_resamples=10_000)
    per_pair = savings(frame, "accuracy", n_resamples=10_000, holm_family="budget")
    assert len(pooled) == 6 and (pooled["holm_family_size"] == 6).all()
    assert per_pair["p_ttest"].to_numpy() == pytest.approx(pooled["p_ttest"].to_numpy())
    pairs = per_pair.groupby(["budget_label", "baseline_budget_label"])
    assert sorted(pairs.groups) == [("r=1", "r=2"), ("r=1", "r=4"), ("r=2", "r=4")]
    for _, rows in pairs:
        assert len(rows) == 2 and (rows["holm_family_size"] == 2).all()
        assert rows["p_ttest_holm"].to_numpy() == pytest.approx(holm(rows["p_ttest"].to_numpy()))
    assert not np.allclose(pooled["p_ttest_holm"], per_pair["p_ttest_holm"])
