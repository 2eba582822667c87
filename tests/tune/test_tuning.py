"""A whole tuning on a tiny model: test data never read, equal budgets, tuned.yaml, then the final runs
and the report (about 45 s on 2 idle cores: slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
import yaml
from tune_runs import write_small_reviews, write_spec

from fimlora.cli import main
from fimlora.config import load_config
from fimlora.data import load_task_data
from fimlora.errors import FimloraError
from fimlora.experiment import run_experiment
from fimlora.sweep import load_spec
from fimlora.tune import TRIALS_FILE, TUNED_FILE, plan_cells, run_tuning
from fimlora.tune.storage import kind_counts, trial_kind

pytestmark = pytest.mark.slow

TRIALS = 3
TUNE = {
    "trials": TRIALS,
    "metric": "loss",
    "eval_every": 2,
    "learning_rate": {"low": 1e-3, "high": 1e-1, "log": True},
    "methods": {
        "fim-lora": {
            "allocation.tau": {"low": 0.5, "high": 2.0},
            "lora.scaling": {"choices": ["alpha_over_r", "alpha_over_sqrt_r"]},
        }
    },
    "sampler": {"startup_trials": 2},
    "pruner": {"startup_trials": 1},
}
COLUMNS = {"text_column": "review", "label_column": "sentiment"}


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def tuned(small_bert_dir, split_dir, tmp_path_factory):
    """lora and fim-lora tuned on a dataset directory whose test.csv no reader accepts."""
    work = tmp_path_factory.mktemp("tuning")
    data = work / "reviews"
    shutil.copytree(split_dir, data)
    grid = {
        "model": [str(small_bert_dir)],
        "dataset": [str(data)],
        "method": ["lora", "fim-lora"],
        "budget": [{"uniform_rank": 2}],
        "seed": [0],
    }
    path = write_spec(work, grid, TUNE)
    spec = load_spec(path)
    lines: list[str] = []
    report = run_tuning(spec, log=lines.append)
    studies = {
        cell.method: optuna.load_study(study_name=cell.study_name, storage=report.storage)
        for cell in plan_cells(spec, _settings(spec))
    }
    return SimpleNamespace(
        work=work, data=data, path=path, spec=spec, report=report, lines=lines, studies=studies
    )


def _settings(spec):
    from fimlora.tune import parse_tune

    return parse_tune(spec)


def _trial_results(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((store / ".tuning").rglob("result.json"))]


def test_the_test_split_is_never_read_while_tuning(tuned):
    # The tuning finished although test.csv cannot be parsed: it was never opened...
    assert all(s.entry.params is not None for s in tuned.report.summaries)
    with pytest.raises(FimloraError, match="is not UTF-8 text"):
        load_task_data(str(tuned.data), **COLUMNS)  # ...as loading it would have failed
    # ...and every trial was scored on the 32 rows of validation.csv.
    results = _trial_results(tuned.spec.output_path)
    assert results and all(r["eval_split"] == "validation" for r in results)
    assert all(r["metrics"]["num_examples"] == 32 for r in results)


def test_every_study_ran_exactly_its_trials_with_the_same_seeded_sampler(tuned):
    for study in tuned.studies.values():
        counts = kind_counts(study.get_trials())
        assert counts["complete"] + counts["pruned"] + counts["failed"] == TRIALS
        assert not counts["lost"] and not counts["surplus"] and not counts["running"]
    # Same seed, same first dimension: both studies started from the same learning rate.
    first = {m: s.trials[0].params["train.learning_rate"] for m, s in tuned.studies.items()}
    assert first["lora"] == first["fim-lora"]
    trials = pd.read_csv(tuned.spec.output_path / TRIALS_FILE)
    assert trials.groupby("method").size().to_dict() == {"fim-lora": TRIALS, "lora": TRIALS}


def test_tuned_yaml_lists_the_best_validation_settings_of_every_cell(tuned):
    document = yaml.safe_load((tuned.spec.output_path / TUNED_FILE).read_text())
    assert document["split"] == "validation" and document["trials_per_study"] == TRIALS
    assert [c["method"] for c in document["cells"]] == ["lora", "fim-lora"]
    trials = pd.read_csv(tuned.spec.output_path / TRIALS_FILE)
    for cell in document["cells"]:
        assert list(cell) == [
            "model", "dataset", "method", "budget", "params", "metric", "validation_score", "seed_scores",
        "seed_spread", "trials", "data"
        ]  # fmt: skip
        assert cell["dataset"] == str(tuned.data) and cell["budget"] == {"uniform_rank": 2}
        assert cell["metric"] == "loss" and set(cell["trials"]) == {
            "complete",
            "pruned",
            "failed",
            "lost",
            "retried",
        }
        assert sum(cell["trials"].values()) == TRIALS
        complete = trials[(trials["method"] == cell["method"]) & (trials["state"] == "complete")]
        assert cell["validation_score"] == pytest.approx(complete["value"].min())  # loss: lower is better
        best = complete.loc[complete["value"].idxmin()]
        assert cell["params"]["train.learning_rate"] == pytest.approx(best["param.train.learning_rate"])
    expected = {
        "lora": ["train.learning_rate"],
        "fim-lora": ["train.learning_rate", "allocation.tau", "lora.scaling"],
    }
    assert {c["method"]: list(c["params"]) for c in document["cells"]} == expected


def test_a_trial_is_the_computation_of_a_plain_run(tuned, tmp_path):
    """Trials share prepared data, model and Fisher within a process; a trial must still be exactly what
    ``fimlora run`` of its config gives."""
    study = tuned.studies["fim-lora"]
    trial = next(t for t in study.trials if trial_kind(t) == "complete")
    run_dir = Path(trial.user_attrs["run_dir"])
    recorded = json.loads((run_dir / "result.json").read_text())
    # The same train and validation files, next to a readable test file (fimlora run loads every split).
    data = tmp_path / "reviews"
    shutil.copytree(tuned.data, data)
    write_small_reviews(data / "test.csv", 24, seed=2)
    config = load_config(
        run_dir / "config.yaml", {"output_dir": str(tmp_path / "plain"), "dataset": str(data)}
    )
    assert config.train.eval_split == "validation"
    _, results = run_experiment(config, progress=False, log=lambda _: None)
    assert results[0]["metrics"] == recorded["metrics"]
    assert results[0]["allocation"] == recorded["allocation"]


def test_running_again_resumes_finished_studies_without_new_trials(tuned):
    before = (tuned.spec.output_path / TUNED_FILE).read_text()
    lines: list[str] = []
    run_tuning(tuned.spec, log=lines.append)
    assert not [line for line in lines if " trial " in line]
    assert (tuned.spec.output_path / TUNED_FILE).read_text() == before


def test_final_runs_take_the_tuned_settings_on_test_and_the_report_shows_the_tuning(capsys, tuned):
    # Test data is only needed now: give the directory a readable test split.
    write_small_reviews(tuned.data / "test.csv", 24, seed=2)
    store = tuned.spec.output_path
    code, out, err = run_cli(capsys, "sweep", tuned.path, "--tuned", store / TUNED_FILE, "--no-progress")
    assert code == 0, out + err
    document = yaml.safe_load((store / TUNED_FILE).read_text())
    chosen = {c["method"]: c for c in document["cells"]}
    for method in ("lora", "fim-lora"):
        (result_path,) = [p for p in store.glob(f"{method}-r2-s0-*/{method}/result.json")]
        result = json.loads(result_path.read_text())
        assert result["eval_split"] == "test" and result["metrics"]["num_examples"] == 24
        params = chosen[method]["params"]
        assert result["learning_rate"] == params["train.learning_rate"]
        sources = result["hyperparameter_sources"]
        for key, value in params.items():
            assert sources[key] == {"value": value, "source": "tuned"}
        assert (
            sources["train.steps"]["source"] == "spec"
            and sources["train.weight_decay"]["source"] == "default"
        )
        assert sources["train.eval_split"] == {"value": "test", "source": "--tuned"}
        assert result["tuning"]["trials"] == chosen[method]["trials"]
        assert result["tuning"]["validation_score"] == chosen[method]["validation_score"]
    if "allocation.tau" in chosen["fim-lora"]["params"]:
        config = yaml.safe_load(next(store.glob("fim-lora-r2-s0-*/fim-lora/config.yaml")).read_text())
        assert config["allocation"]["tau"] == chosen["fim-lora"]["params"]["allocation.tau"]

    code, out, err = run_cli(capsys, "report", store)
    assert code == 0, err
    report = (store / "report.md").read_text()
    assert "### Tuning budget" in report and "### Learning-rate sensitivity (validation split)" in report
    assert any(p.name.startswith("sensitivity-") for p in (store / "report_files").glob("*.png"))
    # Each method at its own tuned rate is still paired with lora on the same seed.
    summary = pd.read_csv(store / "report_files" / "summary.csv")
    row = summary[(summary["method"] == "fim-lora") & (summary["metric"] == "accuracy")].iloc[0]
    assert row["n_paired"] == 1
