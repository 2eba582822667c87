"""A cell that would fail every trial before training stops the tuning before its first trial, and the
check reads no test data (the split directory's test.csv cannot be read)."""

from __future__ import annotations

import pytest
import yaml
from tune_runs import lora_grid

from fimlora.cli import main
from fimlora.sweep import load_spec

TUNE = {"trials": 2, "metric": "loss", "sampler": {"startup_trials": 2}}


def test_a_cell_whose_hindsight_source_is_not_made_yet_stops_the_tuning_before_any_trial(
    capsys, small_bert_dir, split_dir, tmp_path
):
    # lora can be tuned, hindsight-lora cannot: its source store has no finished full fine-tuning run.
    grid = {**lora_grid(small_bert_dir, split_dir), "method": ["lora", "hindsight-lora"]}
    source = {"method": "full-ft", "store": str(tmp_path / "none")}
    spec = {
        "name": "tiny",
        "output_dir": "store",
        "defaults": {
            "dataset_options": {"text_column": "review", "label_column": "sentiment"},
            "fisher": {"num_examples": 8, "batch_size": 8},
            "train": {"steps": 6, "batch_size": 8, "max_length": 16, "report_to": []},
            "method_options": {"hindsight": {"source": source}},
        },
        "grid": grid,
        "tune": TUNE,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "1 of 2 tuning cell(s) would fail before training" in err and "hindsight-lora" in err
    assert not (load_spec(path).output_path / "tuning.db").exists()  # not one trial spent, lora's neither
