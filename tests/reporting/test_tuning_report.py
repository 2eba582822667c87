"""The report on tuned runs: the tuning budget next to the results, learning-rate sensitivity plots from
the trials, a flag for unequal tuning effort, and methods at their own tuned rates still paired."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from results.fabricate import write_run

from fimlora.reporting import build_report

RATES = {"lora": 0.002, "fim-lora": 0.005}


def tuned_runs(root: Path, trials: dict[str, tuple[int, int, int]], *, tuned: bool = True) -> None:
    """lora and fim-lora × 5 seeds, each method at its own learning rate; ``tuned``: as written by
    ``fimlora sweep --tuned`` (result.json carries the sources and the tuning record)."""
    for seed in range(5):
        for method, rate in RATES.items():
            accuracy = 0.7 + 0.01 * seed + (0.02 if method == "fim-lora" else 0.0)
            directory = root / f"{method}-s{seed}" / method
            write_run(directory, method=method, seed=seed, accuracy=accuracy, learning_rate=rate)
            if not tuned:
                continue
            result = json.loads((directory / "result.json").read_text())
            complete, pruned, failed = trials[method]
            result["hyperparameter_sources"] = {
                "train.learning_rate": {"value": rate, "source": "tuned"},
                "train.steps": {"value": 20, "source": "spec"},
            }
            result["tuning"] = {
                "file": str(root / "tuned.yaml"),
                "metric": "accuracy",
                "validation_score": 0.75,
                "params": {"train.learning_rate": rate},
                "trials": {"complete": complete, "pruned": pruned, "failed": failed},
                "trials_per_study": 4,
                "seed": 0,
            }
            (directory / "result.json").write_text(json.dumps(result), encoding="utf-8")


def trials_csv(root: Path) -> None:
    rows = []
    for method, best in RATES.items():
        for number, (rate, value, state) in enumerate(
            [
                (best / 4, 0.70, "complete"),
                (best, 0.75, "complete"),
                (best * 4, 0.6, "pruned"),
                (0.5, None, "failed"),
            ]
        ):
            rows.append(
                {
                    "model": "tiny-bert",
                    "dataset": "reviews",
                    "method": method,
                    "budget": "r4",
                    "study": f"{method}-r4-0123456789",
                    "number": number,
                    "state": state,
                    "metric": "accuracy",
                    "value": value,
                    "step": 10 if state == "pruned" else None,
                    "failure": "FimloraError: diverged" if state == "failed" else None,
                    "duration_s": 1.0,
                    "param.train.learning_rate": rate,
                }
            )
    pd.DataFrame(rows).to_csv(root / "tuning-trials.csv", index=False)


def test_the_report_shows_the_tuning_behind_tuned_results(tmp_path):
    tuned_runs(tmp_path, {"lora": (3, 1, 0), "fim-lora": (3, 1, 0)})
    trials_csv(tmp_path)
    files = build_report(tmp_path, n_resamples=10_000)
    report = files.markdown.read_text()
    section = report.split("### Tuning budget", 1)[1].split("###", 1)[0]
    assert "| r=4 | lora | 4 | 3 | 1 | 0 | 0 | accuracy 0.7500 | learning_rate=0.002 |" in section
    assert "| r=4 | fim-lora | 4 | 3 | 1 | 0 | 0 | accuracy 0.7500 | learning_rate=0.005 |" in section
    assert "Unequal tuning effort" not in report and "unequal numbers" not in report
    assert "### Learning-rate sensitivity (validation split)" in report
    assert (files.markdown.parent / "report_files" / "sensitivity-reviews-tiny-bert-r4.png").is_file()
    # Each method ran at its own tuned rate, and fim-lora is still compared with lora seed by seed.
    summary = pd.read_csv(files.summary_csv)
    row = summary[(summary["method"] == "fim-lora") & (summary["metric"] == "accuracy")].iloc[0]
    assert row["n_paired"] == 5 and abs(row["diff_mean"] - 0.02) < 1e-9


def test_unequal_tuning_effort_is_flagged(tmp_path):
    tuned_runs(tmp_path, {"lora": (4, 0, 0), "fim-lora": (2, 0, 0)})
    report = build_report(tmp_path, n_resamples=10_000).markdown.read_text()
    assert "Unequal tuning effort at budget r=4" in report and "lora 4, fim-lora 2" in report
    other = tmp_path / "pruned"
    tuned_runs(other, {"lora": (4, 0, 0), "fim-lora": (2, 2, 0)})
    report = build_report(other, n_resamples=10_000).markdown.read_text()
    assert "Unequal tuning effort" not in report
    assert "completed unequal numbers of their trials (lora 4, fim-lora 2 of 4" in report


def test_untuned_runs_at_different_rates_are_not_paired(tmp_path):
    # The same runs without a tuning record: a different learning rate is a different setting, and no
    # lora run shares fim-lora's. Only tuning makes the rate a method's own.
    tuned_runs(tmp_path, {}, tuned=False)
    files = build_report(tmp_path, n_resamples=10_000)
    summary = pd.read_csv(files.summary_csv)
    row = summary[(summary["method"] == "fim-lora") & (summary["metric"] == "accuracy")].iloc[0]
    assert pd.isna(row["n_paired"])
    assert "### Tuning budget" not in files.markdown.read_text()


def test_the_per_seed_scores_of_the_chosen_setting_and_lost_trials_are_shown(tmp_path):
    tuned_runs(tmp_path, {"lora": (3, 1, 0), "fim-lora": (3, 1, 0)})
    for path in tmp_path.glob("lora-s*/lora/result.json"):  # lora tuned at two seeds, one trial lost
        result = json.loads(path.read_text())
        result["tuning"].update(
            {
                "validation_score": 0.51,
                "seed_scores": {"0": 0.77, "1": 0.51},
                "seed_spread": 0.26,
                "aggregate": "worst",
                "seeds": [0, 1],
            }
        )
        result["tuning"]["trials"]["lost"] = 1
        path.write_text(json.dumps(result), encoding="utf-8")
    trials_csv(tmp_path)
    table = pd.read_csv(tmp_path / "tuning-trials.csv")
    lost = table.iloc[[0]].assign(state="lost", value=None, number=9)
    pd.concat([table, lost]).to_csv(tmp_path / "tuning-trials.csv", index=False)
    report = build_report(tmp_path, n_resamples=10_000).markdown.read_text()
    row = (
        "| r=4 | lora | 4 | 3 | 1 | 0 | 1 | "
        "accuracy 0.5100 (worst of seed 0 0.7700, seed 1 0.5100; spread 0.2600) |"
    )
    assert row in report
    assert "Not shown: 1 trial(s) lost with their process and retried" in report


def test_a_setting_chosen_by_a_probe_says_so(tmp_path):
    tuned_runs(tmp_path, {"lora": (5, 1, 0), "fim-lora": (5, 1, 0)})
    probes = [{"train.learning_rate": 0.002}, {"train.learning_rate": 0.004}]
    for path in tmp_path.glob("*/*/result.json"):
        result = json.loads(path.read_text())
        result["tuning"].update({"probes": probes, "trials_per_study": 6})
        path.write_text(json.dumps(result), encoding="utf-8")
    report = build_report(tmp_path, n_resamples=10_000).markdown.read_text()
    section = report.split("### Tuning budget", 1)[1].split("###", 1)[0]
    # lora's tuned rate is the first probe; fim-lora's (0.005) is none of them.
    assert "| r=4 | lora | 6 | 5 | 1 | 0 | 0 | accuracy 0.7500 | learning_rate=0.002 (a probe) |" in section
    assert "| r=4 | fim-lora | 6 | 5 | 1 | 0 | 0 | accuracy 0.7500 | learning_rate=0.005 |" in section
    caption = "the last 2 trials of every study tried fixed points (tune.probes: learning_rate=0.002; "
    assert caption in section


def test_an_untuned_larger_budget_is_left_out_of_the_savings_and_marked_in_the_pareto_plots(tmp_path):
    # Tuned lora and fim-lora at r=4; lora at r=8 trained at lora's r=4 rate, its settings never tuned
    # there (what a hindsight source is).
    tuned_runs(tmp_path, {"lora": (3, 1, 0), "fim-lora": (3, 1, 0)})
    for seed in range(5):
        write_run(
            tmp_path / f"lora-r8-s{seed}" / "lora",
            method="lora",
            seed=seed,
            rank=8,
            accuracy=0.74 + 0.01 * seed,
            learning_rate=RATES["lora"],
        )
    report = build_report(tmp_path, n_resamples=1_000).markdown.read_text()
    section = report.split("### Savings: smaller budgets against lora at a larger one", 1)[1].split("###")[0]
    assert "| r=4 |" not in section  # no row: nothing tuned alike to compare
    assert (
        "Not compared, because fimlora tune chose the settings of one side and not of the other, so a "
        "difference would mix the settings with the budget: r=4 fim-lora, lora (tuned) vs lora at r=8 "
        "(not tuned)." in " ".join(section.split())
    )
    # The Pareto plots draw lora r=8 beside the tuned points: their captions say it was not tuned.
    pareto = report.split("### Accuracy–size trade-off", 1)[1].split("###")[0]
    assert (
        "Not tuned, unlike the other points (fimlora tune did not choose their settings): lora at r=8."
        in (" ".join(pareto.split()))
    )
    memory = report.split("### accuracy against peak memory", 1)[1].split("###")[0]
    assert "Not tuned, unlike the other points" in memory and "lora at r=8." in " ".join(memory.split())
    tuned_only = tmp_path / "tuned-only"
    tuned_runs(tuned_only, {"lora": (3, 1, 0), "fim-lora": (3, 1, 0)})
    assert "Not tuned" not in build_report(tuned_only, n_resamples=1_000).markdown.read_text()
