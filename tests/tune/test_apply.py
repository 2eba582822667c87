"""`fimlora sweep SPEC --tuned tuned.yaml`: each cell's settings applied, test split, sources recorded;
cells without tuned settings refused."""

from __future__ import annotations

import pytest
from tune_runs import cell, tuned_file, write_spec

from fimlora.cli import main
from fimlora.config import parse_config
from fimlora.sweep import expand, load_spec
from fimlora.tune import expand_tuned
from fimlora.tune.apply import hyperparameter_sources

GRID = {
    "model": ["some/model"],
    "dataset": ["movie-reviews"],
    "method": ["lora", "fim-lora"],
    "budget": [{"uniform_rank": 2}],
    "seed": [0, 1],
}
TUNE = {"trials": 4, "methods": {"fim-lora": {"allocation.tau": {"low": 0.5, "high": 2.0}}}}


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_tuned_settings_are_applied_per_cell_on_the_test_split(tmp_path):
    spec = load_spec(write_spec(tmp_path, GRID, TUNE))
    path = tuned_file(
        tmp_path / "tuned.yaml",
        [
            cell("lora", {"train.learning_rate": 0.0123}),
            cell("fim-lora", {"train.learning_rate": 0.0456, "allocation.tau": 1.5}),
        ],
    )
    runs = expand_tuned(spec, path)
    assert len(runs) == 4
    for run in runs:
        config = run.config
        assert config.train.eval_split == "test"
        assert config.train.learning_rate == {"lora": 0.0123, "fim-lora": 0.0456}[run.method]
        assert config.allocation.tau == (1.5 if run.method == "fim-lora" else 1.0)
        assert run.extras["tuning"]["trials"] == {
            "complete": 3,
            "pruned": 1,
            "failed": 0,
            "lost": 0,
            "retried": 0,
        }
        assert run.extras["tuning"]["trials_per_study"] == 4
        sources = run.extras["hyperparameter_sources"]
        assert sources["train.learning_rate"] == {"value": config.train.learning_rate, "source": "tuned"}
        assert sources["train.steps"]["source"] == "spec"  # the spec's defaults set it
        assert sources["lora.dropout"] == {"value": 0.0, "source": "default"}
        assert sources["budget.uniform_rank"] == {"value": 2, "source": "spec"}  # the grid set it
    # Tuned runs are other runs than the untuned grid (other settings, other keys).
    assert not {r.key for r in runs} & {r.key for r in expand(spec)}


def test_every_setting_of_the_run_has_a_source(tmp_path):
    config = parse_config({"model": "m", "dataset": "movie-reviews", "methods": ["lora"]})
    sources = hyperparameter_sources({"train": {"steps": 100}}, config, {"train.learning_rate": 1e-3})
    dump = config.model_dump(mode="json")
    # Nested settings (fisher.probe.*) have a source per leaf.
    leaves = {
        f"fisher.{k}.{sub}" if isinstance(v, dict) else f"fisher.{k}"
        for k, v in dump["fisher"].items()
        for sub in (v if isinstance(v, dict) else [None])
    }
    assert {k for k in sources if k.startswith("fisher.")} == leaves
    assert "fisher.probe.l2" in leaves
    assert (
        sources["train.steps"]["source"] == "spec" and sources["fisher.num_examples"]["source"] == "default"
    )
    assert {s["source"] for s in sources.values()} <= {"tuned", "spec", "default", "--tuned"}


def test_a_cell_without_tuned_settings_is_refused(capsys, tmp_path):
    path = write_spec(tmp_path, GRID, TUNE)
    only_lora = tuned_file(tmp_path / "tuned.yaml", [cell("lora", {"train.learning_rate": 0.01})])
    code, _, err = run_cli(capsys, "sweep", path, "--tuned", only_lora, "--dry-run")
    assert code == 2 and "has no tuned settings for fim-lora r2 (some/model, movie-reviews)" in err
    nothing = tuned_file(
        tmp_path / "none.yaml",
        [cell("lora", {"train.learning_rate": 0.01}), cell("fim-lora", None, trials=(0, 2, 2))],
    )
    code, _, err = run_cli(capsys, "sweep", path, "--tuned", nothing, "--dry-run")
    assert code == 2 and "no trial of fim-lora r2" in err and "Traceback" not in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ncells: 3\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "sweep", path, "--tuned", broken, "--dry-run")
    assert code == 2 and "Invalid tuned settings" in err


def test_dry_run_lists_the_tuned_runs(capsys, tmp_path, tiny_bert_dir, sentiment_csv):
    # A real (tiny) model and dataset: a dry run checks that every run could start (preflight).
    where = {"model": str(tiny_bert_dir), "dataset": str(sentiment_csv)}
    path = write_spec(tmp_path, {**GRID, **{k: [v] for k, v in where.items()}}, TUNE)
    tuned = tuned_file(
        tmp_path / "tuned.yaml",
        [
            cell("lora", {"train.learning_rate": 0.0123}, **where),
            cell("fim-lora", {"train.learning_rate": 0.0456, "allocation.tau": 1.5}, **where),
        ],
    )
    code, out, err = run_cli(capsys, "sweep", path, "--tuned", tuned, "--dry-run")
    assert code == 0, err
    assert "4 runs" in out and out.count("lr=0.0123") == 2 and out.count("lr=0.0456") == 2
