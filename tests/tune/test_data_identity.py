"""Tuning keys its studies and its prepared data by the data's content: an edited train or validation
file starts new studies (its trials are re-run, never mixed with the old ones); the sealed test file is
not read, so editing it changes nothing."""

from __future__ import annotations

import json
import shutil

import optuna
import pytest
import yaml
from tune_runs import POISON, write_spec

from fimlora.cli import main
from fimlora.sweep import load_spec
from fimlora.tune import TUNED_FILE, parse_tune, plan_cells
from fimlora.tune.objective import prepared_data_key
from fimlora.tune.storage import default_storage

TUNE = {"trials": 2, "metric": "loss", "eval_every": 3, "sampler": {"startup_trials": 2}}


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture
def data(readable_split_dir, tmp_path):
    return shutil.copytree(readable_split_dir, tmp_path / "reviews")


def edit_in_place(path):
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("film", "plot", 1), encoding="utf-8")


def study_of(spec):
    (cell,) = plan_cells(spec, parse_tune(spec))
    return cell


def test_study_and_prepared_data_follow_the_train_and_validation_bytes_not_the_test_file(
    small_bert_dir, data, tmp_path
):
    grid = {"model": [str(small_bert_dir)], "dataset": [str(data)], "method": ["lora"], "seed": [0]}
    spec = load_spec(write_spec(tmp_path, grid, TUNE))
    before = study_of(spec)
    inputs = prepared_data_key(before.config)
    (data / "test.csv").write_bytes(POISON)  # sealed while tuning: never read, changes nothing
    assert study_of(spec).study_name == before.study_name and prepared_data_key(before.config) == inputs
    for name in ("train.csv", "validation.csv"):
        edit_in_place(data / name)
        after = study_of(spec)
        assert after.study_name != before.study_name, name
        assert prepared_data_key(after.config) != inputs, name
        before, inputs = after, prepared_data_key(after.config)


def test_tuning_again_after_an_edit_reruns_the_trials_on_the_new_data(capsys, small_bert_dir, data, tmp_path):
    grid = {"model": [str(small_bert_dir)], "dataset": [str(data)], "method": ["lora"], "seed": [0]}
    path = write_spec(tmp_path, grid, TUNE)
    spec = load_spec(path)
    code, out, err = run_cli(capsys, "tune", path)
    assert code == 0, out + err
    old = study_of(spec)
    edit_in_place(data / "train.csv")
    code, out, err = run_cli(capsys, "tune", path)
    assert code == 0, out + err
    new = study_of(spec)
    assert out.count(" trial ") == 2  # both trials re-run: none of the old study's counts
    storage = default_storage(spec.output_path)
    assert len(optuna.load_study(study_name=old.study_name, storage=storage).trials) == 2
    assert len(optuna.load_study(study_name=new.study_name, storage=storage).trials) == 2
    (entry,) = yaml.safe_load((spec.output_path / TUNED_FILE).read_text())["cells"]
    assert sum(entry["trials"].values()) == 2
    result = json.loads((new.directory / "trial-0000" / "lora" / "result.json").read_text())
    digests = {f["split"]: f["sha256"] for f in result["data"]["identity"]["files"]}
    assert set(digests) == {"train", "validation"}  # the sealed test file is neither read nor recorded
    assert digests == new.config.data_identity(splits=("train", "validation")).fingerprint()["sha256"]


def test_final_runs_refuse_tuned_settings_chosen_on_other_data(capsys, small_bert_dir, data, tmp_path):
    grid = {"model": [str(small_bert_dir)], "dataset": [str(data)], "method": ["lora"], "seed": [0]}
    path = write_spec(tmp_path, grid, TUNE)
    code, out, err = run_cli(capsys, "tune", path)
    assert code == 0, out + err
    tuned = load_spec(path).output_path / TUNED_FILE
    (entry,) = yaml.safe_load(tuned.read_text())["cells"]
    assert set(entry["data"]["sha256"]) == {"train", "validation"}
    edit_in_place(data / "validation.csv")
    code, _, err = run_cli(capsys, "sweep", path, "--tuned", tuned, "--dry-run")
    assert code == 2 and "changed since it was tuned (the validation file's content)" in err, err
    code, out, err = run_cli(capsys, "tune", path)  # tuning again on the new data makes them valid
    assert code == 0, out + err
    code, _, err = run_cli(capsys, "sweep", path, "--tuned", tuned, "--dry-run")
    assert code == 0, err
