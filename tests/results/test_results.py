"""The results table from hand-written run directories: finished runs only, every column, atomic files."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from results.fabricate import accuracy_of, write_run, write_sweep

from fimlora.cli import main
from fimlora.errors import FimloraError
from fimlora.results import FULL_ADAPTER, collect_results, read_run, scan_runs
from fimlora.stats import summarize


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "runs"
    write_sweep(root, seeds=(0, 1, 2), ranks=(2, 4))
    # Three kinds of unfinished run: killed before result.json, failed, and a truncated result.json.
    write_run(root / "r4" / "seed3" / "lora", method="lora", seed=3, finished=False)
    failed = write_run(root / "r4" / "seed3" / "fim-lora", method="fim-lora", seed=3)
    result = json.loads((failed / "result.json").read_text())
    (failed / "result.json").write_text(json.dumps({**result, "status": "failed"}))
    broken = write_run(root / "r4" / "seed3" / "random-rank", method="random-rank", seed=3)
    (broken / "result.json").write_text('{"status": "fini')
    # A sweep run that raised before its run directory existed, and one that raised while training.
    (root / "key-a").mkdir()
    (root / "key-a" / "failure.txt").write_text("Traceback …")
    write_run(root / "key-b" / "lora", method="lora", seed=4, finished=False)
    (root / "key-b" / "failure.txt").write_text("Traceback …")
    # A temporary leftover inside a hidden directory is not a run at all.
    write_run(root / ".tmp-adapter" / "x", method="lora", seed=9)
    return root


def test_finished_runs_only_and_unfinished_listed_apart(sweep_dir):
    table = collect_results(sweep_dir)
    frame = table.frame
    assert len(frame) == 2 * 3 * 3
    assert set(frame["seed"]) == {0, 1, 2}
    reasons = {u.path.relative_to(sweep_dir).as_posix(): u.reason for u in table.unfinished}
    assert reasons == {
        "r4/seed3/lora": "no result.json",
        "r4/seed3/fim-lora": "status 'failed'",
        "r4/seed3/random-rank": "result.json unreadable",
        "key-a": "failed before it started (see failure.txt)",
        "key-b/lora": "no result.json; failed (see ../failure.txt)",
    }
    assert not any(".tmp-adapter" in path for path in frame["run_dir"])


def test_columns_and_values(sweep_dir):
    frame = collect_results(sweep_dir).frame
    expected = {
        "run_dir", "method", "model", "dataset", "task", "seed", "budget", "budget_label",
        "accuracy", "macro_f1", "eval_loss", "eval_num_examples",
        "adapter_params", "head_params", "num_target_modules",
        "alloc_strategy", "rank_min", "rank_mean", "rank_max", "lora_alpha", "scaling",
        "fisher_estimator", "fisher_num_examples", "fisher_aggregation",
        "train_time_s", "train_steps", "train_examples_per_s", "final_train_loss",
        "peak_memory_mb", "peak_memory_kind", "eval_time_s", "git_revision", "device",
        "sweep.key", "sweep.budget.uniform_rank",
        "budget.uniform_rank", "budget.params", "train.learning_rate", "train.steps",
        "fisher.num_examples", "allocation.tau", "lora.scaling",
    }  # fmt: skip
    assert expected <= set(frame.columns)
    row = frame[(frame["run_dir"] == "r4/seed1/fim-lora")].iloc[0]
    assert row["method"] == "fim-lora" and row["seed"] == 1 and row["task"] == "classification"
    assert row["accuracy"] == pytest.approx(accuracy_of("fim-lora", 1, 4))
    assert row["budget"] == 4 * 4 * (4 * 64 + 2 * 96) and row["budget_label"] == "r=4"
    assert row["adapter_params"] <= row["budget"]
    assert row["peak_memory_mb"] == pytest.approx(512.0)
    assert row["train.learning_rate"] == pytest.approx(1e-3) and row["sweep.key"] == "r4-s1-fim-lora"
    assert row["fisher_estimator"] == "empirical"
    lora = frame[frame["run_dir"] == "r4/seed1/lora"].iloc[0]
    assert pd.isna(lora["fisher_estimator"]) and lora["alloc_strategy"] == "uniform"
    # Rows are sorted by (dataset, model, budget, method, seed).
    assert list(frame["budget"]) == sorted(frame["budget"])


def test_written_parquet_and_csv_match(sweep_dir, tmp_path):
    table = collect_results(sweep_dir)
    out = tmp_path / "out"
    paths = table.write(out)
    parquet, csv = pd.read_parquet(paths["parquet"]), pd.read_csv(paths["csv"])
    assert len(parquet) == len(csv) == len(table.frame)
    assert list(parquet.columns) == list(table.frame.columns)
    assert parquet["accuracy"].tolist() == pytest.approx(table.frame["accuracy"].tolist())
    unfinished = pd.read_csv(paths["unfinished"])
    assert sorted(unfinished["path"]) == [
        "key-a",
        "key-b/lora",
        "r4/seed3/fim-lora",
        "r4/seed3/lora",
        "r4/seed3/random-rank",
    ]
    assert sorted(p.name for p in out.iterdir()) == [
        "results.csv",
        "results.parquet",
        "summary.csv",
        "unfinished.csv",
    ]


def test_run_without_optional_files(tmp_path):
    """A finished run with only result.json still reads (config columns are simply absent)."""
    run = write_run(tmp_path / "a", method="lora", seed=0)
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "allocation.json"):
        (run / name).unlink()
    row = read_run(run, tmp_path)
    assert row["run_dir"] == "a" and row["accuracy"] == pytest.approx(0.8)
    assert row["budget_label"] == f"{row['budget']:,} params"
    assert scan_runs(tmp_path).finished == [run]


def test_full_fine_tuning_is_its_own_budget_group(tmp_path):
    """Full fine-tuning ignores the budget its config names; under it, it would be compared with LoRA
    at that rank. It is grouped at what it trains, labelled "full"."""
    from fimlora.methods.adapters.full_ft import FullFineTuning

    assert FullFineTuning.name == FULL_ADAPTER
    lora = write_run(tmp_path / "lora", method="lora", seed=0, rank=8)
    full = write_run(tmp_path / "full", method="lora", seed=0, rank=8)
    result = json.loads((full / "result.json").read_text(encoding="utf-8"))
    result.update(
        method="full-ft",
        method_spec={"name": "full-ft", "allocation": "none", "adapter": "full", "optimizer": "adamw"},
        budget_matched=False,
        adapter_params=123_456,
        effective_adapter_params=123_456,
    )
    (full / "result.json").write_text(json.dumps(result), encoding="utf-8")
    rows = {row["method"]: row for row in (read_run(lora, tmp_path), read_run(full, tmp_path))}
    assert rows["lora"]["budget_label"] == "r=8" and rows["lora"]["budget"] == result["budget"]
    assert rows["full-ft"]["budget_label"] == "full" and rows["full-ft"]["budget"] == 123_456


def test_missing_or_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FimloraError, match="does not exist"):
        collect_results(tmp_path / "nope")
    with pytest.raises(FimloraError, match="No finished runs"):
        collect_results(tmp_path)
    write_run(tmp_path / "killed", method="lora", seed=0, finished=False)
    with pytest.raises(FimloraError, match="1 unfinished"):
        collect_results(tmp_path)


def _cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize("command", ["results", "report"])
def test_cli_errors_on_missing_and_empty_directories(capsys, tmp_path, command):
    for target, words in ((tmp_path / "nope", "does not exist"), (tmp_path, "No finished runs")):
        code, _, err = _cli(capsys, command, str(target))
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]
        assert "Traceback" not in err


def test_cli_results(capsys, sweep_dir, tmp_path):
    code, out, _ = _cli(capsys, "results", str(sweep_dir), "--out", str(tmp_path / "table"))
    assert code == 0
    assert "18 finished run(s)" in out and "5 unfinished run(s)" in out
    assert "reviews / tiny-bert / r=2 / fim-lora: 3 run(s)" in out
    assert (tmp_path / "table" / "results.parquet").is_file()
    # The paired comparisons, with raw and Holm-adjusted p-values (the same as summarize's).
    summary = pd.read_csv(tmp_path / "table" / "summary.csv")
    assert {"p_ttest", "p_ttest_holm", "p_signflip", "p_signflip_holm"} <= set(summary.columns)
    compared = summary[(summary["metric"] == "accuracy") & summary["diff_mean"].notna()]
    assert (compared["p_ttest_holm"] >= compared["p_ttest"]).all()
    assert out.count(" − lora: accuracy Δ ") == len(compared) > 0
    row = compared.iloc[0]
    assert f"(Holm {row['p_signflip_holm']:.3f})" in out and "nan" not in out


def test_rank_columns_describe_the_ranks_trained_at_the_end(tmp_path):
    """AdaLoRA prunes and EVA redistributes after the allocation: their recorded ranks are what trained."""
    final = {"bert.encoder.layer.0.attention.self.query": 0, "bert.encoder.layer.0.output.dense": 6}
    for method, key in (("adalora", "final_ranks"), ("eva", "redistributed_ranks")):
        run = write_run(tmp_path / method, method="lora", seed=0)  # a uniform rank-4 allocation
        result = json.loads((run / "result.json").read_text())
        result.update(method=method, records={method: {"rho": 2.0, key: final}})
        (run / "result.json").write_text(json.dumps(result))
        row = read_run(run)
        assert (row["rank_min"], row["rank_mean"], row["rank_max"], row["rank_source"]) == (0, 3.0, 6, key)
    row = read_run(write_run(tmp_path / "plain", method="fim-lora", seed=0))
    assert row["rank_source"] == "allocation" and row["rank_min"] >= 1


def test_a_run_made_before_a_config_field_reads_as_its_default_and_still_pairs(tmp_path):
    # lora's runs predate train.sampling (their config.yaml lacks it); fim-lora's record it at the
    # default. Read raw, the field would vary within the budget and split lora from fim-lora.
    for seed in range(5):
        write_run(tmp_path / f"l{seed}" / "lora", method="lora", seed=seed, accuracy=0.80 + 0.01 * seed)
        path = write_run(tmp_path / f"f{seed}" / "fim-lora", method="fim-lora", seed=seed, accuracy=0.82)
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        config["train"]["sampling"] = "random"
        (path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    frame = collect_results(tmp_path).frame
    assert set(frame["train.sampling"]) == {"random"}
    row = summarize(frame, ["accuracy"]).set_index("method").loc["fim-lora"]
    assert row["n_paired"] == 5 and row["diff_mean"] == pytest.approx(0.0, abs=1e-12)
